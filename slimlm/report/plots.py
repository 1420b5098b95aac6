"""The report's PNG plots: quality vs speed / size per evaluate stage, training curves per distill stage.

matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), imported only when a
report is written. Plots draw numbers the stages wrote; they compute none of their own.
"""

from __future__ import annotations

import math
from pathlib import Path

from slimlm.comparison import Metric, contended, num


def _figure(panels: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def plot_quality(rows: list[dict], metric: Metric, path: Path, axes_spec: list[tuple[str, str, bool]],
                 title: str, baseline: tuple[str, float] | None = None) -> bool:
    """Scatter the task metric (y) against each (row key, x label, log x) panel; one labelled point per
    model, the reference starred, on a speed panel a name marked ‡ where its probe shared the CPU (as the
    table marks it); ``baseline`` = (label, value) draws a dashed line. Returns False (and writes nothing) when
    no model has both numbers."""
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
        flag = key in ("prefill", "decode", "candidates")  # a speed panel: a probe that shared the CPU is marked
        labels = [(r[key], r["value"], r["model"] + ("‡" if flag and contended(r) else "")) for r in points]
        for (x, y), names, below in _label_groups(labels, logx):
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
        pts = [(num(r.get("step")), num(r.get(key))) for r in rows]
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


