"""The run report: ``OUT/report/report.md`` plus PNG plots, from a finished or partly finished run.

The report only reads and formats: every number in it was written by the stage that measured it (see
:mod:`slimlm.report.read` for the files) — the evaluate stage's comparisons (reference, retention,
speed-ups, paired Δs, the classic baseline) come from :mod:`slimlm.comparison`. By job:

- :mod:`slimlm.report.read`: reading a run directory;
- :mod:`slimlm.report.tables`: number formats, the model and baseline tables;
- :mod:`slimlm.report.plots`: quality vs speed / size, training curves;
- :mod:`slimlm.report.reproduce`: the commands that reproduce each stage.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from slimlm import SlimlmError, __version__
from slimlm.comparison import num, write_contrast
from slimlm.io import atomic_dir
from slimlm.pipeline import REPORT_DIR, stage_seconds
from slimlm.report.plots import plot_curves
from slimlm.report.read import comparisons, read_run
from slimlm.report.reproduce import render_reproduce
from slimlm.report.tables import (
    MISSING,
    _count,
    _mib,
    _seconds,
    _table,
    render_contrasts,
    render_evaluation,
    stage_label,
)

__all__ = ["parse_contrasts", "read_run", "write_report"]


def parse_contrasts(specs: list[str]) -> list[tuple[list[str], list[str]]]:
    """``["A,B:C,D", ...]`` (``slimlm report --contrast``) -> ``[(["A", "B"], ["C", "D"]), ...]``."""
    out = []
    for spec in specs:
        sides = [[m.strip() for m in side.split(",")] for side in spec.split(":")]
        if len(sides) != 2 or not all(m for side in sides for m in side):
            raise SlimlmError(f"--contrast {spec!r}: expected MODEL[,MODEL...]:MODEL[,MODEL...], "
                              "e.g. kd-s0,kd-s1:sft-s0,sft-s1")
        out.append((sides[0], sides[1]))
    return out


def write_report(run_dir: str | Path, recipe_path: str | Path | None = None, *, reference: str | None = None,
                 contrasts: list[tuple[list[str], list[str]]] = ()) -> Path:
    """Write ``RUN_DIR/report/`` (report.md, PNG plots, the resolved recipe) atomically; return report.md's path.

    ``recipe_path``: the recipe to report against when the run has no ``run.json`` (or to override it);
    ``reference``: the model ref that retention and speed-ups are measured against (default: see
    :mod:`slimlm.comparison`); ``contrasts``: groups of models against groups (``(["kd-s0", "kd-s1"], ["sft-s0",
    "sft-s1"])``), paired per pair and pooled, in every evaluate stage that scored them all
    (:func:`slimlm.comparison.contrast`, written to the stage's ``contrast-*.json``)."""
    run = read_run(run_dir, recipe_path)
    evaluations = [s for s in run["stages"] if s["kind"] == "evaluate"]
    known = sorted({r for s in evaluations for r in s["results"]})
    if reference is not None and evaluations and reference not in known:
        raise SlimlmError(f"reference {reference!r} is not an evaluated model of this run (evaluated: "
                          f"{', '.join(known) or 'none'})")
    for group, reference_group in contrasts:
        if not any(all(m in s["scores"] for m in group + reference_group) for s in evaluations):
            raise SlimlmError(f"contrast {','.join(group)}:{','.join(reference_group)}: no evaluate stage of this run "
                              f"scored all of these models (evaluated: {', '.join(known) or 'none'})")
    comparisons(run, reference)
    for ev in evaluations:
        ev["contrasts"] = [write_contrast(ev["dir"], ev["scores"], g, r) for g, r in contrasts
                           if all(m in ev["scores"] for m in g + r)]
    run_dir = run["run_dir"]
    with atomic_dir(run_dir / REPORT_DIR) as tmp:
        lines = _render(run, tmp)
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
    return run_dir / REPORT_DIR / "report.md"


def _render(run: dict, tmp: Path) -> list[str]:
    run_dir, stages, recipe = run["run_dir"], run["stages"], run["recipe"] or {}
    task = recipe.get("task") or {}
    done = [s for s in stages if s["status"] == "done"]
    lines = [f"# slimlm run report: `{run_dir}`", ""]
    lines.append(f"Written {datetime.now().astimezone().isoformat(timespec='seconds')} by slimlm {__version__} "
                 f"from the files in `{run_dir}`.")
    if task:
        lines.append(f"Task: `{task.get('name')}` (data: {task.get('data') or 'built-in'}).")
    status = f"{len(done)} of {len(stages)} stages finished"
    rest = [f"`{s['name']}` ({s['status']})" for s in stages if s["status"] != "done"]
    lines += [f"Status: {status}" + (f"; {', '.join(rest)}." if rest else "."), ""]

    if not any(s["kind"] == "evaluate" for s in stages):
        lines += ["## Models", "", "No evaluate stage in this run: no model table or quality plots.", ""]
    for ev in [s for s in stages if s["kind"] == "evaluate"]:
        lines += render_evaluation(ev, run, tmp)
        lines += render_contrasts(ev.get("contrasts") or [])
    lines += _render_curves([s for s in stages if s["kind"] == "distill"], tmp)
    lines += _render_stages(run)
    lines += render_reproduce(run, tmp)
    return lines


def _render_curves(distills: list[dict], tmp: Path) -> list[str]:
    lines = ["## Training curves", ""] if distills else []
    for st in distills:
        cfg, final = st.get("config") or {}, st.get("final") or {}
        facts = [stage_label(st), st["status"]]
        if cfg.get("max_steps"):
            last = max((num(r.get("step")) or 0 for r in st["curves"]), default=0)
            facts.append(f"step {last:.0f} of {cfg['max_steps']}")
        losses = [r["loss"] for r in st["curves"] if num(r.get("loss")) is not None]
        if losses:
            facts.append(f"last loss {losses[-1]:.4g}")
        finals = [f"{k} {v:.4g}" for k, v in final.items() if k.startswith("eval_") and num(v) is not None]
        if finals:
            facts.append("final " + ", ".join(finals))
        if num(final.get("median_tokens_per_s")) is not None:  # written by the trainer over every logged step
            facts.append(f"median {final['median_tokens_per_s']:,.0f} train tokens/s")
        lines += [f"### `{st['name']}`", "", "; ".join(facts) + ".", ""]
        png = f"curves-{st['name']}.png"
        if plot_curves(st["name"], st["curves"], tmp / png):
            lines += [f"![{st['name']} training curves]({png})", ""]
        else:
            lines += ["No training log rows yet.", ""]
    return lines


def _render_stages(run: dict) -> list[str]:
    rows = []
    for st in run["stages"]:
        rec = st.get("record") or {}
        inputs = _ref_name(st["inputs"].get("from"))
        if st["kind"] == "distill" and st["inputs"].get("teacher") and (st.get("config") or {}).get("mode") != "sft":
            inputs = f"{inputs} (teacher: {_ref_name(st['inputs']['teacher'])})"
        if st["kind"] == "evaluate":
            inputs = ", ".join(st.get("planned_models") or []) or None
        rows.append([f"`{st['name']}`", stage_label(st), inputs or MISSING, st["status"],
                     _seconds(_stage_time(rec)), _stage_note(st)])
    lines = ["## Stages", ""] + _table(["stage", "kind", "input", "status", "wall time", "notes"], rows, right={4})
    total = num(run["info"].get("total_stage_seconds"))
    if total is None:  # a run from before run.json kept the total
        total = sum(_stage_time(s.get("record") or {}) or 0 for s in run["stages"])
    lines += ["", f"Wall time of the finished stages: {_seconds(total)} (from each stage.json; a stage skipped on a "
              "re-run keeps the time of the run that made it; a distill stage that was interrupted and resumed "
              "counts every run of it, each up to its last checkpoint; an evaluate stage, every model it "
              "finished).", ""]
    return lines


def _stage_time(record: dict) -> float | None:
    """The stage's ``seconds_all_runs`` as the pipeline wrote it (older stage.json files: worked out the same
    way by :func:`slimlm.pipeline.stage_seconds`)."""
    if "seconds_all_runs" in record:
        return num(record["seconds_all_runs"])
    return stage_seconds(record)


def _ref_name(ref):
    return ref[6:] if isinstance(ref, str) and ref.startswith("stage:") else ref


def _stage_note(st: dict) -> str:
    m = (st.get("record") or {}).get("metrics") or {}
    if st["kind"] == "prune" and isinstance(m.get("params_before"), dict) and isinstance(m.get("params_after"), dict):
        b, a = m["params_before"].get("non_embedding"), m["params_after"].get("non_embedding")
        arch = m.get("arch_after") or {}
        shape = ", ".join(f"{k} {arch[k]}" for k in ("num_layers", "intermediate_size", "num_heads", "num_kv_heads")
                          if k in arch)
        return f"non-embedding params {_count(num(b))} → {_count(num(a))}" + (f"; {shape}" if shape else "")
    if st["kind"] == "quantize" and num(m.get("weights_bytes")) is not None:
        src = num(m.get("source_weights_bytes"))
        note = f"{m.get('quantized_layers', '?')} layers; weights {_mib(m['weights_bytes'] / 2**20)} MiB"
        return note + (f" (from {_mib(src / 2**20)} MiB)" if src else "")
    if st["kind"] == "init" and isinstance(m.get("kept_layers"), list):
        return f"kept layers {m['kept_layers']}"
    if st["kind"] == "evaluate":
        cmp = st.get("comparison") or {}
        planned = cmp.get("planned") if cmp.get("planned") is not None else len(st.get("planned_models") or [])
        return f"{cmp.get('evaluated', 0)} of {planned} models evaluated"
    if st["kind"] == "distill" and st["status"] != "done" and st.get("curves"):
        return f"log reaches step {max(num(r.get('step')) or 0 for r in st['curves']):.0f}"
    return ""
