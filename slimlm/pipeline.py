"""The pipeline: a recipe's stages run in order over model directories, with resume.

A recipe (YAML, validated before any work) names a starting model and a list of stages::

    out: runs/my-run
    teacher: teacher                 # the starting model: a directory, or 'teacher' (built-in)
    task: {name: movielens-ranking}  # shared by every stage that trains or evaluates
    stages:
      - {name: teacher-sft, kind: distill, config: {mode: sft, max_steps: 200}}
      - {name: student, kind: prune, from: teacher-sft, config: {mlp_keep: 0.25, layers_keep: 10}}
      - {name: kd, kind: distill, teacher: teacher-sft, config: {mode: two_stage, max_steps: 400}}
      - {name: int8, kind: quantize, config: {scheme: int8}}
      - {name: eval, kind: evaluate, models: [teacher, teacher-sft, student, kd, int8]}

Every model reference (``from``, ``teacher``, ``models``) is ``teacher`` (the recipe's starting
model), the name of an earlier stage (its output model), or a directory. ``from`` defaults to the
previous model-producing stage, ``teacher`` of a distill stage to the recipe's teacher.

Stage ``NAME`` writes ``OUT/NAME/`` (model-producing stages: ``OUT/NAME/model``) and, last, an atomic
``OUT/NAME/stage.json`` holding its fingerprint and metrics. Re-running the recipe skips a stage whose
``stage.json`` has the same fingerprint (its resolved settings that differ from the defaults and its
inputs' fingerprints, so a newer slimlm with more settings still accepts it); a stage
that was interrupted runs again — distill stages continue from their own checkpoint, one-shot stages
(prune, quantize) start over — and earlier outputs are never touched. A finished stage whose recipe
entry changed is an error (delete its directory to redo it), not a silent re-run.

Planning (:func:`plan`, :func:`check_shapes`) validates every stage config and reference and follows the
models' shapes through the stages from their configs alone, so a prune or init that cannot apply to what
the earlier stages leave is an error before the first stage runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from slimlm import SlimlmError, __version__
from slimlm.config import DistillConfig, PruneConfig, Strict, TaskConfig, load_config
from slimlm.io import atomic_write_json, read_json_or_none
from slimlm.placement import Placement, choose

Say = Callable[[str], None]  # called with a one-line status

REPORT_DIR = "report"  # OUT/report/: the run report (slimlm.report)
RUN_FILE = "run.json"  # OUT/run.json: the resolved recipe and each invocation
RESERVED = (REPORT_DIR, RUN_FILE)  # names under OUT/ that no stage may take


class InitConfig(Strict):
    """A student from the model's own decoder layers (evenly spaced), before any pruning solver."""

    layers: int = Field(ge=1)


class EvaluateConfig(Strict):
    split: str = "test"
    limit: int | None = Field(None, ge=1)  # examples (whole groups), seeded
    batch_size: int = Field(16, ge=1)
    speed: bool = True  # also measure prefill / decode tokens/s (see slimlm.evaluate.speed)


