"""The pipeline: stages over model directories, resume, and recipes that fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from slimlm import SlimlmError
from slimlm.pipeline import builtin_recipes, check_shapes, load_recipe, plan, plan_table, run, stage_seconds


def recipe(root, data, out, stages=None) -> dict:
    train = {"max_steps": 2, "batch_size": 3, "eval_every": 0, "save_every": 1, "tensorboard": False,
             "optim": {"lr": 1e-3}}
    return {"out": str(root / out), "teacher": str(root / "teacher"),
            "task": {"name": "movielens-ranking", "data": str(data), "eval_limit": 6},
            "stages": stages or [
                {"name": "teacher-sft", "kind": "distill", "config": {**train, "mode": "sft"}},
                {"name": "student", "kind": "init", "config": {"layers": 1}},
                {"name": "kd", "kind": "distill", "teacher": "teacher-sft", "config": {**train, "mode": "kd"}},
                {"name": "eval", "kind": "evaluate", "models": ["teacher-sft", "kd"],
                 "config": {"split": "val", "limit": 6, "speed": False}},
            ]}


def write(path, tree):
    path.write_text(yaml.safe_dump(tree))
    return path


def test_stages_run_in_order_over_directories(recipe_world):
    root, data = recipe_world
    records = run(load_recipe(write(root / "r.yaml", recipe(root, data, "run"))))
    assert list(records) == ["teacher-sft", "student", "kd", "eval"]
    out = root / "run"
    student = json.loads((out / "student" / "model" / "config.json").read_text())
    assert student["num_hidden_layers"] == 1  # a real smaller model feeds the kd stage
    kd_cfg = yaml.safe_load((out / "kd" / "config.yaml").read_text())
    assert kd_cfg["student"] == str(out / "student" / "model")
    assert kd_cfg["teacher"] == str(out / "teacher-sft" / "model")
    evals = records["eval"]["metrics"]
    assert set(evals) == {"teacher-sft", "kd"} and 0.0 <= evals["kd"]["metrics"]["auc"] <= 1.0
    assert evals["kd"]["params"]["non_embedding"] < evals["teacher-sft"]["params"]["non_embedding"]


def test_a_speed_probe_beside_other_work_is_warned_of_and_recorded(recipe_world, monkeypatch):
    """The evaluate stage says when a model's speed probe got too little of the CPU (another job running), and
    keeps the probe's CPU share with the speeds, where the report flags them."""
    import slimlm.evaluate

    root, data = recipe_world
    for share, warned in ((0.45, True), (0.95, False)):
        monkeypatch.setattr(slimlm.evaluate, "speed", lambda model, tokens, share=share: {
            "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "candidates_per_s": 5.0, "cpu_share": share})
        stages = [{"name": "eval", "kind": "evaluate", "models": ["teacher"], "config": {"split": "val", "limit": 6}}]
        said = []
        records = run(load_recipe(write(root / "probe.yaml", recipe(root, data, f"probe{share}", stages))),
                      progress=said.append)
        assert records["eval"]["metrics"]["teacher"]["speed"]["cpu_share"] == share
        assert [m for m in said if "teacher's speed probe got 45%" in m] == (
            ["warning: teacher's speed probe got 45% of its threads' CPU time (other work is running): its speeds "
             "are flagged in the report, not compared"] if warned else [])


def test_prune_and_quantize_stages_make_smaller_models(recipe_world):
    root, data = recipe_world
    train = {"max_steps": 1, "batch_size": 3, "eval_every": 0, "save_every": 1, "tensorboard": False}
    stages = [
        {"name": "pruned", "kind": "prune", "config": {"mlp_keep": 0.5, "heads_keep": 2, "layers_keep": 2,
                                                      "samples": 4, "seq_len": 32, "multiple": 4}},
        {"name": "kd", "kind": "distill", "config": {**train, "mode": "kd"}},
        {"name": "int8", "kind": "quantize", "config": {"scheme": "int8"}},
        {"name": "int4", "kind": "quantize", "from": "kd",
         "config": {"scheme": "int4", "group_size": 32, "calib": "text", "samples": 2, "seq_len": 32}},
        {"name": "eval", "kind": "evaluate", "config": {"split": "val", "limit": 6, "speed": False}},
    ]
    r = load_recipe(write(root / "pq.yaml", recipe(root, data, "pq", stages)))
    planned = check_shapes(plan(r), fetch=False)  # the shapes planning follows are the ones the stages write
    table = {row["stage"]: row for row in plan_table(r, fetch=False)}  # `slimlm run --plan`: configs only
    records = run(r)
    out = root / "pq"
    teacher = json.loads((root / "teacher" / "config.json").read_text())
    pruned = json.loads((out / "pruned" / "model" / "config.json").read_text())
    for name in ("pruned", "kd"):
        made = json.loads((out / name / "model" / "config.json").read_text())
        keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim")
        assert {k: getattr(planned[name], k) for k in keys} == {k: made[k] for k in keys}, name
    assert pruned["num_hidden_layers"] == 2 and pruned["intermediate_size"] == teacher["intermediate_size"] // 2
    assert pruned["num_attention_heads"] == 2 and pruned["num_key_value_heads"] == 1
    assert (out / "pruned" / "model" / "prune_report.json").is_file()
    for name, fmt in (("int8", "int-quantized"), ("int4", "pack-quantized")):
        qcfg = json.loads((out / name / "model" / "config.json").read_text())["quantization_config"]
        assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == fmt
    evals = records["eval"]["metrics"]  # every model, quantized ones included, is evaluated
    assert set(evals) == {"teacher", "pruned", "kd", "int8", "int4"}
    for name, result in evals.items():  # the planned sizes are the loaded models' counts
        assert table["(start)" if name == "teacher" else name]["params"] == result["params"], name
    assert table["int4"]["kind"] == "quantize int4" and table["pruned"]["fewer"]["non_embedding"] > 1
    assert evals["int8"]["params"]["non_embedding"] == evals["kd"]["params"]["non_embedding"]
    assert evals["int8"]["disk_bytes"] < evals["kd"]["disk_bytes"]


def test_ranking_calibration_reads_the_recipes_own_movielens_copy(recipe_world, monkeypatch):
    """Prune and quantize stages that calibrate on movielens-ranking read the recipe's task.data, never the
    fetched asset (an offline machine, or a user's own copy of the data)."""
    import slimlm.assets

    def no_asset(*a, **k):
        raise AssertionError("calibration fetched the packaged MovieLens instead of the recipe's task.data")

    monkeypatch.setattr(slimlm.assets, "movielens_dir", no_asset)
    root, data = recipe_world
    calib = {"calib": "movielens-ranking", "samples": 2, "seq_len": 32}
    stages = [{"name": "pruned", "kind": "prune", "config": {"layers_keep": 2, "multiple": 4, **calib}},
              {"name": "int4", "kind": "quantize", "config": {"scheme": "int4", "group_size": 32, **calib}}]
    records = run(load_recipe(write(root / "cal.yaml", recipe(root, data, "cal", stages))))
    assert list(records) == ["pruned", "int4"]
    assert json.loads((root / "cal" / "int4" / "model" / "config.json").read_text())["quantization_config"]


def test_the_gpu_tiers_stage_recipe_runs_on_cpu(recipe_world, tmp_path):
    """The recipe the GPU tier runs on CUDA (tests/gpu: on-policy, cached-teacher KD, GPTQ / QuantEase / FP8),
    here on the CPU: the tree is valid and every stage runs, so on a GPU only the GPU can fail it."""
    from conftest import more_stages_recipe

    records = run(load_recipe(write(tmp_path / "more.yaml", more_stages_recipe(*recipe_world, tmp_path / "run", "cpu"))))
    results = records["eval"]["metrics"]
    assert set(results) == {"on-policy", "cached", "int4-gptq", "int4-qe", "fp8"}
    assert all(0.0 <= r["metrics"]["auc"] <= 1.0 for r in results.values())


def test_rerun_skips_finished_stages_and_resumes_an_interrupted_one(recipe_world):
    root, data = recipe_world
    path = write(root / "r2.yaml", recipe(root, data, "resume"))
    first = run(load_recipe(path))
    out = root / "resume"
    kd_weights = load_file(str(out / "kd" / "model" / "model.safetensors"))
    sft_mtime = (out / "teacher-sft" / "model" / "model.safetensors").stat().st_mtime_ns
    # simulate an interruption of the kd stage after its first checkpoint: no model, no marker
    (out / "kd" / "stage.json").unlink()
    (out / "eval" / "stage.json").unlink()
    for f in (out / "kd" / "model").iterdir():
        f.unlink()
    (out / "kd" / "model").rmdir()
    (out / "kd" / "metrics.json").unlink()
    said = []
    second = run(load_recipe(path), progress=said.append)
    assert "teacher-sft: done earlier, skipped" in said and "student: done earlier, skipped" in said
    assert (out / "teacher-sft" / "model" / "model.safetensors").stat().st_mtime_ns == sft_mtime
    again = load_file(str(out / "kd" / "model" / "model.safetensors"))
    for k in kd_weights:  # resumed from its checkpoint: the same weights as the uninterrupted run
        assert (again[k] == kd_weights[k]).all(), k
    assert second["eval"]["metrics"]["kd"]["metrics"]["auc"] == first["eval"]["metrics"]["kd"]["metrics"]["auc"]


def test_an_interrupted_evaluate_stage_keeps_the_models_it_finished(recipe_world):
    root, data = recipe_world
    path = write(root / "r4.yaml", recipe(root, data, "evalresume"))
    first = run(load_recipe(path))
    ev = root / "evalresume" / "eval"
    # interrupted while evaluating kd: teacher-sft's results (marked with a sentinel) are on disk, kd's not
    (ev / "stage.json").unlink()
    results = json.loads((ev / "results.json").read_text())
    results["teacher-sft"]["eval_seconds"] = -1.0
    results["teacher-sft"]["wall_seconds"] = 1000.0  # as if the first run had spent that long on it
    del results["kd"]
    (ev / "results.json").write_text(json.dumps(results))
    said = []
    second = run(load_recipe(path), progress=said.append)
    assert "evaluating teacher-sft: done earlier, kept" in said and "evaluating kd" in said
    evals = second["eval"]["metrics"]
    assert list(evals) == ["teacher-sft", "kd"] and evals["teacher-sft"]["eval_seconds"] == -1.0
    assert evals["kd"]["metrics"]["auc"] == first["eval"]["metrics"]["kd"]["metrics"]["auc"]
    assert set(json.loads((ev / "scores.json").read_text())) == {"teacher-sft", "kd"}
    # the stage's time counts both runs: the kept model's and the resumed run's
    assert evals["kd"]["wall_seconds"] > 0 and second["eval"]["seconds"] < 1000
    assert stage_seconds(second["eval"]) == pytest.approx(1000.0 + evals["kd"]["wall_seconds"])
    # left by a run with other settings (another fingerprint): everything is evaluated again
    (ev / "stage.json").unlink()
    (ev / "partial.json").write_text(json.dumps({"fingerprint": "other"}))
    said.clear()
    third = run(load_recipe(path), progress=said.append)
    assert "evaluating teacher-sft" in said and third["eval"]["metrics"]["teacher-sft"]["eval_seconds"] >= 0


def test_a_changed_finished_stage_is_an_error_not_a_silent_rerun(recipe_world):
    root, data = recipe_world
    tree = recipe(root, data, "changed", stages=[{"name": "student", "kind": "init", "config": {"layers": 1}}])
    run(load_recipe(write(root / "r3.yaml", tree)))
    tree["stages"][0]["config"]["layers"] = 2
    with pytest.raises(SlimlmError, match="different recipe entry"):
        run(load_recipe(write(root / "r3.yaml", tree)))


def test_fingerprints_survive_new_settings_and_accept_older_markers(recipe_world):
    """A setting added later (with a default) does not make finished stages look changed, and a stage
    finished by an older slimlm (fingerprint over every setting) is still recognised."""
    from pydantic import Field

    from slimlm.config import PruneConfig
    from slimlm.pipeline import _fingerprint

    class Newer(PruneConfig):
        added_later: int = Field(3, ge=0)

    step = {"kind": "prune", "inputs": {"from": "teacher"}, "config": PruneConfig(mlp_keep=0.5)}
    newer = {**step, "config": Newer(mlp_keep=0.5)}
    assert _fingerprint(newer, []) == _fingerprint(step, [])
    assert _fingerprint({**step, "config": PruneConfig(mlp_keep=0.25)}, []) != _fingerprint(step, [])
    assert _fingerprint(newer, [], legacy=True) != _fingerprint(step, [], legacy=True)

    root, data = recipe_world
    tree = recipe(root, data, "legacy", stages=[{"name": "student", "kind": "init", "config": {"layers": 1}}])
    r = load_recipe(write(root / "r4.yaml", tree))
    run(r)
    marker = root / "legacy" / "student" / "stage.json"
    prev = json.loads(marker.read_text())
    prev["fingerprint"] = _fingerprint(plan(r)[0], [], legacy=True)  # as slimlm <= 0.1.0 wrote it
    marker.write_text(json.dumps(prev))
    assert run(load_recipe(write(root / "r4.yaml", tree)))["student"]["fingerprint"] == prev["fingerprint"]


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["stages"][0]["config"].update(bogus=1), "teacher-sft .*config.bogus: unknown key"),
    (lambda t: t.update(bogus=1), "bogus: unknown key"),
    (lambda t: t["stages"][2].update(teacher="nowhere"), "'nowhere' is neither an earlier stage nor a model"),
    (lambda t: t["stages"][1].update({"from": "kd"}), "'kd' is neither an earlier stage"),  # a later stage
    (lambda t: t["stages"][2]["config"].update(student="x"), "config.student is set by the pipeline"),
    (lambda t: t["stages"].append({"name": "kd", "kind": "init", "config": {"layers": 1}}), "used twice"),
    (lambda t: t["stages"].append({"name": "e2", "kind": "evaluate", "models": ["eval"]}),
     "'eval' is an evaluate stage, which makes no model"),
    (lambda t: t.update(task={"name": "completion", "data": "c.jsonl"}),
     "evaluating task 'completion' in a pipeline is not supported yet"),
])
def test_bad_recipes_fail_before_any_work(recipe_world, mutate, message):
    root, data = recipe_world
    tree = recipe(root, data, "bad")
    mutate(tree)
    with pytest.raises(SlimlmError, match=message):
        load_recipe(write(root / "bad.yaml", tree))
    assert not (root / "bad").exists()


