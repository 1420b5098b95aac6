"""Calibration statistics for quantization: forward hooks that collect per-Linear input statistics.

For a linear layer with inputs x_t ∈ R^in (one row per token) we collect, over n calibration tokens:

- ``hessian``: H = (1/n) Σ_t x_t x_tᵀ  [in, in]  (GPTQ's layer Hessian, up to the factor 2)
- ``channel_absmax``: max_t |x_t,j|  [in]      (SmoothQuant's activation ranges)
- ``absmax``: max_t,j |x_t,j|                   (a static per-tensor activation scale)

The hooks only read the inputs; the model's outputs are unchanged. The calibration blocks, their batches
and the layer-by-layer passes of sequential GPTQ come from :mod:`slimlm.calib`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slimlm.calib import batches


@dataclass
class InputStats:
    """Running statistics of one layer's inputs (see the module docstring)."""

    want_hessian: bool = False
    want_channel_absmax: bool = False
    count: int = 0
    absmax: float = 0.0
    hessian_sum: torch.Tensor | None = field(default=None, repr=False)
    channel_absmax: torch.Tensor | None = field(default=None, repr=False)

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if x2.shape[0] == 0:
            return
        self.count += x2.shape[0]
        amax = x2.abs().amax(0)
        self.absmax = max(self.absmax, float(amax.max()))
        if self.want_channel_absmax:
            self.channel_absmax = amax if self.channel_absmax is None else torch.maximum(self.channel_absmax, amax)
        if self.want_hessian:
            if self.hessian_sum is None:
                self.hessian_sum = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device)
            self.hessian_sum += (x2.T @ x2).double()  # fp32 product per batch, fp64 running sum

    @property
    def hessian(self) -> torch.Tensor:
        if self.hessian_sum is None or self.count == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.hessian_sum / self.count


@contextlib.contextmanager
def record_inputs(modules: dict[str, nn.Module], *, hessian: bool = False,
                  channel_absmax: bool = False) -> Iterator[dict[str, InputStats]]:
    """Collect :class:`InputStats` for each named module while the ``with`` body runs forward passes."""
    stats = {name: InputStats(want_hessian=hessian, want_channel_absmax=channel_absmax) for name in modules}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(lambda _m, inputs, _out, s=stats[name]: s.update(inputs[0])))
        yield stats
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- whole-decoder pass


@torch.no_grad()
def run_decoder(model, blocks: torch.Tensor | Sequence[Sequence[int]], batch_size: int = 8,
                progress: Callable[[int], None] | None = None,
                on_output: Callable[[torch.Tensor], None] | None = None) -> None:
    """Forward the decoder stack over ``blocks`` [N, T] in batches of ``batch_size`` (no LM head, no KV
    cache); hooks see every layer's inputs. ``progress`` receives the number of blocks just finished.

    ``on_output`` receives the final (normed) hidden states, i.e. the LM head's inputs."""
    device = next(model.parameters()).device
    base = model.get_decoder()
    for ids in batches(blocks, batch_size, device):
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        if on_output is not None:
            on_output(hidden)
        if progress:
            progress(ids.shape[0])

