"""The report's markdown: number formats, tables, and the sections built from stage files.

Every number printed here is read from a stage's files (``stage.json``, ``metrics.json``, ``metrics.jsonl``,
an evaluate stage's ``comparison.json`` / ``baseline.json``) or from ``run.json``; this module formats them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.comparison import (
    CONTENDED_SHARE,
    METRIC_BY_KEY,
    contended,
    metric_ci,
    metric_text,
    num,
    primary_metric,
    speeds,
)
from slimlm.report.plots import plot_quality

MISSING = "—"


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


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]], right: set[int] | range = range(0)) -> list[str]:
    """A markdown table; columns whose index is in ``right`` are right-aligned (numbers)."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


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
        if scheme == "int8" and cfg.get("method") == "quantease":
            return "quantize (int8 quantease)"
        return f"quantize ({scheme})" if scheme else "quantize"
    if kind == "init":
        n = metrics.get("layers") or cfg.get("layers")
        return f"init ({n} layers)" if n else "init"
    return kind


def _model_kind(ref: str, run: dict) -> str:
    if ref == "teacher":
        return "teacher (start)"
    stage = next((s for s in run["stages"] if s["name"] == ref), None)
    return stage_label(stage) if stage else "directory"




def model_rows(results: dict[str, dict], planned: list[str], run: dict, comparison: dict) -> list[dict]:
    """One row per planned model: its numbers from the evaluate stage's results and its comparison."""
    reference = comparison.get("reference")
    rows = []
    for name in planned:
        res = results.get(name)
        row: dict[str, Any] = {"model": name, "kind": _model_kind(name, run), "evaluated": isinstance(res, dict),
                               "reference": name == reference}
        res = res if isinstance(res, dict) else {}
        cmp = (comparison.get("models") or {}).get(name) or {}
        params, metrics = res.get("params") or {}, res.get("metrics") or {}
        metric = primary_metric(metrics)
        disk = num(res.get("disk_bytes"))
        row.update({"params_total": num(params.get("total")), "params_non_embedding": num(params.get("non_embedding")),
                    "disk_mib": disk / 2**20 if disk is not None else None, "metric": metric,
                    "value": num(metrics.get(metric.key)) if metric else None, "metrics": metrics,
                    "at_chance": bool(cmp.get("at_chance")), "retention": num(cmp.get("retention")),
                    **speeds(res),  # the same speeds the comparison's speed-ups were computed from
                    "speedup": {k: num((cmp.get("speedup") or {}).get(k)) for k in ("prefill", "decode", "candidates")},
                    "fewer_params": [num((cmp.get("fewer_params") or {}).get(k)) for k in ("non_embedding", "total")],
                    "delta": cmp.get("delta_vs_reference"), "delta_baseline": cmp.get("delta_vs_baseline")})
        rows.append(row)
    return rows


def _delta_text(d: list[float]) -> str:
    return f"{d[0]:+.4f} ({d[1]:+.3f}–{d[2]:+.3f})"


BASELINE_NAMES = {"logistic": "Logistic regression", "gbdt": "Gradient-boosted trees"}


def render_baseline(base: dict | None, rows: list[dict], split: str | None) -> list[str]:
    """The section "Against the classic baseline" from the comparison's ``baseline`` entry."""
    if base is None:
        return []
    if "error" in base:
        return ["### Against the classic baseline", "", f"Not computed: {base['error']}", ""]
    lo, hi = base["auc_ci95"]
    cmd = f"slimlm baseline movielens-ranking --model {base['model']}" + (f" --split {split}" if split else "")
    lines = ["### Against the classic baseline", "",
             f"{BASELINE_NAMES.get(base['model'], base['model'])} on hand-built user / item / history features, "
             f"fitted on the train split and scored on the same {base['n']:,} rows (`{cmd}` gives it on the whole "
             f"split): AUC {base['auc']:.4f} ({lo:.3f}–{hi:.3f}). ΔAUC = model − baseline on the same rows, paired "
             "bootstrap (1,000 resamples).", ""]
    table = []
    for r in rows:
        d = r["delta_baseline"]
        if d is None:
            continue
        name = f"**{r['model']}**" if r["reference"] else r["model"]
        table.append([name, metric_text(r["metric"], r["metrics"]) if r["metric"] else MISSING, _delta_text(d),
                      _verdict(d)])
    return lines + _table(["model", "AUC (95% CI)", f"ΔAUC vs {base['model']}, paired (95% CI)", "at 95%"],
                          table, right={1, 2}) + [""]


def _fewer(r: dict) -> str:
    """How many times fewer parameters ``r`` has than the reference (the comparison's): non-embedding / total."""
    if r["reference"]:
        return "—"
    return " / ".join(MISSING if x is None else f"{x:.1f}×" for x in r["fewer_params"])


def render_contrasts(contrasts: list[dict]) -> list[str]:
    """The section "Contrasts" from :func:`slimlm.comparison.contrast` results (``slimlm report --contrast``)."""
    if not contrasts:
        return []
    lines = ["### Contrasts", ""]
    for c in contrasts:
        label = "ΔAUC" if c["metric"] == "auc" else "Δ exact match"
        group, ref = ", ".join(f"`{m}`" for m in c["group"]), ", ".join(f"`{m}`" for m in c["reference_group"])
        lines.append(f"{group} against {ref}, on the same {c['n']:,} {'rows' if c['metric'] == 'auc' else 'questions'}"
                     f" (paired bootstrap, 1,000 resamples; the interval covers the examples, not the seeds):")
        lines.append("")
        rows = [[f"`{p['model']}` − `{p['reference']}`", _delta_text(p["delta"]), _verdict(p["delta"])]
                for p in c["pairs"]]
        rows.append(["pooled: mean of the first − mean of the second", _delta_text(c["pooled"]), _verdict(c["pooled"])])
        lines += _table(["", f"{label} (95% CI)", "at 95%"], rows, right={1}) + [""]
    return lines