class Stage(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["distill", "init", "prune", "quantize", "evaluate"]
    from_: str | None = Field(None, alias="from")
    teacher: str | None = None  # distill only
    models: list[str] | None = None  # evaluate only
    config: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> Stage:
        if self.teacher is not None and self.kind != "distill":
            raise ValueError(f"stage {self.name}: 'teacher' is for distill stages")
        if self.models is not None and self.kind != "evaluate":
            raise ValueError(f"stage {self.name}: 'models' is for evaluate stages")
        return self


class Recipe(Strict):
    out: str
    teacher: str = "teacher"
    task: TaskConfig = TaskConfig()
    seed: int = 0
    # where every stage runs (slimlm.placement): None = CUDA with bf16 when torch sees a GPU, else CPU fp32
    device: str | None = None
    dtype: str | None = None  # compute dtype of the evaluate / quantize / prune stages (distill: its own dtype)
    stages: list[Stage] = Field(min_length=1)


MODEL_STAGES = ("distill", "init", "prune", "quantize")


def is_pipeline_recipe(path: str | Path) -> bool:
    """A pipeline recipe has a ``stages`` list; the other YAML files in recipes/ are single-stage configs."""
    import yaml

    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return True  # let load_config report the problem with its file:line message
    return not isinstance(tree, dict) or "stages" in tree


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    if path is not None and Path(path).is_file() and not is_pipeline_recipe(path):
        raise SlimlmError(f"{path}: no 'stages' list, so not a pipeline recipe (a single-stage config like this "
                          "one runs with `slimlm distill -c FILE`)")
    recipe = load_config(Recipe, path, overrides)
    check_shapes(plan(recipe), fetch=False)  # every stage config, reference and model shape before any work
    placement(recipe)  # and where it runs
    return recipe


def placement(recipe: Recipe) -> Placement:
    """The recipe's :class:`slimlm.placement.Placement` (a one-line error for one this machine cannot run)."""
    return choose(recipe.device, recipe.dtype)


# --------------------------------------------------------------------------- planning


def _resolve(recipe: Recipe, ref: str, earlier: dict[str, Stage], stage: str, field: str) -> str:
    """A model reference -> 'teacher', 'stage:NAME' or an existing directory path."""
    if ref == "teacher":
        return "teacher" if recipe.teacher == "teacher" else _existing_dir(recipe.teacher, "teacher")
    if ref in earlier:
        if earlier[ref].kind not in MODEL_STAGES:
            raise SlimlmError(f"stage {stage}: {field} {ref!r} is an {earlier[ref].kind} stage, which makes no model")
        return f"stage:{ref}"
    return _existing_dir(ref, f"stage {stage}: {field}")


def _existing_dir(ref: str, what: str) -> str:
    if not (Path(ref) / "config.json").is_file():
        raise SlimlmError(f"{what} {ref!r} is neither an earlier stage nor a model directory (no config.json)")
    return str(Path(ref))


def plan(recipe: Recipe) -> list[dict[str, Any]]:
    """Resolve references and validate every stage's config; nothing runs. Returns one dict per stage:
    name, kind, inputs (resolved refs), config (validated model)."""
    earlier: dict[str, Stage] = {}
    quantized: set[str] = set()
    last_model = "teacher"
    steps = []
    for st in recipe.stages:
        if st.name in earlier or st.name == "teacher":
            raise SlimlmError(f"stage name {st.name!r} is used twice (or is the reserved name 'teacher')")
        if st.name in RESERVED:
            raise SlimlmError(f"stage name {st.name!r} is reserved (OUT/{st.name} holds the run report); "
                              "rename the stage")
        where = f"stage {st.name} ({st.kind})"
        inputs: dict[str, Any] = {}
        if st.kind in MODEL_STAGES:
            src = st.from_ or last_model
            inputs["from"] = _resolve(recipe, src, earlier, st.name, "from")
            if src in quantized:
                raise SlimlmError(f"{where}: input {src!r} is quantized; {st.kind} needs an unquantized model "
                                  "(quantize last)")
        if st.kind == "distill":
            inputs["teacher"] = _resolve(recipe, st.teacher or "teacher", earlier, st.name, "teacher")
            if (st.teacher or "teacher") in quantized:
                raise SlimlmError(f"{where}: teacher {st.teacher!r} is quantized; distil from an unquantized teacher")
        if st.kind == "evaluate" and recipe.task.name == "completion":  # fail now, not after hours of training
            raise SlimlmError(f"{where}: evaluating task 'completion' in a pipeline is not supported yet "
                              "(ranking, text and arithmetic are); the distill stages report exact match on "
                              "the held-out val rows during training")
        if st.kind == "evaluate":
            refs = st.models or ["teacher", *[n for n, s in earlier.items() if s.kind in MODEL_STAGES]]
            inputs["models"] = {r: _resolve(recipe, r, earlier, st.name, "models") for r in refs}
        config = _stage_config(recipe, st, where)
        steps.append({"name": st.name, "kind": st.kind, "inputs": inputs, "config": config})
        earlier[st.name] = st
        if st.kind in MODEL_STAGES:
            last_model = st.name
        if st.kind == "quantize":
            quantized.add(st.name)
    return steps


def _describe(config: Any) -> str:
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {heads} heads / {kv} KV heads, "
            f"MLP {config.intermediate_size}")


def _source_config(ref: str, fetch: bool) -> Any | None:
    """The config of a recipe's starting model or a model directory; None for the built-in teacher when it
    is not converted yet and ``fetch`` is off (planning never downloads), and for a model whose config needs
    its own code (``trust_remote_code``: planning runs none; its stages say what they support)."""
    from transformers import AutoConfig

    from slimlm import assets
    from slimlm.loading import resolve_model

    if ref == "teacher" and not fetch and assets.converted_teacher() is None:
        return None
    path = resolve_model(ref)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)  # False: refuse without asking
    except (ValueError, OSError) as e:
        if "trust_remote_code" in str(e):
            return None
        raise SlimlmError(f"{path / 'config.json'}: {str(e).splitlines()[0]}") from e


