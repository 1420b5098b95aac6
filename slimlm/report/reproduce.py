"""The report's "Reproduce" section: each invocation as typed, and each stage alone as a CLI command that
reads the same inputs as the pipeline stage did."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from slimlm.pipeline import REPORT_DIR, machine
from slimlm.report.tables import stage_label


def _model_path(ref: str, run_dir: Path) -> str:
    return str(run_dir / ref[6:] / "model") if ref.startswith("stage:") else ref


def stage_commands(stage: dict, run: dict, repro: Path, config_file: Path | None) -> tuple[list[str], list[str]]:
    """(commands, notes): the CLI equivalent of one stage, writing under ``repro`` and reading the same
    inputs the pipeline stage read. ``config_file`` is where the stage's full config is saved (prune)."""
    name, kind, cfg = stage["name"], stage["kind"], stage.get("config")
    run_dir = run["run_dir"]
    src = stage["inputs"].get("from")
    src = _model_path(src, run_dir) if isinstance(src, str) else None
    out = str(repro / name / "model")
    q = shlex.quote
    if kind == "distill":
        config = stage["dir"] / "config.yaml"
        if not config.exists():
            return [], ["no config.yaml was written (the stage never started training)"]
        return [f"slimlm distill -c {q(str(config))} out={q(str(repro / name))}"], []
    if kind == "evaluate":
        return _eval_commands(stage, run)
    if src is None or cfg is None:
        return [], ["its inputs or config are unknown (no stage.json and no recipe that validates here)"]
    if kind == "init":
        kept = ((stage.get("record") or {}).get("metrics") or {}).get("kept_layers")
        layers = f"--keep {','.join(map(str, kept))}" if isinstance(kept, list) else f"--layers {cfg.get('layers')}"
        return [f"slimlm init-student {q(src)} {layers} --out {q(out)}"], []
    if kind == "prune":
        flags = {"method": cfg["method"], "head-mode": cfg["head_mode"], "depth-metric": cfg["depth_metric"],
                 "calib": cfg["calib"], "samples": cfg["samples"], "seq-len": cfg["seq_len"],
                 "multiple": cfg["multiple"], "damping": cfg["damping"], "batch-size": cfg["batch_size"],
                 "seed": cfg["seed"]}  # the CLI's own defaults would override the config file for these
        text = " ".join(f"--{k} {q(str(v))}" for k, v in flags.items())
        return [f"slimlm prune {q(src)} --out {q(out)} -c {q(str(config_file))} {text}"], []
    if kind == "quantize":
        parts = [f"slimlm quantize {q(src)} --scheme {cfg['scheme']} --out {q(out)}"]
        if cfg.get("calib") is not None:
            parts.append(f"--calib {q(str(cfg['calib']))}")
        parts.append(f"--samples {cfg['samples']} --seq-len {cfg['seq_len']}")
        if cfg["scheme"] == "int4":
            parts.append(f"--group-size {cfg['group_size']} --{'symmetric' if cfg['symmetric'] else 'asymmetric'} "
                         f"--method {cfg['method']}")
            if cfg.get("act_order"):
                parts.append("--act-order")
        elif cfg["scheme"] == "int8" and cfg.get("method") == "quantease":
            parts.append("--method quantease")
        if cfg.get("method") == "quantease":
            parts.append(f"--quantease-iters {cfg.get('quantease_iters', 25)}")
        if cfg.get("smooth"):
            parts.append("--smooth")
        if cfg.get("static_activations"):
            parts.append("--static-activations")
        ignore = cfg.get("ignore") or []
        parts += [f"--ignore {q(i)}" for i in ignore] if ignore else ["--ignore none"]
        parts.append(f"--dtype {cfg['dtype']} --batch-size {cfg['batch_size']}")
        notes = [f"{k}={cfg[k]} has no CLI flag (the recipe stage is the reproduction)"
                 for k, default in (("damp", 0.01), ("smooth_alpha", 0.5)) if cfg.get(k, default) != default]
        return [" ".join(parts)], notes
    return [], [f"no CLI equivalent for a {kind!r} stage"]


