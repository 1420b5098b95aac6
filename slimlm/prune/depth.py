"""Depth pruning: which decoder layers to remove, from importances measured on calibration data.

Two importance measures (higher = more important; the lowest are removed):

* ``cosine`` (block influence, as in ShortGPT): ``1 − E_tokens cos(x_in, x_out)`` for the layer's input
  and output hidden states. A layer that barely turns the residual stream is cheap to drop.
* ``loss``: ``L(model without layer i) − L(model)``, the next-token loss increase when the layer is
  skipped (its output replaced by its input). One forward pass per layer: slower, more direct.

Layers are removed in one shot (importances measured once on the full model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_cosines(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity per token of ``x`` and ``y`` [..., hidden] -> [...] (computed in float32)."""
    x, y = x.float(), y.float()
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)


def block_influence(mean_cosines: Sequence[float]) -> list[float]:
    """Importance ``1 − mean cos(in, out)`` per layer."""
    return [1.0 - c for c in mean_cosines]


def loss_importance(base_loss: float, skipped_losses: Sequence[float]) -> list[float]:
    """Importance ``L(without layer i) − L(full)`` per layer."""
    return [s - base_loss for s in skipped_losses]


def select_layers(importance: Sequence[float], keep: int) -> list[int]:
    """Indices (ascending) of the ``keep`` most important layers; ties keep the earlier layer."""
    n = len(importance)
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} layers")
    order = sorted(range(n), key=lambda i: (-importance[i], i))
    return sorted(order[:keep])
