"""The run report: ``OUT/report/report.md`` plus PNG plots, from a finished or partly finished run.

What it reads (every piece optional; whatever is there is reported, whatever is not shows as missing):

- ``OUT/run.json``: the resolved recipe and each invocation (command, working directory, date, machine),
  written by :func:`record_invocation` when ``slimlm run`` starts;
- ``OUT/NAME/stage.json`` of each finished stage: wall seconds, inputs, metrics (for an evaluate stage
  ``{model ref: slimlm.evaluate.evaluate_dir(...)}``); an unfinished evaluate stage's ``results.json``;
  a ranking evaluate stage's ``scores.json`` (per-example P(pos) of each model: paired ΔAUC vs the reference,
  and, for the built-in MovieLens task, vs the classic logistic baseline refitted on the same rows);
- distill stages: ``metrics.jsonl`` (training curves) and ``config.yaml`` (the resolved stage config).

The numbers in the model table, per evaluated model m against the reference model r:

    retention = q(m) / q(r)     for a higher-is-better task metric q (AUC, exact match, accuracy)
              = q(r) / q(m)     for perplexity (lower is better), so 100 % means "as good as r"
    speed-up  = s(m) / s(r)     for s = prefill tokens/s, decode tokens/s, ranking candidates/s

The reference is the first evaluated fine-tuned teacher (a ``distill`` stage with ``mode: sft`` trained
from ``teacher``) that is not at chance (a 95 % interval reaching AUC 0.5 or exact match 0): the model the
students learn from and the one a student replaces, as in the paper. Without one it is the recipe's
starting teacher. ``reference=NAME`` picks it explicitly. A ratio to a chance-level score means nothing:
the report says which reference it used, why, and marks retention "n/a" where the reference is at chance.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), imported only
when a report is written.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from slimlm import SlimlmError, __version__
from slimlm.io import atomic_dir, atomic_write_json

REPORT_DIR = "report"
RUN_FILE = "run.json"
RESERVED = (REPORT_DIR, RUN_FILE)  # names under OUT/ that no stage may take
MISSING = "—"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    chance: float | None  # the score of a model that knows nothing (None: no fixed chance level)


# The first of these that a model's metrics hold is its task metric.
METRICS = (
    Metric("auc", "AUC", True, 0.5),
    Metric("exact_match", "exact match", True, 0.0),
    Metric("accuracy", "accuracy", True, None),
    Metric("perplexity", "perplexity", False, None),
)


def _num(x: Any) -> float | None:
    """A finite number, or None (absent, null, a string, NaN)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def primary_metric(metrics: dict | None) -> Metric | None:
    for m in METRICS:
        if _num((metrics or {}).get(m.key)) is not None:
            return m
    return None