def _eval_commands(stage: dict, run: dict) -> tuple[list[str], list[str]]:
    from slimlm.evaluate import EVAL_TASKS

    cfg = stage.get("config") or {}
    task = (run.get("recipe") or {}).get("task") or {}
    seed = (run.get("recipe") or {}).get("seed", 0)
    if task.get("name") not in EVAL_TASKS:
        return [], [f"`slimlm eval` has no task {task.get('name')!r}; the evaluate stage is the reproduction"]
    models = stage["inputs"].get("models") or {}
    q = shlex.quote
    cmds = []
    for ref in stage.get("planned_models") or []:
        path = models.get(ref) or ("teacher" if ref == "teacher" else f"stage:{ref}")
        parts = [f"slimlm eval {q(_model_path(path, run['run_dir']))} --task {task['name']}"]
        if task.get("data"):
            parts.append(f"--data {q(str(task['data']))}")
        parts.append(f"--split {cfg.get('split', 'test')}")
        if cfg.get("limit"):
            parts.append(f"--limit {cfg['limit']}")
        parts.append(f"--batch-size {cfg.get('batch_size', 16)} --seed {seed}")
        cmds.append(" ".join(parts))
    return cmds, ["`slimlm eval` gives the task metric; the speed columns come from the evaluate stage's probe "
                  "(slimlm.evaluate.speed), which only the pipeline runs."]


def render_reproduce(run: dict, tmp: Path) -> list[str]:
    run_dir, recipe = run["run_dir"], run["recipe"]
    q = shlex.quote
    lines = ["## Reproduce", ""]
    invocations = run["invocations"]
    if invocations:
        lines += ["As invoked (each run or resume of this directory):", "", "```"]
        for inv in invocations:
            cmd = inv.get("command")
            text = shlex.join(cmd) if isinstance(cmd, list) else "# slimlm.pipeline.run(...) from Python"
            lines += [f"# {inv.get('date', '?')}", f"cd {q(str(inv.get('cwd', '.')))}", text]
        lines += ["```", ""]
        m = invocations[-1].get("machine") or {}
        lines += [f"Machine (last invocation): {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}, "
                  f"Python {m.get('python', '?')}, {m.get('platform', '?')}"
                  + (f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU")
                  + f"; load average at start {m.get('loadavg', '?')}; slimlm {m.get('slimlm', '?')}.", ""]
    else:
        m = machine()
        lines += ["No invocation was recorded (no run.json).", "",
                  f"Machine writing this report: {m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}, "
                  f"{m['platform']}.", ""]
    repro = Path(f"{run_dir}-repro")
    if recipe:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        cwd = invocations[-1].get("cwd") if invocations else None
        lines += ["The whole run again, into a fresh directory, from the resolved recipe (overrides applied; saved "
                  "beside this report as `recipe.yaml`; relative paths are relative to the directory it ran in):", "",
                  "```"] + ([f"cd {q(cwd)}"] if cwd else []) + [
                  f"slimlm run {q(str(run_dir / REPORT_DIR / 'recipe.yaml'))} out={q(str(repro))}", "```", ""]
    lines += [f"Each stage alone, reading the same inputs as the pipeline stage did and writing under `{repro}`:", "",
              "```"]
    notes = []
    for st in run["stages"]:
        config_file = None
        if st["kind"] == "prune" and st.get("config"):
            config_file = run_dir / REPORT_DIR / "configs" / f"{st['name']}.yaml"
            (tmp / "configs").mkdir(exist_ok=True)
            (tmp / "configs" / f"{st['name']}.yaml").write_text(yaml.safe_dump(st["config"], sort_keys=False))
        cmds, why = stage_commands(st, run, repro, config_file)
        lines.append(f"# {st['name']} ({stage_label(st)}, {st['status']})")
        lines += cmds or ["# (no command)"]
        notes += [f"- `{st['name']}`: {w}" for w in why]
    lines += ["```", ""] + notes + ([""] if notes else [])
    lines += ["This report again: `slimlm report " + q(str(run_dir)) + "`", ""]
    return lines
