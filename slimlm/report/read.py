"""Reading a run directory: the recipe, each stage's files, and each evaluate stage's comparisons.

What it reads (every piece optional; whatever is there is reported, whatever is not shows as missing):

- ``OUT/run.json``: the resolved recipe and each invocation (command, working directory, date, machine),
  written by :func:`slimlm.pipeline.record_invocation`, and the finished stages' total wall time;
- ``OUT/NAME/stage.json`` of each finished stage: wall seconds, inputs, metrics (for an evaluate stage
  ``{model ref: slimlm.evaluate.evaluate_dir(...)}``); an unfinished evaluate stage's ``results.json``;
- an evaluate stage's ``scores.json`` (per-example scores), ``baseline.json`` and ``comparison.json``
  (:mod:`slimlm.comparison`: the reference, retention, speed-ups, paired Δs, the classic baseline);
- distill stages: ``metrics.jsonl`` (training curves), ``metrics.json`` and ``config.yaml``.

A run written before evaluate stages kept their comparisons (or a named reference) gets its comparison file
written into the stage directory by the evaluate stage's own code (:func:`slimlm.comparison.ensure_comparison`);
nothing here computes a number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from slimlm import SlimlmError
from slimlm.comparison import compare, ensure_comparison, stage_origins
from slimlm.config import load_config
from slimlm.io import read_json_or_none as _read_json
from slimlm.io import read_jsonl as _read_jsonl
from slimlm.pipeline import MODEL_STAGES, REPORT_DIR, RUN_FILE, Recipe, plan


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _validated_steps(recipe: dict) -> dict[str, dict]:
    """The pipeline's own plan of the recipe (validated configs, resolved inputs), by stage name; empty
    when it no longer validates here (moved directories, another working directory)."""
    from pydantic import ValidationError

    try:
        return {s["name"]: s for s in plan(Recipe.model_validate(recipe))}
    except (SlimlmError, ValidationError):
        return {}


def read_run(run_dir: str | Path, recipe_path: str | Path | None = None) -> dict[str, Any]:
    """Everything the report shows, gathered from ``run_dir``; never fails on missing pieces.

    Returns ``{"run_dir", "recipe" (dict | None), "recipe_source", "invocations", "stages": [stage...]}``;
    each stage: name, kind, status ("done" | "unfinished" | "not started"), record (stage.json or None),
    inputs, config (dict or None), planned_models (evaluate), results (evaluate), curves (distill)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SlimlmError(f"{run_dir}: no such run directory")
    if (run_dir / REPORT_DIR / "stage.json").exists():
        raise SlimlmError(f"{run_dir / REPORT_DIR}: a stage named {REPORT_DIR!r} is in the way of the report; rename it")
    run_info = _read_json(run_dir / RUN_FILE) or {}
    recipe, source = None, None
    if recipe_path is not None:
        recipe, source = load_config(Recipe, recipe_path).model_dump(mode="json", by_alias=True), str(recipe_path)
    elif isinstance(run_info.get("recipe"), dict):
        recipe, source = run_info["recipe"], str(run_dir / RUN_FILE)
    steps = _validated_steps(recipe) if recipe else {}

    names: list[str] = []
    kinds: dict[str, str] = {}
    raw_configs: dict[str, dict] = {}
    for st in (recipe or {}).get("stages") or []:
        if isinstance(st, dict) and isinstance(st.get("name"), str):
            names.append(st["name"])
            kinds[st["name"]] = str(st.get("kind", "?"))
            raw_configs[st["name"]] = st
    # stage directories the recipe does not name (or no recipe at all): in the order they finished
    found = [d for d in run_dir.iterdir() if d.is_dir() and d.name not in names and d.name != REPORT_DIR
             and not d.name.startswith(".") and _looks_like_stage(d)]
    found.sort(key=lambda d: ((d / "stage.json").stat().st_mtime if (d / "stage.json").exists() else math.inf, d.name))
    names += [d.name for d in found]
    if not names:
        raise SlimlmError(f"{run_dir}: not a slimlm run directory (no {RUN_FILE} and no stage directories with "
                          "stage.json); pass the recipe's `out` directory")

    stages = []
    for i, name in enumerate(names):
        d = run_dir / name
        record = _read_json(d / "stage.json")
        record = record if isinstance(record, dict) else None
        kind = kinds.get(name) or (record or {}).get("kind") or _guess_kind(d)
        step = steps.get(name)
        status = "done" if record else ("unfinished" if d.is_dir() else "not started")
        stage: dict[str, Any] = {"name": name, "kind": kind, "status": status, "record": record, "dir": d,
                                 "inputs": (record or {}).get("inputs") or (step or {}).get("inputs") or {},
                                 "config": _stage_config(kind, d, step, record)}
        if kind == "evaluate":
            planned = list(stage["inputs"].get("models") or {})
            if not planned and name in raw_configs:  # the pipeline's default: the teacher and every earlier model
                planned = raw_configs[name].get("models") or ["teacher", *[n for n in names[:i]
                                                                          if kinds.get(n) in MODEL_STAGES]]
            results = (record or {}).get("metrics")
            if not isinstance(results, dict):
                results = _read_json(d / "results.json")  # partial results of an interrupted evaluation
            stage["results"] = results if isinstance(results, dict) else {}
            scores = _read_json(d / "scores.json")  # per-example ranking scores, for paired comparisons
            stage["scores"] = scores if isinstance(scores, dict) else {}
            stage["planned_models"] = planned + [r for r in stage["results"] if r not in planned]
        if kind == "distill":
            stage["curves"] = _read_jsonl(d / "metrics.jsonl")
            final = _read_json(d / "metrics.json")
            stage["final"] = final if isinstance(final, dict) else (record or {}).get("metrics") or {}
        stages.append(stage)
    return {"run_dir": run_dir, "recipe": recipe, "recipe_source": source, "info": run_info,
            "invocations": [v for v in run_info.get("invocations") or [] if isinstance(v, dict)], "stages": stages}