def _ci(metric: Metric, metrics: dict | None) -> tuple[float, float] | None:
    """The metric's 95 % interval (``KEY_ci95``: bootstrap for AUC, Wilson for exact match), if recorded."""
    ci = (metrics or {}).get(f"{metric.key}_ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_num(c) is not None for c in ci):
        return float(ci[0]), float(ci[1])
    return None


def at_chance(metric: Metric, metrics: dict | None) -> bool:
    """True when the score is indistinguishable from knowing nothing: its 95 % interval reaches the
    chance level (AUC 0.5, exact match 0), or without an interval it is no better than chance. Metrics
    without a chance level (perplexity) never are."""
    value = _num((metrics or {}).get(metric.key))
    if metric.chance is None or value is None:
        return False
    ci = _ci(metric, metrics)
    return (ci[0] if ci else value) <= metric.chance


def retention(value: float | None, ref: float | None, metric: Metric) -> float | None:
    """value / ref for higher-is-better metrics, ref / value for lower-is-better; None when undefined."""
    if value is None or ref is None:
        return None
    num, den = (value, ref) if metric.higher_is_better else (ref, value)
    return num / den if den > 0 else None


def speedup(value: float | None, ref: float | None) -> float | None:
    return value / ref if value is not None and ref is not None and ref > 0 else None


# --------------------------------------------------------------------------- recording an invocation


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "slimlm": __version__,
                            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def record_invocation(out: str | Path, recipe, command: list[str] | None = None) -> None:
    """Write the resolved recipe and this invocation (appended to earlier ones) into ``OUT/run.json``.

    ``recipe`` is a :class:`slimlm.pipeline.Recipe`; ``command`` the argv as typed (None: called from Python).
    (Stage names the report needs are refused earlier, by :func:`slimlm.pipeline.plan`.)"""
    out = Path(out)
    path = out / RUN_FILE
    previous = _read_json(path) or {}
    invocation = {"command": command, "cwd": os.getcwd(), "date": _now(), "machine": machine()}
    invocations = [*(previous.get("invocations") or []), invocation]
    atomic_write_json(path, {"recipe": recipe.model_dump(mode="json", by_alias=True), "invocations": invocations})


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- reading a run directory


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL log; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _validated_steps(recipe: dict) -> dict[str, dict]:
    """The pipeline's own plan of the recipe (validated configs, resolved inputs), by stage name; empty
    when it no longer validates here (moved directories, another working directory)."""
    from pydantic import ValidationError

    from slimlm.pipeline import Recipe, plan

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
        from slimlm.config import load_config
        from slimlm.pipeline import Recipe

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
                planned = raw_configs[name].get("models") or ["teacher", *[n for n in names[:i] if kinds.get(n) in
                                                                          ("distill", "init", "prune", "quantize")]]
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
    return {"run_dir": run_dir, "recipe": recipe, "recipe_source": source,
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


# --------------------------------------------------------------------------- the model table


def stage_label(stage: dict | None) -> str:
    """'distill (kd)', 'prune (osscar)', 'quantize (int4 g128 gptq)', 'init (8 layers)', ..."""
    if stage is None:
        return "?"
    kind, cfg = stage["kind"], stage.get("config") or {}
    metrics = (stage.get("record") or {}).get("metrics") or {}
    if kind == "distill" and cfg.get("mode"):
        return f"distill ({cfg['mode']})"
    if kind == "prune":
        method = cfg.get("method") or metrics.get("method")
        return f"prune ({method})" if method else "prune"
    if kind == "quantize":
        scheme = cfg.get("scheme") or metrics.get("scheme")
        if scheme == "int4":
            return f"quantize (int4 g{cfg.get('group_size', '?')} {cfg.get('method', '')})".replace(" )", ")")
        return f"quantize ({scheme})" if scheme else "quantize"
    if kind == "init":
        layers = metrics.get("kept_layers")
        n = len(layers) if isinstance(layers, list) else cfg.get("layers")
        return f"init ({n} layers)" if n else "init"
    return kind


def _model_kind(ref: str, run: dict) -> str:
    if ref == "teacher":
        return "teacher (start)"
    stage = next((s for s in run["stages"] if s["name"] == ref), None)
    return stage_label(stage) if stage else "directory"


def _is_finetuned_teacher(ref: str, run: dict) -> bool:
    stage = next((s for s in run["stages"] if s["name"] == ref), None)
    if stage is None or stage["kind"] != "distill" or (stage.get("config") or {}).get("mode") != "sft":
        return False
    src = stage["inputs"].get("from")
    start = (run.get("recipe") or {}).get("teacher", "teacher")
    return src == "teacher" or (isinstance(src, str) and start != "teacher" and Path(src) == Path(start))


def choose_reference(results: dict[str, dict], run: dict, reference: str | None) -> tuple[str | None, str]:
    """(reference model ref or None, a sentence saying why)."""
    def metrics(ref):
        return (results.get(ref) or {}).get("metrics") or {}

    if reference is not None:
        if reference not in results:
            return None, f"the named reference `{reference}` was not evaluated in this stage"
        m = primary_metric(metrics(reference))
        chance = m is not None and at_chance(m, metrics(reference))
        return reference, f"the named reference `{reference}`" + (" (at chance: retention n/a)" if chance else "")
    def finetuned_teacher() -> str | None:
        for ref in results:
            mr = primary_metric(metrics(ref))
            if _is_finetuned_teacher(ref, run) and mr is not None and not at_chance(mr, metrics(ref)):
                return ref
        return None

    ref = finetuned_teacher()
    if ref is not None:  # the model the students learn from, and the one a student replaces
        if "teacher" not in results:
            return ref, f"`{ref}`, the fine-tuned teacher (the starting teacher was not evaluated)"
        m = primary_metric(metrics("teacher"))
        start = (f"the starting teacher is at chance: {m.label} {_metric_text(m, metrics('teacher'))}"
                 if m is not None and at_chance(m, metrics("teacher")) else "the starting teacher is the zero-shot point")
        return ref, f"`{ref}`, the fine-tuned teacher the students learn from ({start})"
    if "teacher" in results:
        m = primary_metric(metrics("teacher"))
        if m is None or not at_chance(m, metrics("teacher")):
            return "teacher", "the recipe's starting teacher"
        why = f"the starting teacher is at chance ({m.label} {_metric_text(m, metrics('teacher'))})"
        return "teacher", f"the recipe's starting teacher; {why}, so retention is n/a (name a reference with --reference)"
    return None, "no reference: the starting teacher was not evaluated (name one with --reference)"


def model_rows(results: dict[str, dict], planned: list[str], run: dict, reference: str | None) -> list[dict]:
    """One row per planned model: its numbers, retention and speed-ups vs ``reference`` (None where absent)."""
    ref = results.get(reference) if reference else None
    ref_metrics = (ref or {}).get("metrics") or {}
    ref_metric = primary_metric(ref_metrics)
    ref_chance = ref_metric is not None and at_chance(ref_metric, ref_metrics)
    ref_speed = _speeds(ref or {})
    rows = []
    for name in planned:
        res = results.get(name)
        row: dict[str, Any] = {"model": name, "kind": _model_kind(name, run), "evaluated": isinstance(res, dict),
                               "reference": name == reference}
        res = res if isinstance(res, dict) else {}
        params = res.get("params") or {}
        metrics = res.get("metrics") or {}
        metric = primary_metric(metrics)
        disk = _num(res.get("disk_bytes"))
        row.update({"params_total": _num(params.get("total")), "params_non_embedding": _num(params.get("non_embedding")),
                    "disk_mib": disk / 2**20 if disk is not None else None, "metric": metric,
                    "value": _num(metrics.get(metric.key)) if metric else None, "metrics": metrics,
                    "at_chance": metric is not None and at_chance(metric, metrics), **_speeds(res)})
        same = metric is not None and ref_metric is not None and metric.key == ref_metric.key and not ref_chance
        row["retention"] = retention(row["value"], _num(ref_metrics.get(metric.key)), metric) if same else None
        row["speedup"] = {k: speedup(row[k], ref_speed[k]) for k in ("prefill", "decode", "candidates")}
        rows.append(row)
    return rows


def _speeds(result: dict) -> dict[str, Any]:
    """Prefill / decode tokens/s and candidates/s from the speed probe; candidates/s falls back to the
    evaluation's own throughput (data handling and batching included), flagged as such."""
    speed = result.get("speed") or {}
    cands = _num(speed.get("candidates_per_s"))
    from_eval = cands is None and _num((result.get("metrics") or {}).get("candidates_per_s")) is not None
    if from_eval:
        cands = _num(result["metrics"]["candidates_per_s"])
    return {"prefill": _num(speed.get("prefill_tokens_per_s")), "decode": _num(speed.get("decode_tokens_per_s")),
            "candidates": cands, "candidates_from_eval": from_eval}


# --------------------------------------------------------------------------- formatting


def _count(n: float | None) -> str:
    if n is None:
        return MISSING
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def _mib(x: float | None) -> str:
    return MISSING if x is None else (f"{x:.1f}" if x >= 100 else f"{x:.2f}")


def _rate(x: float | None) -> str:
    return MISSING if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _times(x: float | None) -> str:
    return MISSING if x is None else f"{x:.2f}×"


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.1f}%"


def _seconds(s: float | None) -> str:
    if s is None:
        return MISSING
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _metric_text(metric: Metric, metrics: dict) -> str:
    value = _num(metrics.get(metric.key))
    if value is None:
        return MISSING
    text = f"{value:.2f}" if metric.key == "perplexity" else f"{value:.4f}"
    ci = _ci(metric, metrics)
    if ci:
        text += f" ({ci[0]:.3f}–{ci[1]:.3f})"
    return text


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]], right: set[int] | range = range(0)) -> list[str]:
    """A markdown table; columns whose index is in ``right`` are right-aligned (numbers)."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------- plots


def _figure(panels: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def plot_quality(rows: list[dict], metric: Metric, path: Path, axes_spec: list[tuple[str, str, bool]],
                 title: str, baseline: tuple[str, float] | None = None) -> bool:
    """Scatter the task metric (y) against each (row key, x label, log x) panel; one labelled point per
    model, the reference starred; ``baseline`` = (label, value) draws a dashed line. Returns False (and
    writes nothing) when no model has both numbers."""
    have = [[r for r in rows if r["value"] is not None and r["metric"] == metric and (r[k] or 0) > 0]
            for k, _, _ in axes_spec]
    if not any(have):
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    short = FuncFormatter(lambda v, _pos: _short(v))
    fig, axes = _figure(len(axes_spec))
    for ax, (key, xlabel, logx), points in zip(axes, axes_spec, have, strict=True):
        for r in points:
            ax.scatter([r[key]], [r["value"]], marker="*" if r["reference"] else "o", s=140 if r["reference"] else 45,
                       color=_colour(r["kind"]), zorder=3)
        for (x, y), names, below in _label_groups([(r[key], r["value"], r["model"]) for r in points], logx):
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, -11 if below else 4),
                        fontsize=8)
        if baseline is not None:
            ax.axhline(baseline[1], color="tab:brown", linestyle="--", linewidth=1, label=baseline[0])
        if metric.chance is not None:
            ax.axhline(metric.chance, color="grey", linestyle=":", linewidth=1, label="chance")
        if baseline is not None or metric.chance is not None:
            ax.legend(loc="best", fontsize=8)
        if logx:
            ax.set_xscale("log")
            xs = [r[key] for r in points]
            ax.xaxis.set_major_formatter(short)
            if xs and max(xs) / min(xs) < 10:  # under a decade there may be no major tick: label 2x and 5x too
                ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
                ax.xaxis.set_minor_formatter(short)
            else:
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)")
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return True


def _short(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _label_groups(points: list[tuple[float, float, str]], logx: bool, near: float = 0.04):
    """[((x, y), names, below)]: points closer than ``near`` (a fraction of the plotted range, per axis)
    share one label, so models that coincide (the teacher and its fine-tuned copy) stay readable; a label
    whose left neighbour at the same height would run into it goes below its point."""
    if not points:
        return []
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    xs, ys = [fx(p[0]) for p in points], [p[1] for p in points]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[float, float, float, float, list[str]]] = []
    for (x, y, name), gx in zip(points, xs, strict=True):
        for g in groups:
            if abs(g[0] - gx) / sx < near and abs(g[1] - y) / sy < near:
                g[4].append(name)
                break
        else:
            groups.append((gx, y, x, y, [name]))
    placed: list[tuple[float, float, bool]] = []
    out = []
    for gx, gy, x, y, names in sorted(groups, key=lambda g: g[0]):
        below = any(0 <= (gx - px) / sx < 0.3 and abs(gy - py) / sy < 0.06 and not pb for px, py, pb in placed)
        placed.append((gx, gy, below))
        out.append(((x, y), names, below))
    return out


def _colour(kind: str) -> str:
    for prefix, colour in (("teacher", "black"), ("distill", "tab:blue"), ("prune", "tab:orange"),
                           ("init", "tab:olive"), ("quantize", "tab:green")):
        if kind.startswith(prefix):
            return colour
    return "tab:purple"


EVAL_ORDER = ("eval_auc", "eval_exact_match", "eval_accuracy", "eval_kl", "eval_log_loss")


def curve_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{'loss': [(step, loss)...], 'eval_auc': [...], ...} from metrics.jsonl rows (non-numbers skipped);
    eval keys in EVAL_ORDER first, then any others alphabetically."""
    series: dict[str, list[tuple[float, float]]] = {}
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("eval_")},
                             key=lambda k: (EVAL_ORDER.index(k) if k in EVAL_ORDER else len(EVAL_ORDER), k))
    for key in keys:
        pts = [(_num(r.get("step")), _num(r.get(key))) for r in rows]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if pts:
            series[key] = pts
    return series