PRUNE = {"samples": 2, "seq_len": 32, "multiple": 1}


@pytest.mark.parametrize("stages, message", [
    # the second prune asks for more layers than the first left
    ([{"name": "small", "kind": "prune", "config": {"layers_keep": 2, **PRUNE}},
      {"name": "smaller", "kind": "prune", "config": {"layers_keep": 3, **PRUNE}}],
     r"stage smaller \(prune\), on stage small's model \(2 layers, hidden 64, 4 heads / 2 KV heads, MLP 128\): "
     r"--layers-keep 3: the model has only 2 layers"),
    # heads that break the GQA groups the first prune left (2 heads, 1 KV head: whole groups of 2)
    ([{"name": "small", "kind": "prune", "config": {"heads_keep": 2, "head_mode": "kv", **PRUNE}},
      {"name": "kd", "kind": "distill", "config": {"mode": "kd", "max_steps": 1}},
      {"name": "smaller", "kind": "prune", "config": {"heads_keep": 1, "head_mode": "kv", **PRUNE}}],
     r"stage smaller \(prune\), on stage kd's model .*2 heads / 1 KV heads.*breaks GQA"),
    # a width LlamaConfig refuses (hidden not a multiple of the 2 heads left): what the 20x recipe met at its save
    ([{"name": "small", "kind": "prune", "config": {"heads_keep": 2, "head_mode": "kv", **PRUNE}},
      {"name": "smaller", "kind": "prune", "config": {"hidden_keep": 33, **PRUNE}}],
     r"stage smaller \(prune\).*would not load in transformers.*multiple of the 2 heads"),
    ([{"name": "small", "kind": "prune", "config": {"layers_keep": 2, **PRUNE}},
      {"name": "init", "kind": "init", "config": {"layers": 3}}],
     r"stage init \(init\), on stage small's model .*: layers 3: the model has only 2 layers"),
    ([{"name": "int8", "kind": "quantize", "from": "teacher", "config": {"scheme": "int8"}},
      {"name": "after", "kind": "prune", "from": "@int8", "config": {"layers_keep": 2, **PRUNE}}],
     r"stage after \(prune\): input .*q8 is quantized; prune needs an unquantized model"),
    ([{"name": "int8", "kind": "quantize", "from": "teacher", "config": {"scheme": "int8"}},
      {"name": "after", "kind": "distill", "from": "@int8", "config": {"mode": "sft", "max_steps": 1}}],
     r"stage after \(distill\): input .*q8 is quantized; distill needs an unquantized model"),
])
def test_a_prune_the_earlier_stages_make_impossible_fails_before_any_work(recipe_world, stages, message):
    """Planning follows the models' shapes through the stages (configs only), so a later prune that cannot
    apply to what the earlier stages leave fails when the recipe is loaded, not when its stage starts."""
    root, data = recipe_world
    if stages[-1].get("from") == "@int8":  # a quantized model directory given by path
        from slimlm.quantize.api import QuantizeConfig, quantize_dir

        quantize_dir(str(root / "teacher"), root / "q8", QuantizeConfig(scheme="int8"))
        stages[-1]["from"] = str(root / "q8")
    with pytest.raises(SlimlmError, match=message):
        load_recipe(write(root / "shapes.yaml", recipe(root, data, "shapes", stages)))
    assert not (root / "shapes").exists()


