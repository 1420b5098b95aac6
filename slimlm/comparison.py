"""The evaluate stage's comparisons: every model against a reference model and against the classic baseline.

An evaluate stage (:func:`slimlm.pipeline.run`) writes, beside its ``results.json`` / ``scores.json``:

- ``baseline.json`` (built-in MovieLens task): the classic logistic baseline refitted on the train split and
  scored on exactly the rows the stage scored: ``{"model", "split", "n", "labels", "p", "auc", "auc_ci95"}``,
  or ``{"model", "error"}`` when it cannot be computed;
- ``comparison.json``: the reference model (chosen as below, with the reason) and per model: the task metric,
  whether it is at chance, retention, speed-ups, the paired Δ against the reference and against the baseline,
  each with the number of rows it was computed on. A named reference (``slimlm report --reference NAME``)
  gets its own ``comparison-vs-NAME.json``, made by the same code.

The numbers, per evaluated model m against the reference model r:

    retention = q(m) / q(r)     for a higher-is-better task metric q (AUC, exact match, accuracy)
              = q(r) / q(m)     for perplexity (lower is better), so 100 % means "as good as r"
    speed-up  = s(m) / s(r)     for s = prefill tokens/s, decode tokens/s, ranking candidates/s
    Δ         = q(m) − q(r)     on the same rows, with a paired bootstrap 95 % interval (AUC: both AUCs on
                                each resample of the rows; exact match: the mean of per-question differences)

The reference is the first evaluated fine-tuned teacher (a ``distill`` stage with ``mode: sft`` trained from
the recipe's teacher) that is not at chance (a 95 % interval reaching AUC 0.5 or exact match 0): the model the
students learn from and the one a student replaces, as in the paper. Without one it is the recipe's starting
teacher. A ratio to a chance-level score means nothing, so retention is None where the reference is at chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm import SlimlmError
from slimlm.io import atomic_write_json, read_json_or_none

COMPARISON_FILE = "comparison.json"
BASELINE_FILE = "baseline.json"
BASELINE_MODEL = "logistic"


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
METRIC_BY_KEY = {m.key: m for m in METRICS}


def num(x: Any) -> float | None:
    """A finite number, or None (absent, null, a string, NaN)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def primary_metric(metrics: dict | None) -> Metric | None:
    for m in METRICS:
        if num((metrics or {}).get(m.key)) is not None:
            return m
    return None