def plot_curves(name: str, rows: list[dict], path: Path, max_panels: int = 4) -> bool:
    """Training loss and the held-out eval metrics vs optimizer step for one distill stage; mode changes
    (two-stage training) are marked. False (nothing written) when the log holds no numbers."""
    series = curve_series(rows)
    if not series:
        return False
    keys = list(series)[:max_panels]
    fig, axes = _figure(len(keys), width=4.2, height=3.3)
    changes = [(r["step"], r["mode"]) for prev, r in zip([{}, *rows], rows, strict=False)
               if "loss" in r and r.get("mode") and prev.get("mode") not in (None, r.get("mode")) and "step" in r]
    for ax, key in zip(axes, keys, strict=True):
        steps, values = zip(*series[key], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.2)
        if key == "loss" and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        for step, mode in changes:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(mode, (step, 1), xycoords=("data", "axes fraction"), fontsize=7, va="top", color="grey")
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{name}: training curves")
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------- commands


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


# --------------------------------------------------------------------------- the report


def write_report(run_dir: str | Path, recipe_path: str | Path | None = None, *, reference: str | None = None) -> Path:
    """Write ``RUN_DIR/report/`` (report.md, PNG plots, the resolved recipe) atomically; return report.md's path.

    ``recipe_path``: the recipe to report against when the run has no ``run.json`` (or to override it);
    ``reference``: the model ref that retention and speed-ups are measured against (default: see module doc)."""
    run = read_run(run_dir, recipe_path)
    evaluations = [s for s in run["stages"] if s["kind"] == "evaluate"]
    if reference is not None and evaluations and not any(reference in s["results"] for s in evaluations):
        known = sorted({r for s in evaluations for r in s["results"]})
        raise SlimlmError(f"reference {reference!r} is not an evaluated model of this run (evaluated: "
                          f"{', '.join(known) or 'none'})")
    run_dir = run["run_dir"]
    with atomic_dir(run_dir / REPORT_DIR) as tmp:
        lines = _render(run, tmp, reference)
        (tmp / "report.md").write_text("\n".join(lines) + "\n")
    return run_dir / REPORT_DIR / "report.md"