def test_shapes_from_an_unconverted_builtin_teacher_are_followed_when_the_run_starts(recipe_world, monkeypatch):
    """Planning never downloads: with the built-in teacher not yet converted, loading the recipe cannot follow
    its shapes; ``run`` converts it first (as its first stage would) and fails before any stage."""
    import slimlm.assets
    import slimlm.loading

    root, data = recipe_world
    monkeypatch.setattr(slimlm.assets, "home", lambda: root / "empty-home")  # no converted teacher there
    monkeypatch.setattr(slimlm.loading, "teacher_dir", lambda: root / "teacher")  # the "conversion"
    tree = recipe(root, data, "builtin", [{"name": "small", "kind": "prune", "config": {"layers_keep": 2, **PRUNE}},
                                          {"name": "smaller", "kind": "prune", "config": {"layers_keep": 3, **PRUNE}}])
    tree["teacher"] = "teacher"
    r = load_recipe(write(root / "builtin.yaml", tree))  # nothing to follow yet, nothing fetched
    assert check_shapes(plan(r), fetch=False) == {"small": None, "smaller": None}
    with pytest.raises(SlimlmError, match="stage smaller .*the model has only 2 layers"):
        run(r)
    assert not (root / "builtin" / "small").exists()


def test_slimlm_run_plan_prints_each_models_shape_and_runs_nothing(recipe_world):
    from typer.testing import CliRunner

    from slimlm.cli import app

    root, data = recipe_world
    stages = [{"name": "small", "kind": "prune", "config": {"layers_keep": 2, "mlp_keep": 0.5, **PRUNE}},
              {"name": "kd", "kind": "distill", "config": {"mode": "kd", "max_steps": 1200, "batch_size": 4,
                                                          "grad_accum": 2}},
              {"name": "eval", "kind": "evaluate", "config": {"split": "val", "limit": 6}}]
    res = CliRunner().invoke(app, ["run", str(write(root / "plan.yaml", recipe(root, data, "plan", stages))), "--plan"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:2] == ["(start)", "teacher"] and "3 layers, hidden 64" in lines[1]
    assert lines[2].split()[:3] == ["small", "prune", "osscar"]
    assert "2 layers, hidden 64, 4 heads / 2 KV heads, MLP 64" in lines[3] and "x fewer)" in lines[3]
    assert lines[4].split()[:3] == ["kd", "distill", "kd"]
    assert f"from small (teacher: {root / 'teacher'}); 1,200 steps x 8 examples" in lines[4]
    assert lines[6].split()[:2] == ["eval", "evaluate"] and "from teacher, small, kd" in lines[6]
    assert not (root / "plan").exists()
    tree = recipe(root, data, "plan", stages)  # packed: a step's batch counts sequences of up to k candidates
    tree["task"]["candidates_per_prefix"] = 4
    rows = {r["stage"]: r for r in plan_table(load_recipe(write(root / "plan4.yaml", tree)), fetch=False)}
    assert rows["kd"]["input"].endswith("; 1,200 steps x 8 sequences of up to 4 candidates")


def test_a_model_whose_config_needs_its_own_code_is_not_followed_and_nothing_asks(recipe_world, monkeypatch):
    """Planning runs no model code: a config that needs ``trust_remote_code`` leaves its shapes unknown (its
    stages say what they support), with no interactive prompt even at a terminal."""
    import builtins

    root, data = recipe_world
    custom = root / "custom"
    custom.mkdir(exist_ok=True)
    (custom / "config.json").write_text(json.dumps({"model_type": "my_custom_lm", "hidden_size": 8,
                                                    "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("planning asked to run a model's own code"))
    tree = recipe(root, data, "custom-run", [{"name": "student", "kind": "init", "config": {"layers": 1}}])
    tree["teacher"] = str(custom)
    assert check_shapes(plan(load_recipe(write(root / "custom.yaml", tree))), fetch=False) == {"student": None}


def test_builtin_recipes_validate():
    pipelines = {n: p for n, p in builtin_recipes().items() if "stages" in yaml.safe_load(p.read_text())}
    assert {"movielens-ranking", "movielens-ranking-demo", "arithmetic-two-stage"} <= set(pipelines)
    for name, path in pipelines.items():
        r = load_recipe(path)  # every stage config and reference validates
        assert all(check_shapes(plan(r), fetch=True).values()), name  # and every model shape, from the teacher's
    for name, path in builtin_recipes().items():
        if name not in pipelines:  # single-stage configs are refused by `slimlm run` with a pointer
            with pytest.raises(SlimlmError, match="not a pipeline recipe"):
                load_recipe(path)


def test_benchmark_recipes_validate(tmp_path):
    """The experiment recipes BENCHMARKS.md runs (benchmarks/recipes): every stage config and reference."""
    paths = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "recipes").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        tree = yaml.safe_load(path.read_text())
        names = {st["name"] for st in tree["stages"]}
        for st in tree["stages"]:  # a continuation names an earlier run's model by path: validate it from the teacher
            if "from" in st and st["from"] not in names:
                st["from"] = "teacher"
        # the experiments on a fine-tuned teacher (the multi-item run's) name it by path; any teacher validates the rest
        steps = plan(load_recipe(write(tmp_path / path.name, tree), ["teacher=teacher"]))
        assert all(check_shapes(steps, fetch=True).values()), path.name