def check_shapes(steps: list[dict[str, Any]], *, fetch: bool) -> dict[str, Any]:
    """Follow the models' shapes through the plan from their configs alone (no weights, seconds): each prune
    and init stage's targets are checked against the shape its input will have when the stage starts — a
    later prune that keeps more layers than an earlier one left, heads that break the GQA groups left, a
    width transformers' config refuses — so the recipe fails now, not after hours of earlier stages.
    ``fetch``: convert the built-in teacher if needed (:func:`run`); without it, stages downstream of an
    unconverted built-in teacher are not followed. Returns {stage name: its model's config (or None)}."""
    from slimlm.prune.api import planned_config
    from slimlm.prune.slice import depth_config

    configs: dict[str, Any] = {}
    for step in steps:
        name, kind = step["name"], step["kind"]
        if kind not in MODEL_STAGES:
            continue
        src = step["inputs"]["from"]
        config = configs.get(src[6:]) if src.startswith("stage:") else _source_config(src, fetch)
        if getattr(config, "quantization_config", None) is not None:  # a quantized directory (stages: plan())
            raise SlimlmError(f"stage {name} ({kind}): input {src} is quantized; {kind} needs an unquantized model "
                              "(quantize last)")
        if config is not None and kind in ("prune", "init"):
            origin = f"stage {src[6:]}'s model" if src.startswith("stage:") else src
            try:
                if kind == "prune":
                    config = planned_config(config, step["config"])[2]
                else:
                    if step["config"].layers > config.num_hidden_layers:
                        raise SlimlmError(f"layers {step['config'].layers}: the model has only "
                                          f"{config.num_hidden_layers} layers")
                    config = depth_config(config, step["config"].layers)
            except SlimlmError as e:
                raise SlimlmError(f"stage {name} ({kind}), on {origin} ({_describe(config)}): {e}") from None
        configs[name] = config  # distill keeps its student's shape; quantize its input's (it refuses to be pruned)
    return configs


def plan_table(recipe: Recipe, *, fetch: bool = True) -> list[dict[str, Any]]:
    """What ``slimlm run RECIPE --plan`` prints: the starting model and every stage with its input and, for
    the stages that make a model, the shape and parameter counts it will have (from the configs, on the
    meta device: nothing is loaded or run) and how many times fewer than the starting model's."""
    from slimlm.models import config_param_counts

    steps = plan(recipe)
    configs = check_shapes(steps, fetch=fetch)
    start = _source_config(recipe.teacher, fetch)

    def row(name: str, kind: str, source: str, config: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"stage": name, "kind": kind, "input": source}
        if config is not None:
            counts = config_param_counts(config)
            entry.update(shape=_describe(config), params=counts)
            if start_counts:
                entry["fewer"] = {k: start_counts[k] / counts[k] for k in ("non_embedding", "total") if counts[k]}
        return entry

    start_counts = config_param_counts(start) if start is not None else None
    rows = [row("(start)", "teacher", recipe.teacher, start)]
    for step in steps:
        inputs = step["inputs"]
        source = (", ".join(inputs["models"]) if step["kind"] == "evaluate"
                  else str(inputs["from"]).removeprefix("stage:"))
        cfg = step["config"]
        if step["kind"] == "distill":
            if cfg.mode != "sft":
                source += f" (teacher: {str(inputs['teacher']).removeprefix('stage:')})"
            k = cfg.task.candidates_per_prefix  # a packed sequence holds up to k candidates of one prefix
            source += (f"; {cfg.max_steps:,} steps x {cfg.batch_size * cfg.grad_accum} "  # per rank
                       + ("examples" if k == 1 else f"sequences of up to {k} candidates"))
        kind = step["kind"] + {"distill": f" {getattr(cfg, 'mode', '')}", "prune": f" {getattr(cfg, 'method', '')}",
                               "quantize": f" {getattr(cfg, 'scheme', '')}"}.get(step["kind"], "")
        rows.append(row(step["name"], kind, source, configs.get(step["name"])))
    return rows