def _render(run: dict, tmp: Path, reference: str | None) -> list[str]:
    run_dir, stages, recipe = run["run_dir"], run["stages"], run["recipe"] or {}
    task = recipe.get("task") or {}
    done = [s for s in stages if s["status"] == "done"]
    lines = [f"# slimlm run report: `{run_dir}`", ""]
    lines.append(f"Written {_now()} by slimlm {__version__} from the files in `{run_dir}`.")
    if task:
        lines.append(f"Task: `{task.get('name')}` (data: {task.get('data') or 'built-in'}).")
    status = f"{len(done)} of {len(stages)} stages finished"
    rest = [f"`{s['name']}` ({s['status']})" for s in stages if s["status"] != "done"]
    lines += [f"Status: {status}" + (f"; {', '.join(rest)}." if rest else "."), ""]

    # -- models
    if not any(s["kind"] == "evaluate" for s in stages):
        lines += ["## Models", "", "No evaluate stage in this run: no model table or quality plots.", ""]
    for ev in [s for s in stages if s["kind"] == "evaluate"]:
        lines += _render_evaluation(ev, run, tmp, reference)

    # -- training curves
    distills = [s for s in stages if s["kind"] == "distill"]
    if distills:
        lines += ["## Training curves", ""]
    for st in distills:
        cfg, final = st.get("config") or {}, st.get("final") or {}
        facts = [stage_label(st), st["status"]]
        if cfg.get("max_steps"):
            last = max((_num(r.get("step")) or 0 for r in st["curves"]), default=0)
            facts.append(f"step {last:.0f} of {cfg['max_steps']}")
        losses = [r["loss"] for r in st["curves"] if _num(r.get("loss")) is not None]
        if losses:
            facts.append(f"last loss {losses[-1]:.4g}")
        finals = [f"{k} {v:.4g}" for k, v in final.items() if k.startswith("eval_") and _num(v) is not None]
        if finals:
            facts.append("final " + ", ".join(finals))
        tps = [r["tokens_per_s"] for r in st["curves"] if _num(r.get("tokens_per_s")) is not None]
        if tps:
            facts.append(f"median {statistics.median(tps):,.0f} train tokens/s")
        lines += [f"### `{st['name']}`", "", "; ".join(facts) + ".", ""]
        png = f"curves-{st['name']}.png"
        if plot_curves(st["name"], st["curves"], tmp / png):
            lines += [f"![{st['name']} training curves]({png})", ""]
        else:
            lines += ["No training log rows yet.", ""]

    # -- stages
    lines += ["## Stages", ""]
    rows = []
    for st in stages:
        rec = st.get("record") or {}
        inputs = _ref_name(st["inputs"].get("from"))
        if st["kind"] == "distill" and st["inputs"].get("teacher") and (st.get("config") or {}).get("mode") != "sft":
            inputs = f"{inputs} (teacher: {_ref_name(st['inputs']['teacher'])})"
        if st["kind"] == "evaluate":
            inputs = ", ".join(st.get("planned_models") or []) or None
        rows.append([f"`{st['name']}`", stage_label(st), inputs or MISSING, st["status"],
                     _seconds(stage_seconds(rec)), _stage_note(st)])
    lines += _table(["stage", "kind", "input", "status", "wall time", "notes"], rows, right={4})
    total = sum(stage_seconds(s.get("record") or {}) or 0 for s in stages)
    lines += ["", f"Wall time of the finished stages: {_seconds(total)} (from each stage.json; a stage skipped on a "
              "re-run keeps the time of the run that made it; a distill stage that was interrupted and resumed "
              "counts every run of it, each up to its last checkpoint; an evaluate stage, every model it "
              "finished).", ""]

    lines += _render_reproduce(run, tmp)
    return lines


