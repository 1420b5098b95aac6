"""Optimizer-state CPU offload: AdamW's moments and fp32 master weights live in host memory.

On a GPU this frees device memory of 12 bytes per trainable parameter (fp32 master + two moments) —
for a bf16 student also the precision loss of bf16 updates. Each step copies the gradients to the host,
steps AdamW there, and copies the updated weights back. On a CPU-only run the copies are same-device
and the result is bit-identical to plain AdamW (tested), which is how the mechanism is checked here.
"""

from __future__ import annotations

import torch


class OffloadAdamW(torch.optim.AdamW):
    """AdamW over host-memory fp32 master copies of ``params``; the model keeps its own device tensors."""

    def __init__(self, params, **kwargs):
        self.device_params = [p for p in params]
        pin = torch.cuda.is_available()
        masters = [self._master(p, pin) for p in self.device_params]
        super().__init__(masters, **kwargs)

    @staticmethod
    def _master(p: torch.Tensor, pin: bool) -> torch.Tensor:
        m = p.detach().to("cpu", dtype=torch.float32, copy=True)
        return (m.pin_memory() if pin else m).requires_grad_(True)

    @torch.no_grad()
    def resync(self) -> None:
        """Copy the model's current weights into the masters (after loading a checkpoint into the model)."""
        for p, m in zip(self.device_params, self.param_groups[0]["params"], strict=True):
            m.copy_(p.detach().float())

    @torch.no_grad()
    def step(self, closure=None):
        masters = self.param_groups[0]["params"]
        for p, m in zip(self.device_params, masters, strict=True):
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        loss = super().step(closure)
        for p, m in zip(self.device_params, masters, strict=True):
            p.copy_(m.to(p.device, p.dtype, non_blocking=True))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.device_params:
            p.grad = None