def metric_ci(metric: Metric, metrics: dict | None) -> tuple[float, float] | None:
    """The metric's 95 % interval (``KEY_ci95``: bootstrap for AUC, Wilson for exact match), if recorded."""
    ci = (metrics or {}).get(f"{metric.key}_ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(num(c) is not None for c in ci):
        return float(ci[0]), float(ci[1])
    return None


def at_chance(metric: Metric, metrics: dict | None) -> bool:
    """True when the score is indistinguishable from knowing nothing: its 95 % interval reaches the
    chance level (AUC 0.5, exact match 0), or without an interval it is no better than chance. Metrics
    without a chance level (perplexity) never are."""
    value = num((metrics or {}).get(metric.key))
    if metric.chance is None or value is None:
        return False
    ci = metric_ci(metric, metrics)
    return (ci[0] if ci else value) <= metric.chance


def retention(value: float | None, ref: float | None, metric: Metric) -> float | None:
    """value / ref for higher-is-better metrics, ref / value for lower-is-better; None when undefined."""
    if value is None or ref is None:
        return None
    top, bottom = (value, ref) if metric.higher_is_better else (ref, value)
    return top / bottom if bottom > 0 else None


def speedup(value: float | None, ref: float | None) -> float | None:
    return value / ref if value is not None and ref is not None and ref > 0 else None


def speeds(result: dict) -> dict[str, Any]:
    """Prefill / decode tokens/s and candidates/s from the speed probe; candidates/s falls back to the
    evaluation's own throughput (data handling and batching included), flagged as such."""
    speed = result.get("speed") or {}
    cands = num(speed.get("candidates_per_s"))
    from_eval = cands is None and num((result.get("metrics") or {}).get("candidates_per_s")) is not None
    if from_eval:
        cands = num(result["metrics"]["candidates_per_s"])
    return {"prefill": num(speed.get("prefill_tokens_per_s")), "decode": num(speed.get("decode_tokens_per_s")),
            "candidates": cands, "candidates_from_eval": from_eval, "cpu_share": num(speed.get("cpu_share"))}


CONTENDED_SHARE = 0.7  # a CPU speed probe whose process got less of its threads' time ran beside other work


def contended(s: dict[str, Any]) -> bool:
    """Whether a model's speed probe (:func:`speeds`) ran while other processes held the CPU
    (``cpu_share`` below :data:`CONTENDED_SHARE`; see :func:`slimlm.evaluate.speed`)."""
    return s.get("cpu_share") is not None and s["cpu_share"] < CONTENDED_SHARE


# --------------------------------------------------------------------------- where each model came from


def stage_origins(stages: list[dict[str, Any]], teacher: str = "teacher") -> dict[str, dict[str, Any]]:
    """{model ref: {"kind", "mode", "finetuned_teacher"}} for the model-producing stages of a run.

    ``stages``: dicts with ``name``, ``kind``, ``config`` (a dict) and ``inputs`` (``from`` as the pipeline
    resolved it); ``teacher``: the recipe's starting model. A fine-tuned teacher is a ``distill`` stage in
    ``sft`` mode trained from the starting teacher."""
    out = {}
    for st in stages:
        cfg, src = st.get("config") or {}, (st.get("inputs") or {}).get("from")
        finetuned = st["kind"] == "distill" and cfg.get("mode") == "sft" and (
            src == "teacher" or (isinstance(src, str) and teacher != "teacher" and Path(src) == Path(teacher)))
        out[st["name"]] = {"kind": st["kind"], "mode": cfg.get("mode"), "finetuned_teacher": bool(finetuned)}
    return out


def choose_reference(results: dict[str, dict], origins: dict[str, dict], reference: str | None,
                     ) -> tuple[str | None, str]:
    """(reference model ref or None, a sentence saying why)."""
    def metrics(ref):
        return (results.get(ref) or {}).get("metrics") or {}

    def chance_text(ref) -> str:
        m = primary_metric(metrics(ref))
        return f"{m.label} {metric_text(m, metrics(ref))}" if m else "?"

    if reference is not None:
        if reference not in results:
            return None, f"the named reference `{reference}` was not evaluated in this stage"
        m = primary_metric(metrics(reference))
        chance = m is not None and at_chance(m, metrics(reference))
        return reference, f"the named reference `{reference}`" + (" (at chance: retention n/a)" if chance else "")
    finetuned = next((r for r in results if (origins.get(r) or {}).get("finetuned_teacher")
                      and primary_metric(metrics(r)) is not None
                      and not at_chance(primary_metric(metrics(r)), metrics(r))), None)
    if finetuned is not None:  # the model the students learn from, and the one a student replaces
        if "teacher" not in results:
            return finetuned, f"`{finetuned}`, the fine-tuned teacher (the starting teacher was not evaluated)"
        m = primary_metric(metrics("teacher"))
        start = (f"the starting teacher is at chance: {chance_text('teacher')}"
                 if m is not None and at_chance(m, metrics("teacher")) else "the starting teacher is the zero-shot point")
        return finetuned, f"`{finetuned}`, the fine-tuned teacher the students learn from ({start})"
    if "teacher" in results:
        m = primary_metric(metrics("teacher"))
        if m is None or not at_chance(m, metrics("teacher")):
            return "teacher", "the recipe's starting teacher"
        why = f"the starting teacher is at chance ({chance_text('teacher')})"
        return "teacher", f"the recipe's starting teacher; {why}, so retention is n/a (name a reference with --reference)"
    return None, "no reference: the starting teacher was not evaluated (name one with --reference)"


def metric_text(metric: Metric, metrics: dict) -> str:
    """'0.7989 (0.777–0.819)': the value and its interval as the report prints them ('—' when absent)."""
    value = num(metrics.get(metric.key))
    if value is None:
        return "—"
    text = f"{value:.2f}" if metric.key == "perplexity" else f"{value:.4f}"
    ci = metric_ci(metric, metrics)
    return text + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


# --------------------------------------------------------------------------- paired differences


def scored_on(sc: Any, labels: list[int] | None) -> bool:
    """Whether a model's ranking scores are on these rows (same labels, same order, a score for each)."""
    return isinstance(sc, dict) and labels is not None and sc.get("labels") == labels \
        and len(sc.get("p") or []) == len(labels)


def paired_deltas(scores: dict, reference: str | None, metric: str = "auc") -> dict[str, list[float]]:
    """{model: [metric − reference metric, 95% low, high]} from the evaluate stage's per-example scores, for
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
        if metric == "auc" and ref.get("p") and scored_on(sc, ref.get("labels")):
            out[name] = list(paired_auc_delta(ref["labels"], sc["p"], ref["p"]))
        elif metric == "exact_match" and ref.get("correct") and len(sc.get("correct") or []) == len(ref["correct"]):
            out[name] = list(paired_mean_delta(sc["correct"], ref["correct"]))
    return out


def contrast(scores: dict, group: list[str], reference_group: list[str]) -> dict[str, Any]:
    """One group of models against another on the same examples (KD vs SFT, two seeds each): each pair's
    paired Δ (the i-th of ``group`` against the i-th of ``reference_group``, when both have as many) and the
    pooled Δ of the groups' mean metric, with paired bootstrap intervals. A one-line error when a model has no
    scores or the models were not scored on the same examples."""
    import numpy as np

    from slimlm.evaluate import paired_group_auc_delta, paired_mean_delta

    missing = [m for m in group + reference_group if not isinstance(scores.get(m), dict)]
    if missing:
        raise SlimlmError(f"no per-example scores for {', '.join(missing)} in this evaluate stage "
                          f"(scored: {', '.join(scores) or 'none'})")
    first = scores[group[0]]
    if first.get("p") is not None:
        metric, labels = "auc", first.get("labels")
        if not all(scored_on(scores[m], labels) for m in group + reference_group):
            raise SlimlmError("the contrasted models were not scored on the same rows")

        def delta(a: list[str], b: list[str]) -> list[float]:
            return list(paired_group_auc_delta(labels, [scores[m]["p"] for m in a], [scores[m]["p"] for m in b]))
        n = len(labels)
    else:
        metric, n = "exact_match", len(first.get("correct") or [])
        if not n or any(len(scores[m].get("correct") or []) != n for m in group + reference_group):
            raise SlimlmError("the contrasted models were not scored on the same questions")

        def delta(a: list[str], b: list[str]) -> list[float]:  # a mean is linear: average the groups' hits
            return list(paired_mean_delta(np.mean([scores[m]["correct"] for m in a], axis=0),
                                          np.mean([scores[m]["correct"] for m in b], axis=0)))
    pairs = ([{"model": a, "reference": b, "delta": delta([a], [b])} for a, b in zip(group, reference_group, strict=True)]
             if len(group) == len(reference_group) else [])
    return {"metric": metric, "n": n, "group": group, "reference_group": reference_group, "pairs": pairs,
            "pooled": delta(group, reference_group)}


def contrast_path(stage_dir: Path, group: list[str], reference_group: list[str]) -> Path:
    return stage_dir / f"contrast-{'+'.join(group)}-vs-{'+'.join(reference_group)}.json"


def write_contrast(stage_dir: Path, scores: dict, group: list[str], reference_group: list[str]) -> dict[str, Any]:
    """:func:`contrast`, written atomically beside the stage's comparison (``contrast-A+B-vs-C+D.json``)."""
    out = contrast(scores, group, reference_group)
    atomic_write_json(contrast_path(stage_dir, group, reference_group), out)
    return out


# --------------------------------------------------------------------------- the classic baseline


def baseline_on_rows(task: dict, split: str, limit: int | None, seed: int, model: str = BASELINE_MODEL) -> dict:
    """The classic baseline scored on exactly the rows an evaluate stage of the built-in MovieLens task scores
    (same split, same seeded subsample): ``{"model", "split", "n", "labels", "p", "auc", "auc_ci95"}``.
    Refitted on the train split (seconds), the same fit as ``slimlm baseline``."""
    from slimlm.baseline import baseline_predictions
    from slimlm.evaluate import bootstrap_auc, roc_auc
    from slimlm.tasks.movielens import example_id, load_movielens, subsample, to_examples

    ml = load_movielens(task.get("data"))
    rows, p, _ = baseline_predictions(model, split, ml=ml)
    by_id = {example_id(r): float(x) for r, x in zip(rows, p, strict=True)}
    # the evaluate stage's examples (slimlm.tasks.movielens.movielens_examples), from the rows just built
    examples = subsample(to_examples(rows, ml.items), limit, seed)
    labels = [int(ex.label) for ex in examples]
    base = [by_id[ex.id] for ex in examples]
    return {"model": model, "split": split, "n": len(labels), "labels": labels, "p": base,
            "auc": roc_auc(labels, base), "auc_ci95": list(bootstrap_auc(labels, base))}


def write_baseline(stage_dir: Path, task: dict, split: str, limit: int | None, seed: int) -> dict | None:
    """Write ``baseline.json`` for an evaluate stage of the built-in MovieLens task (None for other tasks);
    a baseline that cannot be computed (data moved, one class) is written as ``{"model", "error"}``."""
    if (task or {}).get("name", "movielens-ranking") != "movielens-ranking":
        return None
    try:
        base = baseline_on_rows(task, split, limit, seed)
    except (SlimlmError, OSError, ValueError, KeyError) as e:  # a stage never fails for want of a baseline
        base = {"model": BASELINE_MODEL, "error": str(e) or type(e).__name__}
    atomic_write_json(stage_dir / BASELINE_FILE, base)
    return base


# --------------------------------------------------------------------------- the comparison


def compare(results: dict[str, dict], scores: dict, origins: dict[str, dict], *, reference: str | None = None,
            baseline: dict | None = None) -> dict[str, Any]:
    """Every evaluated model against the reference (chosen, or named) and against the baseline.

    Returns ``{"reference", "reference_why", "metric", "evaluated", "models": {ref: {...}}, "baseline"}``;
    per model: ``value``, ``at_chance``, ``retention``, ``speedup`` (prefill / decode / candidates),
    ``fewer_params`` (non_embedding / total: the reference's count over the model's),
    ``delta_vs_reference`` and ``delta_vs_baseline`` as ``[Δ, 95% low, high]`` (None where they do not apply),
    and ``n_paired`` (rows or questions behind the paired Δs)."""
    ref, why = choose_reference(results, origins, reference)
    ref_metrics = ((results.get(ref) or {}).get("metrics") or {}) if ref else {}
    ref_metric = primary_metric(ref_metrics)
    ref_chance = ref_metric is not None and at_chance(ref_metric, ref_metrics)
    ref_speed = speeds(results.get(ref) or {}) if ref else {}
    ref_params = ((results.get(ref) or {}).get("params") or {}) if ref else {}
    found = [primary_metric((r or {}).get("metrics")) for r in results.values() if isinstance(r, dict)]
    found = [m for m in found if m is not None]
    metric = max(set(found), key=lambda m: (found.count(m), -METRICS.index(m))) if found else None
    paired = paired_deltas(scores, ref, metric.key) if metric is not None else {}
    base_deltas: dict[str, list[float]] = {}
    if baseline and "error" not in baseline and metric is not None and metric.key == "auc":
        from slimlm.evaluate import paired_auc_delta

        base_deltas = {name: list(paired_auc_delta(baseline["labels"], sc["p"], baseline["p"]))
                       for name, sc in scores.items() if scored_on(sc, baseline["labels"])}
    models = {}
    for name, res in results.items():
        if not isinstance(res, dict):
            continue
        metrics = res.get("metrics") or {}
        m = primary_metric(metrics)
        value = num(metrics.get(m.key)) if m else None
        same = m is not None and ref_metric is not None and m.key == ref_metric.key and not ref_chance
        s = speeds(res)
        sc = scores.get(name) or {}
        models[name] = {
            "metric": m.key if m else None, "value": value, "at_chance": m is not None and at_chance(m, metrics),
            "retention": retention(value, num(ref_metrics.get(m.key)), m) if same else None,
            "speedup": {k: speedup(s[k], ref_speed.get(k)) for k in ("prefill", "decode", "candidates")},
            # how many times fewer parameters than the reference (its count / this one's)
            "fewer_params": {k: speedup(num(ref_params.get(k)), num((res.get("params") or {}).get(k)))
                             for k in ("non_embedding", "total")},
            "delta_vs_reference": paired.get(name), "delta_vs_baseline": base_deltas.get(name),
            "n_paired": len(sc.get("labels") or sc.get("correct") or []) or None}
    out_base = None
    if baseline is not None:
        out_base = {k: v for k, v in baseline.items() if k not in ("labels", "p")}
        if "error" not in baseline and not base_deltas and metric is not None and metric.key == "auc" and scores:
            out_base = {"model": baseline["model"], "error": f"no model's scores are on the {baseline['n']} rows "
                        f"the recipe's split `{baseline['split']}` gives now"}
    return {"reference": ref, "reference_why": why, "metric": metric.key if metric else None,
            "evaluated": len(models), "models": models, "baseline": out_base}


def comparison_path(stage_dir: Path, reference: str | None = None) -> Path:
    return stage_dir / (COMPARISON_FILE if reference is None else f"comparison-vs-{reference}.json")


def write_comparison(stage_dir: Path, results: dict, scores: dict, origins: dict[str, dict], *,
                     reference: str | None = None, baseline: dict | None = None, planned: list[str] | None = None,
                     ) -> dict[str, Any]:
    """:func:`compare`, written atomically to the stage's ``comparison.json`` (or ``comparison-vs-NAME.json``
    for a named reference), with the origins it used so the comparison can be made again from the files."""
    out = {**compare(results, scores, origins, reference=reference, baseline=baseline),
           "planned": len(planned) if planned is not None else None, "origins": origins}
    atomic_write_json(comparison_path(stage_dir, reference), out)
    return out


def ensure_comparison(stage_dir: Path, results: dict, scores: dict, origins: dict[str, dict], *, task: dict,
                      split: str, limit: int | None, seed: int, reference: str | None = None,
                      planned: list[str] | None = None) -> dict[str, Any]:
    """The stage's comparison as its files hold it; made (and written) by this module when a stage written
    by an older slimlm has none, when a named reference is asked for, or when the results changed since."""
    path = comparison_path(stage_dir, reference)
    have = read_json_or_none(path)
    if isinstance(have, dict) and reference is None and have.get("evaluated") == len(results) \
            and set(have.get("models") or {}) == set(results):
        return have
    baseline = read_json_or_none(stage_dir / BASELINE_FILE)
    metric = next((primary_metric((r or {}).get("metrics")) for r in results.values()), None)
    if not isinstance(baseline, dict) and metric is not None and metric.key == "auc" and scores:
        baseline = write_baseline(stage_dir, task, split, limit, seed)
    return write_comparison(stage_dir, results, scores, origins, reference=reference,
                            baseline=baseline if isinstance(baseline, dict) else None, planned=planned)