def paired_deltas(scores: dict, reference: str | None, metric: str = "auc") -> dict[str, tuple[float, float, float]]:
    """{model: (metric − reference metric, 95% low, high)} from the evaluate stage's per-example scores, for
    every model scored on the same examples as the reference: ``auc`` from ranking scores (same labels in
    the same order), ``exact_match`` from per-question hits (same number of questions)."""
    ref = scores.get(reference) if reference else None
    if not isinstance(ref, dict):
        return {}
    from slimlm.evaluate import paired_auc_delta, paired_mean_delta

    out = {}
    for name, sc in scores.items():
        if name == reference or not isinstance(sc, dict):
            continue
        if metric == "auc" and ref.get("p") and _scored_on(sc, ref.get("labels")):
            out[name] = paired_auc_delta(ref["labels"], sc["p"], ref["p"])
        elif metric == "exact_match" and ref.get("correct") and len(sc.get("correct") or []) == len(ref["correct"]):
            out[name] = paired_mean_delta(sc["correct"], ref["correct"])
    return out


def _scored_on(sc: Any, labels: list[int] | None) -> bool:
    """Whether a model's ranking scores are on these rows (same labels, same order, a score for each)."""
    return isinstance(sc, dict) and labels is not None and sc.get("labels") == labels \
        and len(sc.get("p") or []) == len(labels)