def format_plan(rows: list[dict[str, Any]]) -> str:
    """:func:`plan_table`'s rows as the aligned text ``slimlm run --plan`` prints."""
    def size(r: dict[str, Any]) -> str:
        if "params" not in r:
            return "" if r["kind"] == "evaluate" else ("shape unknown before the stages run (a starting model not "
                                                       "fetched yet, or one whose config needs its own code)")
        p, fewer = r["params"], r.get("fewer", {})
        ratio = (f"  ({fewer['non_embedding']:.1f}x / {fewer['total']:.1f}x fewer)"
                 if fewer and r["stage"] != "(start)" and fewer["total"] != 1 else "")
        return (f"{r['shape']}; non-embedding {p['non_embedding'] / 1e6:.2f}M, total {p['total'] / 1e6:.2f}M"
                + ratio)

    width = max(len(r["stage"]) for r in rows)
    kinds = max(len(r["kind"]) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{r['stage']:{width}}  {r['kind']:{kinds}}  from {r['input']}")
        if size(r):
            lines.append(f"{'':{width}}  {'':{kinds}}  {size(r)}")
    return "\n".join(lines)


def _stage_config(recipe: Recipe, st: Stage, where: str):
    try:
        if st.kind == "distill":  # student / teacher / out are the pipeline's to set
            for key in ("student", "teacher", "out"):
                if key in st.config:
                    raise SlimlmError(f"{where}: config.{key} is set by the pipeline; use the stage's "
                                      "'from' / 'teacher' instead")
            task = {**recipe.task.model_dump(), **st.config.get("task", {})}
            return DistillConfig.model_validate({"seed": recipe.seed, **st.config, "task": task,
                                                 "student": "-", "teacher": "-", "out": "-"})
        if st.kind in ("prune", "quantize"):
            cfg = dict(st.config)
            if cfg.get("calib") == recipe.task.name == "movielens-ranking" and recipe.task.data:
                cfg.setdefault("calib_data", recipe.task.data)  # calibrate on the recipe's own MovieLens copy
        if st.kind == "prune":
            return PruneConfig.model_validate({"seed": recipe.seed, **cfg})
        if st.kind == "init":
            return InitConfig.model_validate(st.config)
        if st.kind == "quantize":
            from slimlm.quantize.api import QuantizeConfig

            cfg = QuantizeConfig.model_validate(cfg)
            cfg.check()
            return cfg
        return EvaluateConfig.model_validate(st.config)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise SlimlmError(f"{where}: config.{loc}: {msg}") from None


# --------------------------------------------------------------------------- running


def _fingerprint(step: dict[str, Any], input_prints: list[str], *, legacy: bool = False) -> str:
    """What a finished stage is compared by: its kind, inputs, upstream fingerprints and the settings
    that differ from the defaults — so a newer slimlm that adds a setting (with a default) still accepts
    the stages an older one finished. ``legacy``: every setting (how slimlm <= 0.1.0 fingerprinted)."""
    config = step["config"].model_dump(mode="json", exclude_defaults=not legacy)
    blob = json.dumps({"kind": step["kind"], "config": config, "inputs": step["inputs"],
                       "upstream": input_prints}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def machine() -> dict[str, Any]:
    """The facts of the machine a stage runs on (recorded with each invocation)."""
    import torch

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "slimlm": __version__,
                            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def record_invocation(out: str | Path, recipe: Recipe, command: list[str] | None = None) -> None:
    """Write the resolved recipe and this invocation (appended to earlier ones) into ``OUT/run.json``.

    ``command``: the argv as typed (None: called from Python). Stage names the report needs are refused
    earlier, by :func:`plan`."""
    out = Path(out)
    path = out / RUN_FILE
    previous = read_json_or_none(path) or {}
    invocation = {"command": command, "cwd": os.getcwd(), "date": now(), "machine": machine()}
    invocations = [*(previous.get("invocations") or []), invocation]
    atomic_write_json(path, {"recipe": recipe.model_dump(mode="json", by_alias=True), "invocations": invocations})


def stage_seconds(record: dict) -> float | None:
    """A finished stage's wall time: its own ``seconds`` (the run that finished it), or when that is
    longer (the stage was interrupted and resumed) the time over all its runs: a distill stage's trainer
    ``train_seconds``, an evaluate stage's per-model ``wall_seconds`` added up."""
    from slimlm.comparison import num

    own = num(record.get("seconds"))
    metrics = record.get("metrics") or {}
    total = num(metrics.get("train_seconds"))
    if record.get("kind") == "evaluate":
        walls = [num(r.get("wall_seconds")) for r in metrics.values() if isinstance(r, dict)]
        total = sum(w for w in walls if w is not None) if any(w is not None for w in walls) else None
    return max(own, total) if own is not None and total is not None else own


def run(recipe: Recipe, progress: Say | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage; return {stage name: its stage.json}. ``OUT/run.json`` records the
    invocation (``command``: the argv as typed) first. Each ``stage.json`` holds ``seconds`` (this run) and
    ``seconds_all_runs`` (:func:`stage_seconds`); the report (:mod:`slimlm.report`) is the caller's to write."""
    out = Path(recipe.out)
    steps = plan(recipe)
    check_shapes(steps, fetch=True)  # the built-in teacher's shape too: the first stage would fetch it anyway
    where = placement(recipe)
    record_invocation(out, recipe, command)  # also refuses stage names the report needs, before any work
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    say = progress or (lambda _msg: None)

    def model_dir(ref: str) -> str:
        return ref if not ref.startswith("stage:") else str(out / ref[6:] / "model")

    def prints(refs) -> list[str]:
        return [done[r[6:]]["fingerprint"] for r in refs if isinstance(r, str) and r.startswith("stage:")]

    for step in steps:
        name, kind, inputs = step["name"], step["kind"], step["inputs"]
        refs = list(inputs.get("models", {}).values()) + [v for k, v in inputs.items() if k != "models"]
        fp = _fingerprint(step, prints(refs))
        stage_dir = out / name
        marker = stage_dir / "stage.json"
        if marker.exists():
            prev = json.loads(marker.read_text())
            if prev.get("fingerprint") in (fp, _fingerprint(step, prints(refs), legacy=True)):
                say(f"{name}: done earlier, skipped")
                done[name] = prev
                _record_total(out, done)
                continue
            raise SlimlmError(f"{marker}: stage {name!r} finished with a different recipe entry or inputs; "
                              f"delete {stage_dir} to run it again")
        say(f"{name}: running ({kind})")
        stage_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cfg = step["config"]
        if kind == "distill":
            metrics = _distill(cfg, model_dir(inputs["from"]), model_dir(inputs["teacher"]), stage_dir, where)
        elif kind == "init":
            metrics = _init(model_dir(inputs["from"]), stage_dir / "model", cfg)
        elif kind == "prune":
            from slimlm.prune.api import prune_dir

            metrics = prune_dir(model_dir(inputs["from"]), stage_dir / "model", cfg, placement=where)
        elif kind == "quantize":
            from slimlm.quantize.api import quantize_dir
            from slimlm.tasks import RANKING_TASKS

            metrics = quantize_dir(model_dir(inputs["from"]), stage_dir / "model", cfg, placement=where,
                                   ranking=recipe.task.name in RANKING_TASKS)
        else:
            metrics = _evaluate(recipe, {r: model_dir(p) for r, p in inputs["models"].items()}, cfg, stage_dir, say,
                                fp, steps, where)
        record = {"name": name, "kind": kind, "fingerprint": fp, "seconds": round(time.perf_counter() - t0, 1),
                  "inputs": {k: v for k, v in inputs.items()}, "metrics": metrics}
        record["seconds_all_runs"] = stage_seconds(record)
        atomic_write_json(marker, record)
        done[name] = record
        _record_total(out, done)
    return done


def _record_total(out: Path, done: dict[str, dict[str, Any]]) -> None:
    """``run.json``'s ``total_stage_seconds``: the finished stages' wall times (over all their runs) added up."""
    run_info = read_json_or_none(out / RUN_FILE) or {}
    seconds = [r.get("seconds_all_runs", stage_seconds(r)) for r in done.values()]
    run_info["total_stage_seconds"] = round(sum(x for x in seconds if x is not None), 1)
    atomic_write_json(out / RUN_FILE, run_info)


def _distill(cfg: DistillConfig, student: str, teacher: str, stage_dir: Path, where: Placement) -> dict[str, Any]:
    from slimlm.distill.trainer import train

    # an sft stage needs no teacher (the trainer would load it only for the held-out KL); the recipe's device
    # unless the stage names its own (the student's weight dtype is the stage's: fp32 masters, autocast on CUDA)
    cfg = cfg.model_copy(update={"student": student, "teacher": teacher if cfg.mode != "sft" else None,
                                 "out": str(stage_dir), "device": cfg.device or str(where.device)})
    DistillConfig.model_validate(cfg.model_dump())  # the real paths, checked again
    train(cfg)
    return json.loads((stage_dir / "metrics.json").read_text())


def _init(source: str, out_dir: Path, cfg: InitConfig) -> dict[str, Any]:
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.models import param_counts, save_model
    from slimlm.prune.slice import evenly_spaced, keep_layers

    model = load_model(source)
    keep = evenly_spaced(model.config.num_hidden_layers, cfg.layers)
    small = keep_layers(model, keep)
    save_model(small, load_tokenizer(source), out_dir, extra={"slimlm_init.json": {"source": source, "kept_layers": keep}})
    return {"kept_layers": keep, "layers": len(keep), "params": param_counts(small)}


def origins(steps: list[dict[str, Any]], teacher: str) -> dict[str, dict[str, Any]]:
    """Where each stage's model came from (:func:`slimlm.comparison.stage_origins`), from the plan."""
    from slimlm.comparison import stage_origins

    return stage_origins([{**s, "config": s["config"].model_dump(mode="json")} for s in steps], teacher)


def _evaluate(recipe: Recipe, models: dict[str, str], cfg: EvaluateConfig, stage_dir: Path,
              say: Say, fingerprint: str, steps: list[dict[str, Any]], where: Placement) -> dict[str, Any]:
    """Evaluate each model, writing results as they come, and after each the stage's comparisons
    (:mod:`slimlm.comparison`: reference, retention, speed-ups, paired Δs, the classic baseline on the same
    rows); a re-run of an interrupted stage keeps the models it already evaluated (same stage fingerprint,
    same model directory) and does the rest."""
    from slimlm.comparison import contended, speeds, write_baseline, write_comparison
    from slimlm.evaluate import evaluate_dir
    from slimlm.loading import resolve_model

    results, scores = _partial_evaluation(stage_dir, fingerprint)
    atomic_write_json(stage_dir / "partial.json", {"fingerprint": fingerprint})
    task = recipe.task.model_dump(mode="json")
    baseline = write_baseline(stage_dir, task, cfg.split, cfg.limit, recipe.seed)
    came_from = origins(steps, recipe.teacher)

    def compare() -> None:
        write_comparison(stage_dir, results, scores, came_from, baseline=baseline, planned=list(models))

    kept: set[str] = set()
    for ref, path in models.items():
        if ref in results and results[ref].get("model") == str(resolve_model(path)):  # scores.json is written first
            say(f"evaluating {ref}: done earlier, kept")
            kept.add(ref)
            continue
        say(f"evaluating {ref}")
        t0 = time.perf_counter()
        results[ref] = evaluate_dir(path, recipe.task, split=cfg.split, limit=cfg.limit, batch_size=cfg.batch_size,
                                    seed=recipe.seed, speed_probe=cfg.speed, placement=where)
        # load, scoring and speed probes: the report adds these up, so a resumed stage counts every run of it
        results[ref]["wall_seconds"] = round(time.perf_counter() - t0, 2)
        probe = speeds(results[ref])
        if contended(probe):
            say(f"warning: {ref}'s speed probe got {probe['cpu_share']:.0%} of its threads' CPU time (other work is "
                "running): its speeds are flagged in the report, not compared")
        if "scores" in results[ref]:  # per-example scores go beside the results (the report pairs models)
            scores[ref] = results[ref].pop("scores")
            atomic_write_json(stage_dir / "scores.json", scores)
        atomic_write_json(stage_dir / "results.json", results)  # partial results survive an interruption
        compare()
    if all(ref in kept for ref in models):  # nothing evaluated in this run: the comparison of the kept results
        compare()
    return results


def _partial_evaluation(stage_dir: Path, fingerprint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Results and scores an interrupted run of this same stage left, or empty ones."""
    try:
        if json.loads((stage_dir / "partial.json").read_text()).get("fingerprint") != fingerprint:
            return {}, {}
        results = json.loads((stage_dir / "results.json").read_text())
        scores_file = stage_dir / "scores.json"
        scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
    except (OSError, ValueError):
        return {}, {}
    return results, scores


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped in slimlm/recipes/ (pipeline recipes have a ``stages`` list)."""
    root = Path(__file__).parent / "recipes"
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def recipe_path(name_or_path: str) -> Path:
    """A recipe file, or the built-in recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    raise SlimlmError(f"{name_or_path}: no such recipe file or built-in recipe (built-in: {', '.join(builtin)})")
