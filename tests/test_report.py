"""The run report: numbers in the table against hand-computed ones, valid PNGs, partial runs, atomic
writes, and a tiny real recipe whose printed commands reproduce its stages."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from slimlm import SlimlmError
from slimlm.baseline import baseline_predictions, run_baseline
from slimlm.cli import app
from slimlm.comparison import METRICS, at_chance, retention
from slimlm.evaluate import paired_auc_delta, roc_auc
from slimlm.pipeline import load_recipe
from slimlm.report import read_run, write_report
from slimlm.report.read import comparisons
from slimlm.tasks.movielens import example_id, movielens_examples

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AUC, EXACT, PPL = (next(m for m in METRICS if m.key == k) for k in ("auc", "exact_match", "perplexity"))
runner = CliRunner()


# --------------------------------------------------------------------------- the pure numbers


@pytest.mark.parametrize("metrics, expected", [
    ({"auc": 0.55, "auc_ci95": [0.49, 0.61]}, True),  # the interval reaches 0.5
    ({"auc": 0.55, "auc_ci95": [0.51, 0.59]}, False),
    ({"auc": 0.50}, True),  # no interval: no better than 0.5
    ({"auc": 0.58}, False),
    ({"auc": 0.40, "auc_ci95": [0.35, 0.45]}, True),  # worse than chance is no better than chance
])
def test_auc_at_chance(metrics, expected):
    assert at_chance(AUC, metrics) is expected


def test_stage_seconds_count_every_run_of_a_resumed_stage():
    from slimlm.pipeline import stage_seconds

    assert stage_seconds({"seconds": 30.0, "metrics": {"train_seconds": 500.0}}) == 500.0  # resumed
    assert stage_seconds({"seconds": 30.0, "metrics": {"train_seconds": 25.0}}) == 30.0  # loading included
    assert stage_seconds({"seconds": 12.5, "metrics": {"auc": 0.7}}) == 12.5
    assert stage_seconds({}) is None
    # an evaluate stage: every model it finished, over all its runs (older results without wall_seconds: own)
    ev = {"kind": "evaluate", "seconds": 40.0, "metrics": {"a": {"wall_seconds": 300.0}, "b": {"wall_seconds": 35.5}}}
    assert stage_seconds(ev) == 335.5
    assert stage_seconds({**ev, "metrics": {"a": {"eval_seconds": 300.0}}}) == 40.0


def test_retention_and_chance_for_other_metrics():
    assert retention(0.686, 0.7, AUC) == pytest.approx(0.98)
    assert retention(20.0, 10.0, PPL) == pytest.approx(0.5)  # perplexity doubled: half as good
    assert retention(0.3, 0.0, EXACT) is None and retention(None, 0.7, AUC) is None
    assert at_chance(EXACT, {"exact_match": 0.0}) and not at_chance(EXACT, {"exact_match": 0.2})
    assert not at_chance(PPL, {"perplexity": 1e6})  # no chance level: never "at chance"


# --------------------------------------------------------------------------- a hand-made run directory


def result(auc, ci, total, non_emb, disk, speed=None, **extra):
    res = {"model": "x", "params": {"total": total, "embedding": total - non_emb, "non_embedding": non_emb},
           "disk_bytes": disk, "metrics": {"n": 1886, "auc": auc, "auc_ci95": ci, "log_loss": 0.6,
                                           "candidates_per_s": 31.0}, "eval_seconds": 60.0, **extra}
    if speed:
        res["speed"] = dict(zip(("prefill_tokens_per_s", "decode_tokens_per_s", "candidates_per_s"), speed, strict=True))
    return res


RESULTS = {
    "teacher": result(0.497, [0.470, 0.523], 134_515_008, 106_203_264, 538_062_312, (1000.0, 50.0, 200.0)),
    "teacher-sft": result(0.700, [0.676, 0.724], 134_515_008, 106_203_264, 538_062_312, (1010.0, 49.0, 198.0)),
    "pruned": result(0.650, [0.625, 0.675], 68_000_000, 39_688_256, 272_000_000, (2500.0, 90.0, 500.0)),
    "kd": result(0.686, [0.662, 0.710], 68_000_000, 39_688_256, 272_000_000, (2520.0, 91.0, 520.0)),
    "int8": result(0.680, [0.656, 0.704], 68_000_000, 39_688_256, 120_000_000, (4000.0, 100.0, 800.0)),
}
SECONDS = {"teacher-sft": 300.0, "pruned": 42.0, "kd": 900.0, "int8": 5.0, "eval": 400.0}


def curve_rows(mode, steps=6, eval_every=3):
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "mode": mode, "loss": 2.0 / s, "lr": 1e-4, "tokens_per_s": 1000.0 + s}
        if s % eval_every == 0 and s < steps:
            row.update(eval_kl=0.5 / s, eval_auc=0.6 + 0.01 * s)
        rows.append(row)
    rows.append({"step": steps, "eval_kl": 0.05, "eval_auc": 0.69})  # the final evaluation row
    return rows


def fake_run(root, *, run_json=True):
    """A finished five-stage run as the pipeline would leave it, written by hand."""
    out = root / "run"
    recipe = {"out": str(out), "teacher": "teacher", "task": {"name": "movielens-ranking"}, "seed": 0, "stages": [
        {"name": "teacher-sft", "kind": "distill", "config": {"mode": "sft", "max_steps": 6}},
        {"name": "pruned", "kind": "prune", "config": {"mlp_keep": 0.5, "layers_keep": 20, "samples": 64}},
        {"name": "kd", "kind": "distill", "teacher": "teacher-sft", "config": {"mode": "kd", "max_steps": 6}},
        {"name": "int8", "kind": "quantize", "config": {"scheme": "int8"}},
        {"name": "eval", "kind": "evaluate", "config": {"split": "test"}},
    ]}
    inputs = {"teacher-sft": {"from": "teacher", "teacher": "teacher"}, "pruned": {"from": "stage:teacher-sft"},
              "kd": {"from": "stage:pruned", "teacher": "stage:teacher-sft"}, "int8": {"from": "stage:kd"},
              "eval": {"models": {r: ("teacher" if r == "teacher" else f"stage:{r}") for r in RESULTS}}}
    metrics = {"teacher-sft": {"step": 6, "eval_auc": 0.70}, "kd": {"step": 6, "eval_kl": 0.05, "eval_auc": 0.69},
               "pruned": {"method": "osscar", "params_before": RESULTS["teacher"]["params"],
                          "params_after": RESULTS["pruned"]["params"],
                          "arch_after": {"num_layers": 20, "intermediate_size": 768}},
               "int8": {"scheme": "int8", "quantized_layers": 140, "weights_bytes": 120_000_000,
                        "source_weights_bytes": 272_000_000},
               "eval": RESULTS}
    for st in recipe["stages"]:
        d = out / st["name"]
        d.mkdir(parents=True)
        if st["kind"] == "distill":
            (d / "config.yaml").write_text(yaml.safe_dump({"mode": st["config"]["mode"], "max_steps": 6,
                                                           "student": "s", "teacher": "t", "out": str(d)}))
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve_rows(st["config"]["mode"])))
            (d / "metrics.json").write_text(json.dumps(metrics[st["name"]]))
        record = {"name": st["name"], "kind": st["kind"], "fingerprint": "f" * 16, "seconds": SECONDS[st["name"]],
                  "seconds_all_runs": SECONDS[st["name"]], "inputs": inputs[st["name"]], "metrics": metrics[st["name"]]}
        (d / "stage.json").write_text(json.dumps(record))
    if run_json:
        inv = {"command": ["slimlm", "run", "my recipe.yaml", "optim.lr=1e-4"], "cwd": str(root),
               "date": "2026-01-02T03:04:05+00:00", "machine": {"cpu_count": 2, "torch": "2.13.0+cpu"}}
        (out / "run.json").write_text(json.dumps({"recipe": recipe, "invocations": [inv],
                                                  "total_stage_seconds": sum(SECONDS.values())}))
    return out


def table(md: str, section: str) -> dict[str, dict[str, str]]:
    """The markdown table under heading ``section`` as {model: {column: cell}}."""
    lines = md[md.index(section):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| "))
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split(" | ")])
    header, body = rows[0], rows[2:]
    return {r[0].strip("*"): dict(zip(header, r, strict=True)) for r in body}


def images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


# --------------------------------------------------------------------------- every number from a stage's files

# prose that states fixed settings of the probes and the bootstrap, not measurements
FIXED_PROSE = ("1,000 resamples", "(95% CI)", "at 95%", "95% interval reaching")
NUMBER = re.compile(r"(?<![\w/.\-])([+-]?\d[\d,]*(?:\.\d+)?)(%|×|[KMB](?!\w)| min\b| h\b| s\b| MiB\b)?(?![\w/])")
SCALE = {"%": 0.01, "K": 1e3, "M": 1e6, "B": 1e9, " min": 60.0, " h": 3600.0}


def _file_numbers(out) -> list[float]:
    """Every number the run's own files hold (stage.json, metrics, comparison, baseline, run.json, configs),
    per-example score lists left out (thousands of values in [0, 1] would match anything)."""
    found: list[float] = []

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, int | float):
            found.append(float(x))
        elif isinstance(x, dict):
            for k, v in x.items():
                if k not in ("p", "labels", "correct"):
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for f in out.rglob("*"):
        if "report" in f.relative_to(out).parts or f.name == "scores.json" or "model" in f.relative_to(out).parts:
            continue
        if f.suffix == ".json":
            walk(json.loads(f.read_text()))
        elif f.suffix == ".jsonl":
            for line in f.read_text().splitlines():
                walk(json.loads(line))
        elif f.suffix == ".yaml":
            walk(yaml.safe_load(f.read_text()))
    return found


def report_numbers(md: str) -> list[tuple[str, float, float]]:
    """(token, value, half-width of its rounding) for each number the report prints about the run: the
    Reproduce section (commands, dates), code spans, image links, and the header lines are left out."""
    body = md[:md.index("## Reproduce")]
    out = []
    for line in body.splitlines():
        if line.startswith(("Written ", "Task: ", "Status: ", "![", "- Speed:", "- ΔAUC vs reference:")):
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for phrase in FIXED_PROSE:
            line = line.replace(phrase, "")
        for m in NUMBER.finditer(line):
            digits, unit = m.group(1), (m.group(2) or "")
            scale = SCALE.get(unit, 1.0)
            decimals = len(digits.split(".")[1]) if "." in digits else 0
            out.append((m.group(0), float(digits.replace(",", "")) * scale, 0.5 * 10 ** -decimals * scale))
    return out


def assert_every_number_is_in_the_stage_files(out, md):
    pool = _file_numbers(out)
    candidates = pool + [x / 2**20 for x in pool]  # MiB columns print bytes / 2^20
    numbers = report_numbers(md)
    assert len(numbers) > 20
    for token, value, half in numbers:
        assert any(abs(x - value) <= half * (1 + 1e-9) + 1e-12 for x in candidates), \
            f"{token!r} in report.md is in no stage file"


def test_table_numbers_reference_and_pngs(tmp_path):
    out = fake_run(tmp_path)
    path = write_report(out)
    assert path == out / "report" / "report.md"
    md = path.read_text()
    assert_every_number_is_in_the_stage_files(out, md)
    rows = table(md, "## Evaluation `eval`")
    assert list(rows) == ["teacher", "teacher-sft", "pruned", "kd", "int8"]
    # retention is measured against the fine-tuned teacher (the starting one ranks at chance here)
    assert "**teacher-sft**" in md and "the fine-tuned teacher the students learn from (the starting teacher is at chance: AUC 0.4970" in md
    assert rows["teacher"]["AUC (95% CI)"] == "0.4970 (0.470–0.523) (chance)"
    assert rows["teacher"]["retention"] == "chance"
    assert rows["kd"]["retention"] == f"{100 * 0.686 / 0.700:.1f}%" == "98.0%"
    assert rows["int8"]["retention"] == f"{100 * 0.680 / 0.700:.1f}%"
    assert rows["int8"]["prefill ×"] == f"{4000 / 1010:.2f}×" and rows["int8"]["decode ×"] == f"{100 / 49:.2f}×"
    assert rows["kd"]["cand/s ×"] == f"{520 / 198:.2f}×" and rows["kd"]["cand/s"] == "520"
    assert rows["int8"]["non-emb params"] == "39.69M" and rows["int8"]["disk MiB"] == f"{120e6 / 2**20:.1f}"
    evaluated = json.loads((out / "eval" / "stage.json").read_text())["metrics"]
    params = {m: r["params"] for m, r in evaluated.items()}
    ratios = [params["teacher-sft"][k] / params["int8"][k] for k in ("non_embedding", "total")]
    assert rows["int8"]["fewer params (non-emb / total)"] == f"{ratios[0]:.1f}× / {ratios[1]:.1f}×" != "1.0× / 1.0×"
    assert rows["teacher-sft"]["fewer params (non-emb / total)"] == "—"  # the reference
    assert rows["teacher"]["params"] == "134.52M" and rows["pruned"]["stage"] == "prune (osscar)"
    assert rows["int8"]["stage"] == "quantize (int8)" and rows["kd"]["stage"] == "distill (kd)"
    # the same numbers as data
    run = read_run(out)
    comparisons(run)
    ev = next(s for s in run["stages"] if s["kind"] == "evaluate")
    assert ev["comparison"] == json.loads((out / "eval" / "comparison.json").read_text())  # written by the stage's code
    by = ev["comparison"]["models"]
    assert ev["comparison"]["reference"] == "teacher-sft"
    assert by["kd"]["retention"] == pytest.approx(0.98) and by["int8"]["speedup"]["candidates"] == pytest.approx(800 / 198)
    # stage times, the invocation, per-stage commands
    stages = table(md, "## Stages")
    assert stages["`kd`"]["wall time"] == "15.0 min" and stages["`int8`"]["status"] == "done"
    assert "non-embedding params 106.20M → 39.69M" in stages["`pruned`"]["notes"]
    assert "slimlm run 'my recipe.yaml' optim.lr=1e-4" in md and "2 CPUs, torch 2.13.0+cpu" in md
    assert f"slimlm quantize {out / 'kd' / 'model'} --scheme int8 --out" in md
    assert re.search(r"slimlm prune \S+teacher-sft/model .*--samples 64 .*--seed 0", md)
    # every image the report links is a real PNG, and the expected plots are there
    pngs = images(md)
    assert set(pngs) == {"quality-vs-speed-eval.png", "quality-vs-size-eval.png", "curves-teacher-sft.png",
                         "curves-kd.png"}
    for name in pngs:
        assert (out / "report" / name).read_bytes()[:8] == PNG_MAGIC, name
    # the resolved recipe beside the report loads as a recipe
    again = load_recipe(out / "report" / "recipe.yaml", [f"out={tmp_path / 'again'}"])
    assert [s.name for s in again.stages] == ["teacher-sft", "pruned", "kd", "int8", "eval"]


def test_a_named_reference_and_a_reference_at_chance(tmp_path):
    out = fake_run(tmp_path)
    rows = table(write_report(out, reference="teacher").read_text(), "## Evaluation")
    assert rows["kd"]["retention"] == "n/a"  # a ratio to a chance-level AUC means nothing
    assert rows["kd"]["prefill ×"] == "2.52×"  # speed-ups are still meaningful
    rows = table(write_report(out, reference="pruned").read_text(), "## Evaluation")
    assert rows["kd"]["retention"] == f"{100 * 0.686 / 0.650:.1f}%"
    with pytest.raises(SlimlmError, match="reference 'nope' is not an evaluated model"):
        write_report(out, reference="nope")


def test_speeds_measured_beside_other_work_are_flagged_not_compared(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []
    annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda ax, text, *a, **k: labels.append(text) or annotate(ax, text, *a, **k))
    out = fake_run(tmp_path)
    record = json.loads((out / "eval" / "stage.json").read_text())
    for name, share in {"teacher-sft": 0.97, "pruned": 0.85, "kd": 0.48}.items():
        record["metrics"][name]["speed"]["cpu_share"] = share
    (out / "eval" / "stage.json").write_text(json.dumps(record))
    md = write_report(out).read_text()
    # the quality-vs-speed plot's two panels mark kd's point, the size plot's two do not; no other point is marked
    names = [n for t in labels for n in t.split(", ")]
    assert names.count("kd‡") == 2 and names.count("kd") == 2 and sum("‡" in n for n in names) == 2
    rows = table(md, "## Evaluation")
    assert rows["kd"]["cand/s"] == "520‡" and rows["kd"]["decode tok/s"] == "91.0‡"
    assert rows["kd"]["cand/s ×"] == f"{520 / 198:.2f}×‡"
    assert rows["pruned"]["cand/s"] == "500" and rows["pruned"]["cand/s ×"] == f"{500 / 198:.2f}×"  # 85%: an idle machine
    assert rows["int8"]["cand/s"] == "800"  # no share recorded (an older stage, or a GPU): nothing to flag
    assert "48% (`kd`) of its threads' time" in md and "(`pruned`)" not in md
    # a flagged reference makes every speed-up doubtful, not the other models' own speeds
    record["metrics"]["teacher-sft"]["speed"]["cpu_share"] = 0.5
    (out / "eval" / "stage.json").write_text(json.dumps(record))
    rows = table(write_report(out).read_text(), "## Evaluation")
    assert rows["pruned"]["cand/s"] == "500" and rows["pruned"]["cand/s ×"] == f"{500 / 198:.2f}×‡"
    assert rows["teacher-sft"]["cand/s"] == "198‡" and rows["teacher-sft"]["cand/s ×"] == "1.00×‡"


def test_the_fine_tuned_teacher_is_the_reference_even_when_the_starting_one_is_above_chance(tmp_path):
    out = fake_run(tmp_path)
    record = json.loads((out / "eval" / "stage.json").read_text())
    record["metrics"]["teacher"]["metrics"].update(auc=0.60, auc_ci95=[0.57, 0.63])  # zero-shot, above chance
    (out / "eval" / "stage.json").write_text(json.dumps(record))
    md = write_report(out).read_text()
    rows = table(md, "## Evaluation")
    assert "**teacher-sft**" in md and "the starting teacher is the zero-shot point" in md
    assert rows["kd"]["retention"] == f"{100 * 0.686 / 0.700:.1f}%"
    assert rows["teacher"]["retention"] == f"{100 * 0.60 / 0.700:.1f}%"
    # without a fine-tuned teacher in the stage, the starting teacher is the reference
    del record["metrics"]["teacher-sft"], record["inputs"]["models"]["teacher-sft"]
    (out / "eval" / "stage.json").write_text(json.dumps(record))
    md = write_report(out).read_text()
    assert "**teacher**" in md and "the recipe's starting teacher" in md
    assert table(md, "## Evaluation")["kd"]["retention"] == f"{100 * 0.686 / 0.60:.1f}%"


def test_without_the_starting_teacher_the_fine_tuned_teacher_is_the_reference(tmp_path):
    out = fake_run(tmp_path)
    record = json.loads((out / "eval" / "stage.json").read_text())
    del record["metrics"]["teacher"]
    del record["inputs"]["models"]["teacher"]
    (out / "eval" / "stage.json").write_text(json.dumps(record))
    md = write_report(out).read_text()
    rows = table(md, "## Evaluation")
    assert "teacher" not in rows and "**teacher-sft**" in md and "the starting teacher was not evaluated" in md
    assert rows["kd"]["retention"] == f"{100 * 0.686 / 0.700:.1f}%"
    assert rows["int8"]["cand/s ×"] == f"{800 / 198:.2f}×"


def test_a_generative_run_reports_exact_match(tmp_path):
    out = fake_run(tmp_path)
    record = json.loads((out / "eval" / "stage.json").read_text())
    em = {"teacher": (0.0, [0.0, 0.02]), "teacher-sft": (0.40, [0.35, 0.45]), "pruned": (0.2, [0.16, 0.24]),
          "kd": (0.30, [0.26, 0.34]), "int8": (0.29, [0.25, 0.33])}
    for ref, (value, ci) in em.items():
        record["metrics"][ref]["metrics"] = {"n": 400, "exact_match": value, "exact_match_ci95": ci}
    (out / "eval" / "stage.json").write_text(json.dumps(record))
    md = write_report(out).read_text()
    rows = table(md, "## Evaluation")
    assert rows["kd"]["exact match (95% CI)"] == "0.3000 (0.260–0.340)" and rows["kd"]["retention"] == "75.0%"
    assert rows["teacher"]["retention"] == "chance" and "**teacher-sft**" in md
    assert "![exact match vs speed](quality-vs-speed-eval.png)" in md
    assert (out / "report" / "quality-vs-speed-eval.png").read_bytes()[:8] == PNG_MAGIC


def test_partial_run_reports_missing_not_zero(tmp_path):
    out = fake_run(tmp_path)
    # int8 was interrupted (no stage.json), so eval never finished: only its partial results.json exists
    (out / "int8" / "stage.json").unlink()
    (out / "eval" / "stage.json").unlink()
    partial = {k: v for k, v in RESULTS.items() if k not in ("int8",)}
    partial["kd"] = {k: v for k, v in RESULTS["kd"].items() if k not in ("speed", "disk_bytes")}
    (out / "eval" / "results.json").write_text(json.dumps(partial))
    log = out / "kd" / "metrics.jsonl"  # a torn last line (a writer killed mid-row) is skipped
    log.write_text(log.read_text() + '{"step": 7, "lo')
    (out / "kd" / "metrics.json").unlink()  # the final metrics then come from stage.json
    md = write_report(out).read_text()
    rows = table(md, "## Evaluation")
    assert rows["int8"]["AUC (95% CI)"] == "missing" and rows["int8"]["retention"] == "—"
    assert rows["kd"]["prefill tok/s"] == "—" and rows["kd"]["disk MiB"] == "—"
    assert rows["kd"]["cand/s"] == "31.0†"  # no probe: the evaluation's own throughput, flagged
    assert rows["kd"]["retention"] == "98.0%"
    assert "Missing (not evaluated: the stage did not finish): `int8`" in md
    assert "Status: 3 of 5 stages finished; `int8` (unfinished), `eval` (unfinished)." in md
    stages = table(md, "## Stages")
    assert stages["`int8`"]["wall time"] == "—" and stages["`eval`"]["notes"] == "4 of 5 models evaluated"
    for name in images(md):
        assert (out / "report" / name).read_bytes()[:8] == PNG_MAGIC


def test_without_run_json_or_recipe_the_directories_still_report(tmp_path):
    out = fake_run(tmp_path, run_json=False)
    (out / "kd" / "stage.json").unlink()
    (out / "kd" / "metrics.jsonl").unlink()
    md = write_report(out).read_text()
    assert "No invocation was recorded" in md and "`kd` (unfinished)" in md
    rows = table(md, "## Evaluation")
    assert rows["teacher"]["retention"] == "chance" and rows["kd"]["retention"] == "98.0%"
    assert "No training log rows yet." in md
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimlmError, match="not a slimlm run directory"):
        write_report(tmp_path / "empty")
    with pytest.raises(SlimlmError, match="no such run directory"):
        write_report(tmp_path / "nowhere")


def test_the_report_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import slimlm.report as report

    out = fake_run(tmp_path)
    (out / "report").mkdir()
    (out / "report" / "stale.png").write_bytes(b"old")
    write_report(out)
    assert not (out / "report" / "stale.png").exists()
    before = (out / "report" / "report.md").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "plot_curves", broken)
    with pytest.raises(RuntimeError):
        write_report(out)
    assert (out / "report" / "report.md").read_text() == before  # the last good report is untouched
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp dir left behind


# --------------------------------------------------------------------------- a tiny real recipe




def test_a_tiny_real_recipe_writes_a_report_whose_commands_reproduce_its_stages(recipe_world, tmp_path):
    root, data = recipe_world
    # every evaluation costs seconds (the bootstrap AUC interval), so: one per distill stage, two models
    train = {"max_steps": 2, "batch_size": 3, "eval_every": 0, "save_every": 0, "tensorboard": False}
    tree = {"out": str(tmp_path / "run"), "teacher": str(root / "teacher"),
            "task": {"name": "movielens-ranking", "data": str(data), "eval_limit": 6},
            "stages": [{"name": "teacher-sft", "kind": "distill", "config": {**train, "mode": "sft"}},
                       {"name": "student", "kind": "init", "config": {"layers": 1}},
                       {"name": "int8", "kind": "quantize", "config": {"scheme": "int8"}},
                       {"name": "eval", "kind": "evaluate", "models": ["teacher", "int8"],
                        "config": {"split": "val", "limit": 6, "speed": False}}]}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    res = runner.invoke(app, ["run", str(recipe), "seed=0"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    md = (out / "report" / "report.md").read_text()
    assert_every_number_is_in_the_stage_files(out, md)
    assert json.loads((out / "run.json").read_text())["invocations"][-1]["command"] == ["slimlm", "run", str(recipe), "seed=0"]
    assert shlex.join(["slimlm", "run", str(recipe), "seed=0"]) in md
    rows = table(md, "## Evaluation")
    assert list(rows) == ["teacher", "int8"]
    evals = json.loads((out / "eval" / "stage.json").read_text())["metrics"]
    assert rows["int8"]["AUC (95% CI)"].startswith(f"{evals['int8']['metrics']['auc']:.4f}")
    assert rows["int8"]["disk MiB"] == f"{evals['int8']['disk_bytes'] / 2**20:.2f}"
    assert set(images(md)) == {"quality-vs-speed-eval.png", "quality-vs-size-eval.png", "curves-teacher-sft.png"}
    for name in images(md):
        assert (out / "report" / name).read_bytes()[:8] == PNG_MAGIC
    # the printed per-stage commands rebuild the init and quantize stages bit for bit
    block = md[md.index("Each stage alone"):]
    for stage in ("student", "int8"):
        cmd = block.splitlines()[next(i for i, ln in enumerate(block.splitlines()) if ln.startswith(f"# {stage} ")) + 1]
        args = shlex.split(cmd)
        assert args[0] == "slimlm"
        res = runner.invoke(app, args[1:])
        assert res.exit_code == 0, res.output
        made = load_file(str(out.parent / "run-repro" / stage / "model" / "model.safetensors"))
        orig = load_file(str(out / stage / "model" / "model.safetensors"))
        assert made.keys() == orig.keys() and all((made[k] == orig[k]).all() for k in orig), stage
    # `slimlm report` rewrites it; bad directories fail with one line and exit code 2
    res = runner.invoke(app, ["report", str(out), "--reference", "int8"])
    assert res.exit_code == 0 and res.output.strip().endswith("report.md"), res.output
    md = (out / "report" / "report.md").read_text()
    assert "the named reference `int8`" in md
    # per-example scores beside the results; the report pairs each model with the reference on them
    scores = json.loads((out / "eval" / "scores.json").read_text())
    assert set(scores) == {"teacher", "int8"} and scores["teacher"]["labels"] == scores["int8"]["labels"]
    assert "scores" not in evals["int8"]
    for name in scores:
        assert roc_auc(scores[name]["labels"], scores[name]["p"]) == pytest.approx(evals[name]["metrics"]["auc"], abs=1e-6)
    delta = paired_auc_delta(scores["int8"]["labels"], scores["teacher"]["p"], scores["int8"]["p"])
    rows = table(md, "## Evaluation")
    assert rows["teacher"]["ΔAUC vs reference, paired (95% CI)"] == f"{delta[0]:+.4f} ({delta[1]:+.3f}–{delta[2]:+.3f})"
    assert rows["int8"]["ΔAUC vs reference, paired (95% CI)"] == "—"
    # ... and with the classic baseline, refitted and scored on exactly the rows the stage scored
    base_rows, base_p, _ = baseline_predictions("logistic", "val", data_dir=data)
    assert roc_auc([r.label for r in base_rows], base_p) == pytest.approx(run_baseline("logistic", "val", data_dir=data)["auc"])
    scored = movielens_examples("val", data_dir=data, limit=6, seed=0)
    assert [ex.label for ex in scored] == scores["int8"]["labels"]
    by_id = dict(zip([example_id(r) for r in base_rows], base_p, strict=True))
    base = [by_id[ex.id] for ex in scored]
    assert f"AUC {roc_auc(scores['int8']['labels'], base):.4f} (" in md
    rows = table(md, "### Against the classic baseline")
    assert list(rows) == ["teacher", "int8"]
    for name in rows:
        d = paired_auc_delta(scores[name]["labels"], scores[name]["p"], base)
        assert rows[name]["ΔAUC vs logistic, paired (95% CI)"] == f"{d[0]:+.4f} ({d[1]:+.3f}–{d[2]:+.3f})"
        assert rows[name]["at 95%"] == ("above" if d[1] > 0 else "below" if d[2] < 0 else
                                        "not distinguishable (the interval holds 0)")
    # no baseline data any more (and a stage from before the stage kept its baseline): the report says why
    for name in ("baseline.json", "comparison.json", "comparison-vs-int8.json"):
        (out / "eval" / name).unlink()
    run_json = json.loads((out / "run.json").read_text())
    run_json["recipe"]["task"]["data"] = str(tmp_path / "gone")
    (out / "run.json").write_text(json.dumps(run_json))
    res = runner.invoke(app, ["report", str(out), "--reference", "int8"])
    assert res.exit_code == 0, res.output
    md = (out / "report" / "report.md").read_text()
    section = md[md.index("### Against the classic baseline"):].splitlines()
    assert section[2].startswith("Not computed: ") and "gone" in section[2]
    res = runner.invoke(app, ["report", str(out), "--reference", "teacher-sft"])  # trained, never evaluated
    assert res.exit_code == 2 and "'teacher-sft' is not an evaluated model" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such run directory" in res.output


def test_a_stage_named_report_is_refused_before_any_work(recipe_world, tmp_path):
    root, data = recipe_world
    tree = {"out": str(tmp_path / "run"), "teacher": str(root / "teacher"),
            "task": {"name": "movielens-ranking", "data": str(data)},
            "stages": [{"name": "report", "kind": "init", "config": {"layers": 1}}]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    res = runner.invoke(app, ["run", str(recipe)])
    assert res.exit_code == 2 and "stage name 'report' is reserved" in res.output
    assert not (tmp_path / "run").exists()


def test_contrasts_pair_each_seed_and_pool_the_groups(tmp_path):
    """`slimlm report --contrast kd,int8:pruned,teacher-sft`: each pair's paired ΔAUC and the pooled Δ of the
    groups' mean AUC, written by the comparison code to the stage's contrast file, every number from it."""
    from slimlm.comparison import contrast
    from slimlm.evaluate import paired_group_auc_delta
    from slimlm.report import parse_contrasts

    out = fake_run(tmp_path)
    rng = __import__("numpy").random.default_rng(0)
    labels = [int(x) for x in rng.integers(0, 2, 300)]
    scores = {m: {"labels": labels, "p": [round(float(y * w + rng.random()), 4) for y in labels]}
              for m, w in (("kd", 0.6), ("int8", 0.55), ("pruned", 0.2), ("teacher-sft", 0.25))}
    (out / "eval" / "scores.json").write_text(json.dumps(scores))
    res = runner.invoke(app, ["report", str(out), "--contrast", "kd,int8:pruned,teacher-sft"])
    assert res.exit_code == 0, res.output
    md = (out / "report" / "report.md").read_text()
    assert_every_number_is_in_the_stage_files(out, md)
    saved = json.loads((out / "eval" / "contrast-kd+int8-vs-pruned+teacher-sft.json").read_text())
    pooled = paired_group_auc_delta(labels, [scores["kd"]["p"], scores["int8"]["p"]],
                                    [scores["pruned"]["p"], scores["teacher-sft"]["p"]])
    assert saved["pooled"] == list(pooled) and pooled[1] > 0
    assert [p["delta"] for p in saved["pairs"]] == [list(paired_auc_delta(labels, scores[a]["p"], scores[b]["p"]))
                                                    for a, b in (("kd", "pruned"), ("int8", "teacher-sft"))]
    rows = table(md, "### Contrasts")
    assert rows["pooled: mean of the first − mean of the second"]["ΔAUC (95% CI)"] == \
        f"{pooled[0]:+.4f} ({pooled[1]:+.3f}–{pooled[2]:+.3f})"
    assert rows["pooled: mean of the first − mean of the second"]["at 95%"] == "above"
    assert "`kd` − `pruned`" in md and "`int8` − `teacher-sft`" in md
    # exact match: the groups' mean hit rates, paired over the questions
    hits = {"a": [1, 0, 1, 1, 0, 1], "b": [1, 1, 1, 0, 0, 1], "c": [0, 0, 1, 0, 0, 1], "d": [0, 1, 0, 0, 0, 1]}
    c = contrast({m: {"correct": h} for m, h in hits.items()}, ["a", "b"], ["c", "d"])
    assert c["metric"] == "exact_match" and c["pooled"][0] == pytest.approx((4 / 6 + 4 / 6) / 2 - (2 / 6 + 2 / 6) / 2)
    # bad input: one line each, nothing written
    with pytest.raises(SlimlmError, match="no evaluate stage of this run scored all of these models"):
        write_report(out, contrasts=[(["kd"], ["nowhere"])])
    for spec in ("kd", "kd:", "kd:a:b", ",kd:int8"):
        with pytest.raises(SlimlmError, match="expected MODEL"):
            parse_contrasts([spec])
