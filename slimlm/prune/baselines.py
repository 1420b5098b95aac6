"""Baseline group importances for structured pruning (pure tensor functions), same interface as OSSCAR.

A group is ``m`` contiguous input columns of ``W [out, n]`` (``down_proj``: m = 1 per neuron; ``o_proj``:
m = head_dim per head, or a KV group's heads). Baselines score groups, keep the top ``keep`` (with the
same per-partition counts as OSSCAR when partitions are given) and keep the kept weights unchanged
(no refit: that is what distinguishes them from OSSCAR and its greedy variant).

* ``magnitude``: ``‖W[:, group]‖_F``, the weights that read the group.
* ``activation`` (Minitron-style): ``‖X[:, group]‖_F`` over the calibration tokens, i.e. the L2 norm of
  the neuron's activation / of the head's attention output, ``sqrt(Σ_{c∈group} H_cc)``.
"""

from __future__ import annotations

import torch


def magnitude_scores(W: torch.Tensor, m: int) -> torch.Tensor:
    """[n/m] Frobenius norms of the column groups of ``W [out, n]``."""
    out, n = W.shape
    return W.to(torch.float64).reshape(out, n // m, m).pow(2).sum((0, 2)).sqrt()


def activation_scores(h_diag: torch.Tensor, m: int) -> torch.Tensor:
    """[n/m] L2 norms of the groups' calibration activations from ``diag(H) [n]`` (sums of squares)."""
    return h_diag.to(torch.float64).reshape(-1, m).sum(1).clamp_min(0).sqrt()


def top_groups(scores: torch.Tensor, keep: int, part: torch.Tensor | None = None) -> list[int]:
    """Ascending indices of the ``keep`` highest-scoring groups; with ``part``, the same number in every
    partition (the highest within each). Ties go to the lower index."""
    n = scores.numel()
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} groups")
    # stable descending sort: equal scores keep index order
    order = sorted(range(n), key=lambda g: (-float(scores[g]), g))
    if part is None:
        return sorted(order[:keep])
    parts = torch.unique(part).tolist()
    if keep % len(parts):
        raise ValueError(f"cannot keep {keep} groups evenly over {len(parts)} partitions")
    per = keep // len(parts)
    kept: list[int] = []
    for p in parts:
        members = [g for g in order if int(part[g]) == p]
        if len(members) < per:
            raise ValueError(f"partition {p} has only {len(members)} groups")
        kept += members[:per]
    return sorted(kept)
