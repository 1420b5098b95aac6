"""The divergence guard: a training step is good only if its loss and gradient norm are finite and
neither is a spike.

A spike is a value above ``factor`` times the running median of the last :data:`WINDOW` good values of
the same quantity in the same mode (a two-stage run's modes differ in scale), once ``warmup`` of them are
known; ``factor`` 0 or None turns the spike check off (non-finite values always stop the run). The
history is a plain JSON-able dict, saved in the checkpoint, so a resumed run judges every step as the
uninterrupted run does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

import torch

WINDOW = 100  # good values per quantity the running median is taken over

History = dict[str, list[float]]


def divergence(history: History, key: str, value: float, factor: float | None, warmup: int) -> str | None:
    """Why ``value`` (this step's ``key``, ``"<mode>.<quantity>"``, e.g. ``"kd.loss"``) means the run
    diverged, or None when it is good. A zero running median makes nothing a spike."""
    name = key.rsplit(".", 1)[-1].replace("_", " ")
    if not math.isfinite(value):
        return f"{name} is {value}"
    past = history.get(key, [])
    if factor and len(past) >= warmup:
        median = statistics.median(past)
        if median > 0 and value > factor * median:
            return f"{name} {value:.4g} is over {factor:g}x its running median {median:.4g}"
    return None


def remember(history: History, key: str, value: float) -> None:
    """Add a good step's value to the history, keeping the last :data:`WINDOW`."""
    past = history.setdefault(key, [])
    past.append(value)
    del past[:-WINDOW]


def nonfinite_count(tensors: Iterable[torch.Tensor]) -> int:
    """Elements that are NaN or ±inf over ``tensors`` (this rank's shard of a distributed tensor)."""
    total = 0
    for t in tensors:
        t = t.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        total += int((~torch.isfinite(t)).sum())
    return total


def total_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' total L2 norm before clipping (what ``clip_grad_norm_`` returns); clips them to
    ``max_norm`` when set. A distributed tensor's norm is the global one, the same on every rank."""
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