BASELINE_MODEL = "logistic"
BASELINE_NAMES = {"logistic": "Logistic regression", "gbdt": "Gradient-boosted trees"}


def classic_baseline(ev: dict, run: dict, model: str = BASELINE_MODEL) -> dict | None:
    """The classic baseline on exactly the rows an evaluate stage scored (built-in MovieLens task only):
    ``{"model", "n", "auc", "ci", "deltas": {model ref: (AUC − baseline AUC, 95% low, high)}}``, each delta
    a paired bootstrap on the same rows. None when it does not apply (another task, no per-example scores).
    The baseline is refitted on the train split (seconds), the same fit as ``slimlm baseline``."""
    recipe = run.get("recipe") or {}
    task, scores, cfg = recipe.get("task") or {}, ev.get("scores") or {}, ev.get("config") or {}
    if task.get("name", "movielens-ranking") != "movielens-ranking" or not scores:
        return None
    from slimlm.baseline import baseline_predictions
    from slimlm.evaluate import bootstrap_auc, paired_auc_delta, roc_auc
    from slimlm.tasks.movielens import example_id, load_movielens, subsample, to_examples

    split, ml = cfg.get("split", "test"), load_movielens(task.get("data"))
    rows, p, _ = baseline_predictions(model, split, ml=ml)
    by_id = {example_id(r): float(x) for r, x in zip(rows, p, strict=True)}
    # the evaluate stage's examples (slimlm.tasks.movielens.movielens_examples), from the rows just built
    examples = subsample(to_examples(rows, ml.items), cfg.get("limit"), recipe.get("seed", 0))
    labels = [int(ex.label) for ex in examples]
    base = [by_id[ex.id] for ex in examples]
    deltas = {name: paired_auc_delta(labels, sc["p"], base) for name, sc in scores.items() if _scored_on(sc, labels)}
    if not deltas:
        raise SlimlmError(f"no model's scores are on the {len(labels)} rows the recipe's split `{split}` gives now")
    return {"model": model, "n": len(labels), "auc": roc_auc(labels, base), "ci": bootstrap_auc(labels, base),
            "deltas": deltas}


def _render_baseline(base: dict | None, error: str | None, rows: list[dict], split: str | None) -> list[str]:
    if error is not None:
        return ["### Against the classic baseline", "", f"Not computed: {error}", ""]
    if base is None:
        return []
    lo, hi = base["ci"]
    cmd = f"slimlm baseline movielens-ranking --model {base['model']}" + (f" --split {split}" if split else "")
    lines = ["### Against the classic baseline", "",
             f"{BASELINE_NAMES.get(base['model'], base['model'])} on hand-built user / item / history features, "
             f"fitted on the train split and scored on the same {base['n']:,} rows (`{cmd}` gives it on the whole "
             f"split): AUC {base['auc']:.4f} ({lo:.3f}–{hi:.3f}). ΔAUC = model − baseline on the same rows, paired "
             "bootstrap (1,000 resamples).", ""]
    table = []
    for r in rows:
        d = base["deltas"].get(r["model"])
        if d is None:
            continue
        verdict = "above" if d[1] > 0 else "below" if d[2] < 0 else "not distinguishable (the interval holds 0)"
        name = f"**{r['model']}**" if r["reference"] else r["model"]
        table.append([name, _metric_text(r["metric"], r["metrics"]) if r["metric"] else MISSING,
                      f"{d[0]:+.4f} ({d[1]:+.3f}–{d[2]:+.3f})", verdict])
    return lines + _table(["model", "AUC (95% CI)", f"ΔAUC vs {base['model']}, paired (95% CI)", "at 95%"],
                          table, right={1, 2}) + [""]