def _verdict(d: list[float]) -> str:
    return "above" if d[1] > 0 else "below" if d[2] < 0 else "not distinguishable (the interval holds 0)"


def render_evaluation(ev: dict, run: dict, tmp: Path) -> list[str]:
    """One evaluate stage: the model table, its notes, the baseline section and the quality plots."""
    results, comparison = ev["results"], ev["comparison"]
    cfg = ev.get("config") or {}
    ref = comparison.get("reference")
    rows = model_rows(results, ev["planned_models"], run, comparison)
    metric = METRIC_BY_KEY.get(comparison.get("metric") or "")
    ns = {r["metrics"].get("n") for r in rows if r["evaluated"] and r["metrics"].get("n") is not None}
    title = f"Evaluation `{ev['name']}`"
    where = [f"split `{cfg['split']}`" if cfg.get("split") else None,
             f"{ns.pop()} examples" if len(ns) == 1 else None, ev["status"] if ev["status"] != "done" else None]
    lines = [f"## {title}" + (f" ({', '.join(w for w in where if w)})" if any(where) else ""), ""]
    paired = any(r["delta"] is not None for r in rows)
    header = ["model", "stage", "params", "non-emb params", "disk MiB",
              f"{metric.label}{' (95% CI)' if any(metric_ci(metric, r['metrics']) for r in rows) else ''}" if metric
              else "metric",
              "retention", *([f"Δ{'' if metric.key == 'auc' else ' '}{metric.label} vs reference, paired (95% CI)"]
                             if paired else []),
              "prefill tok/s", "decode tok/s", "cand/s", "prefill ×", "decode ×", "cand/s ×"]
    fewer = any(x is not None for r in rows for x in r["fewer_params"])  # comparisons before slimlm wrote it: none
    if fewer:
        header.append("fewer params (non-emb / total)")
    table = []
    ref_contended = any(r["reference"] and contended(r) for r in rows)
    for r in rows:
        name = f"**{r['model']}**" if r["reference"] else r["model"]
        if not r["evaluated"]:
            cells = [name, r["kind"]] + [MISSING] * (len(header) - 2)
            cells[5] = "missing"
            table.append(cells)
            continue
        value = metric_text(r["metric"], r["metrics"]) if r["metric"] else MISSING
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
        delta_cell = ["—" if r["reference"] else MISSING if r["delta"] is None else _delta_text(r["delta"])] \
            if paired else []
        mark = "‡" if contended(r) else ""  # the probe shared the CPU: its speeds and its × are not comparable
        times_mark = "‡" if (mark or ref_contended) and not r["reference"] else mark
        table.append([name, r["kind"], _count(r["params_total"]), _count(r["params_non_embedding"]), _mib(r["disk_mib"]),
                      value, ret, *delta_cell, _rate(r["prefill"]) + mark, _rate(r["decode"]) + mark, cands + mark,
                      *(_times(x) + (times_mark if x is not None else "") for x in r["speedup"].values()),
                      *([_fewer(r)] if fewer else [])])
    lines += _table(header, table, right=range(2, len(header)))
    lines += ["", f"- Reference (**bold**): {comparison.get('reference_why')}. Retention = metric / reference metric"
              + (" (perplexity: reference / metric)" if metric and not metric.higher_is_better else "")
              + "; ×: speed / reference speed; fewer params: the reference's parameter counts / the model's."]
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
    shared = [r for r in rows if contended(r)]
    if shared:
        lines.append("- ‡: measured while other work held the CPU — the probe's process got "
                     + ", ".join(f"{r['cpu_share']:.0%} (`{r['model']}`)" for r in shared)
                     + f" of its threads' time (the report flags below {CONTENDED_SHARE:.0%}): such speeds can be "
                     "several times low, and their × columns (every × against a flagged reference) are not "
                     "comparable; for speeds, evaluate again on an idle machine.")
    if any(r["candidates_from_eval"] for r in rows):
        lines.append("- †: no speed probe; candidates/s measured during the evaluation itself (tokenization, padding and "
                     "batching included), not comparable with the probe.")
    missing = [r["model"] for r in rows if not r["evaluated"]]
    if missing:
        lines.append("- Missing (not evaluated: the stage " + ("did not finish" if ev["status"] != "done" else
                     "holds no result") + "): " + ", ".join(f"`{m}`" for m in missing) + ".")
    lines.append("")
    base = comparison.get("baseline") if metric is not None and metric.key == "auc" else None
    lines += render_baseline(base, rows, cfg.get("split"))
    if metric is not None:
        rank = metric.key == "auc"
        speed_axes = [("candidates" if rank else "decode", "ranking candidates/s" if rank else "decode tokens/s", True),
                      ("prefill", "prefill tokens/s", True)]
        size_axes = [("params_non_embedding", "non-embedding parameters", True), ("disk_mib", "disk (MiB)", True)]
        line = (f"{base['model']} baseline", base["auc"]) if base and "error" not in base else None
        for stem, axes, what in (("quality-vs-speed", speed_axes, "speed"), ("quality-vs-size", size_axes, "size")):
            png = f"{stem}-{ev['name']}.png"
            if plot_quality(rows, metric, tmp / png, axes, f"{metric.label} vs {what} ({ev['name']})", line):
                lines += [f"![{metric.label} vs {what}]({png})", ""]
            else:
                lines += [f"No model has both {metric.label} and {what} figures: no {what} plot.", ""]
    return lines