def _looks_like_stage(d: Path) -> bool:
    return any((d / f).exists() for f in ("stage.json", "metrics.jsonl", "results.json", "model", "config.yaml"))


def _guess_kind(d: Path) -> str:
    if (d / "metrics.jsonl").exists() or (d / "config.yaml").exists():
        return "distill"
    if (d / "results.json").exists():
        return "evaluate"
    return "?"


def _stage_config(kind: str, d: Path, step: dict | None, record: dict | None) -> dict | None:
    """The stage's resolved config: what the stage itself wrote, else the validated recipe entry."""
    if kind == "distill":
        cfg = _read_yaml(d / "config.yaml")
        if isinstance(cfg, dict):
            return cfg
    if step is not None:
        return step["config"].model_dump(mode="json")
    metrics = (record or {}).get("metrics") or {}
    if kind == "prune" and isinstance(metrics.get("config"), dict):
        return metrics["config"]
    return None




def comparisons(run: dict[str, Any], reference: str | None = None) -> None:
    """Attach each evaluate stage's comparison (``stage["comparison"]``), as its files hold it (made by the
    evaluate stage's code when missing, or for a named ``reference``)."""
    recipe = run.get("recipe") or {}
    origins = stage_origins([s for s in run["stages"] if s["kind"] in MODEL_STAGES], recipe.get("teacher", "teacher"))
    for st in run["stages"]:
        if st["kind"] != "evaluate":
            continue
        cfg = st.get("config") or {}
        if not st["dir"].is_dir():  # never started: nothing to compare, nothing to write
            st["comparison"] = compare({}, {}, origins, reference=reference)
            continue
        st["comparison"] = ensure_comparison(st["dir"], st["results"], st["scores"], origins, task=recipe.get("task") or {},
                                             split=cfg.get("split", "test"), limit=cfg.get("limit"),
                                             seed=recipe.get("seed", 0), reference=reference,
                                             planned=st["planned_models"])