def stage_seconds(record: dict) -> float | None:
    """A finished stage's wall time: its stage.json ``seconds`` (the run that finished it), or when that is
    longer (the stage was interrupted and resumed) the time over all its runs: a distill stage's trainer
    ``train_seconds``, an evaluate stage's per-model ``wall_seconds`` added up."""
    own = _num(record.get("seconds"))
    metrics = record.get("metrics") or {}
    total = _num(metrics.get("train_seconds"))
    if record.get("kind") == "evaluate":
        walls = [_num(r.get("wall_seconds")) for r in metrics.values() if isinstance(r, dict)]
        total = sum(w for w in walls if w is not None) if any(w is not None for w in walls) else None
    return max(own, total) if own is not None and total is not None else own


def _ref_name(ref: Any) -> Any:
    return ref[6:] if isinstance(ref, str) and ref.startswith("stage:") else ref


def _stage_note(st: dict) -> str:
    m = (st.get("record") or {}).get("metrics") or {}
    if st["kind"] == "prune" and isinstance(m.get("params_before"), dict) and isinstance(m.get("params_after"), dict):
        b, a = m["params_before"].get("non_embedding"), m["params_after"].get("non_embedding")
        arch = m.get("arch_after") or {}
        shape = ", ".join(f"{k} {arch[k]}" for k in ("num_layers", "intermediate_size", "num_heads", "num_kv_heads")
                          if k in arch)
        return f"non-embedding params {_count(_num(b))} → {_count(_num(a))}" + (f"; {shape}" if shape else "")
    if st["kind"] == "quantize" and _num(m.get("weights_bytes")) is not None:
        src = _num(m.get("source_weights_bytes"))
        note = f"{m.get('quantized_layers', '?')} layers; weights {_mib(m['weights_bytes'] / 2**20)} MiB"
        return note + (f" (from {_mib(src / 2**20)} MiB)" if src else "")
    if st["kind"] == "init" and isinstance(m.get("kept_layers"), list):
        return f"kept layers {m['kept_layers']}"
    if st["kind"] == "evaluate":
        got = [r for r in st.get("planned_models") or [] if r in st.get("results", {})]
        return f"{len(got)} of {len(st.get('planned_models') or [])} models evaluated"
    if st["kind"] == "distill" and st["status"] != "done" and st.get("curves"):
        return f"log reaches step {max(_num(r.get('step')) or 0 for r in st['curves']):.0f}"
    return ""


def _render_evaluation(ev: dict, run: dict, tmp: Path, reference: str | None) -> list[str]:
    results = ev["results"]
    cfg = ev.get("config") or {}
    ref, why = choose_reference(results, run, reference)
    rows = model_rows(results, ev["planned_models"], run, ref)
    metrics = [r["metric"] for r in rows if r["metric"] is not None]
    metric = max(set(metrics), key=metrics.count) if metrics else None
    ns = {r["metrics"].get("n") for r in rows if r["evaluated"] and r["metrics"].get("n") is not None}
    title = f"Evaluation `{ev['name']}`"
    where = [f"split `{cfg['split']}`" if cfg.get("split") else None,
             f"{ns.pop()} examples" if len(ns) == 1 else None, ev["status"] if ev["status"] != "done" else None]
    lines = [f"## {title}" + (f" ({', '.join(w for w in where if w)})" if any(where) else ""), ""]
    paired = paired_deltas(ev.get("scores") or {}, ref, metric.key) if metric is not None else {}
    header = ["model", "stage", "params", "non-emb params", "disk MiB",
              f"{metric.label}{' (95% CI)' if any(_ci(metric, r['metrics']) for r in rows) else ''}" if metric
              else "metric",
              "retention", *([f"Δ{'' if metric.key == 'auc' else ' '}{metric.label} vs reference, paired (95% CI)"]
                             if paired else []),
              "prefill tok/s", "decode tok/s", "cand/s", "prefill ×", "decode ×", "cand/s ×"]
    table = []
    for r in rows:
        name = f"**{r['model']}**" if r["reference"] else r["model"]
        if not r["evaluated"]:
            cells = [name, r["kind"]] + [MISSING] * (len(header) - 2)
            cells[5] = "missing"
            table.append(cells)
            continue
        value = _metric_text(r["metric"], r["metrics"]) if r["metric"] else MISSING
        if r["metric"] is not None and metric is not None and r["metric"] != metric:
            value = f"{r['metric'].label} {value}"
        if r["at_chance"]:
            value += " (chance)"
        ret = _pct(r["retention"])
        if r["at_chance"] and r["model"] != ref:
            ret = "chance"  # a ratio of chance-level AUC to a real one (0.5 / 0.7 = 71 %) would flatter it
        elif r["retention"] is None and r["value"] is not None and ref is not None and r["model"] != ref:
            ret = "n/a"
        cands = _rate(r["candidates"]) + ("†" if r["candidates_from_eval"] else "")
        delta = paired.get(r["model"])
        delta_cell = ["—" if r["reference"] else MISSING if delta is None else
                      f"{delta[0]:+.4f} ({delta[1]:+.3f}–{delta[2]:+.3f})"] if paired else []
        table.append([name, r["kind"], _count(r["params_total"]), _count(r["params_non_embedding"]), _mib(r["disk_mib"]),
                      value, ret, *delta_cell, _rate(r["prefill"]), _rate(r["decode"]), cands,
                      _times(r["speedup"]["prefill"]), _times(r["speedup"]["decode"]), _times(r["speedup"]["candidates"])])
    lines += _table(header, table, right=range(2, len(header)))
    lines += ["", f"- Reference (**bold**): {why}. Retention = metric / reference metric"
              + (" (perplexity: reference / metric)" if metric and not metric.higher_is_better else "")
              + "; ×: speed / reference speed."]
    if paired and metric.key == "auc":
        lines.append("- ΔAUC vs reference: the two models scored on the same test rows, with a paired bootstrap "
                     "(1,000 resamples of the rows, both AUCs on each): the interval of the difference, far narrower "
                     "than the two AUC intervals side by side.")
    elif paired:
        lines.append(f"- Δ {metric.label} vs reference: the two models on the same questions, with a paired bootstrap "
                     "(1,000 resamples of the questions, both models' answers on each): the interval of the "
                     "difference, narrower than the two intervals side by side.")
    chance = [r["model"] for r in rows if r["at_chance"]]
    if chance and metric is not None:
        lines.append(f"- At chance ({metric.label} 95% interval reaching {metric.chance:g}, or no better): "
                     + ", ".join(f"`{c}`" for c in chance) + "; their retention reads \"chance\", not a ratio.")
    lines.append("- Speed: prefill = 16 × 128 tokens in one forward pass without a cache; decode = batch 1, greedy, "
                 "KV cache, 32 new tokens; cand/s = ranking candidates per second, one 192-token prefix computed "
                 "once and 100 16-token candidates scored on its KV cache. Medians of 3 after a warm-up, on this "
                 "run's machine (see Reproduce); on a shared CPU they carry noise of tens of percent.")
    if any(r["candidates_from_eval"] for r in rows):
        lines.append("- †: no speed probe; candidates/s measured during the evaluation itself (tokenization, padding and "
                     "batching included), not comparable with the probe.")
    missing = [r["model"] for r in rows if not r["evaluated"]]
    if missing:
        lines.append("- Missing (not evaluated: the stage " + ("did not finish" if ev["status"] != "done" else
                     "holds no result") + "): " + ", ".join(f"`{m}`" for m in missing) + ".")
    lines.append("")
    base = error = None
    if metric is not None and metric.key == "auc":
        try:
            base = classic_baseline(ev, run)
        except (SlimlmError, OSError, ValueError, KeyError) as e:  # the report never fails for want of a baseline
            error = str(e) or type(e).__name__
    lines += _render_baseline(base, error, rows, cfg.get("split"))
    if metric is not None:
        rank = metric.key == "auc"
        speed_axes = [("candidates" if rank else "decode", "ranking candidates/s" if rank else "decode tokens/s", True),
                      ("prefill", "prefill tokens/s", True)]
        size_axes = [("params_non_embedding", "non-embedding parameters", True), ("disk_mib", "disk (MiB)", True)]
        for stem, axes, what in (("quality-vs-speed", speed_axes, "speed"), ("quality-vs-size", size_axes, "size")):
            png = f"{stem}-{ev['name']}.png"
            if plot_quality(rows, metric, tmp / png, axes, f"{metric.label} vs {what} ({ev['name']})",
                            (f"{base['model']} baseline", base["auc"]) if base else None):
                lines += [f"![{metric.label} vs {what}]({png})", ""]
            else:
                lines += [f"No model has both {metric.label} and {what} figures: no {what} plot.", ""]
    return lines


def _render_reproduce(run: dict, tmp: Path) -> list[str]:
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
