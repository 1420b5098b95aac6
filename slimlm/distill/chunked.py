"""Chunked fused-linear distillation loss: LM head + divergence without [tokens x vocab] logits.

Inputs are the final hidden states, not logits: student ``h_S`` [N, H_S] with its LM head ``W_S``
[V_S, H_S] (and optional bias), and teacher ``h_T`` [N, H_T] with ``W_T`` [V_T, H_T]; the hidden sizes
may differ. Only rows whose label is not ``ignore_index`` are computed at all.

The forward pass walks the target rows in chunks of ``chunk_size``. For each chunk it forms the
student and teacher logits [C, V], the per-token loss (:func:`slimlm.distill.losses.kd_token_losses`,
so the math is the same code as the plain form) and, right away, the gradients of that chunk's loss
with respect to ``h_S`` rows and ``W_S`` (accumulated in fp32). The chunk's logits are then freed. The
backward pass only scales the stored gradients by the incoming gradient. Peak memory is therefore
O(C x V) for the logits plus O(N x H_S + V x H_S) for the gradients, instead of O(N x V) several times.
"""

from __future__ import annotations

import torch

from slimlm import SlimlmError
from slimlm.distill.losses import LossConfig, kd_token_losses


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, cfg, vocab, chunk, grad_mode):
        need_h, need_w, need_b = (grad_mode and ctx.needs_input_grad[i] for i in range(3))
        rows = (labels != cfg.ignore_index).nonzero().squeeze(1)
        grad_h = torch.zeros(s_hidden.shape, dtype=torch.float32, device=s_hidden.device) if need_h else None
        grad_w = torch.zeros((vocab, s_weight.shape[1]), dtype=torch.float32, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=s_weight.device) if need_b else None
        w = s_weight.detach()[:vocab].requires_grad_(need_w)
        b = s_bias.detach()[:vocab].requires_grad_(need_b) if s_bias is not None else None
        total = torch.zeros((), dtype=torch.promote_types(s_hidden.dtype, torch.float32), device=s_hidden.device)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            if t_hidden is not None:
                with torch.no_grad():
                    zt = t_hidden.index_select(0, idx) @ t_weight[:vocab].T
                    if t_bias is not None:
                        zt = zt + t_bias[:vocab]
            else:  # pure hard-label loss (SFT): no teacher
                zt = None
            with torch.enable_grad():
                h = s_hidden.detach().index_select(0, idx).requires_grad_(need_h)
                zs = h @ w.T
                if b is not None:
                    zs = zs + b
                loss = kd_token_losses(zs, zs if zt is None else zt, labels.index_select(0, idx), cfg, vocab).sum()
                wanted = [x for x, need in ((h, need_h), (w, need_w), (b, need_b)) if need and x is not None]
                grads = iter(torch.autograd.grad(loss, wanted)) if wanted else iter(())
            if need_h:
                grad_h.index_add_(0, idx, next(grads).float())
            if need_w:
                grad_w += next(grads).float()
            if need_b and b is not None:
                grad_b += next(grads).float()
            total += loss.detach()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.shapes = (s_hidden.dtype, s_weight.shape, s_weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_shape, w_dtype = ctx.shapes
        gh = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        gw = gb = None
        if grad_w is not None:
            gw = torch.zeros(w_shape, dtype=w_dtype, device=grad_w.device)
            gw[: grad_w.shape[0]] = (grad_w * grad_out).to(w_dtype)
        if grad_b is not None:
            gb = torch.zeros(w_shape[0], dtype=w_dtype, device=grad_b.device)
            gb[: grad_b.shape[0]] = (grad_b * grad_out).to(w_dtype)
        return gh, gw, gb, None, None, None, None, None, None, None, None


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Summed KD (+ CE) loss over target tokens, equal to ``kd_loss(h_S W_S^T, h_T W_T^T, labels)``.

    Shapes: hidden [N, H] (flatten batch and time first; shift labels yourself), weights [V, H],
    labels [N]. ``teacher_*`` may be omitted only when ``cfg.kd_weight == 0`` (pure cross-entropy).
    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``; never to the teacher.
    """
    if student_hidden.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student_hidden.shape[0]:
        raise SlimlmError(f"expected hidden [N, H] and labels [N], got {tuple(student_hidden.shape)} "
                          f"and {tuple(labels.shape)}")
    if teacher_hidden is None and cfg.kd_weight:
        raise SlimlmError("teacher hidden states are required when kd_weight > 0")
    if teacher_hidden is not None and teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise SlimlmError(f"student and teacher token counts differ: {student_hidden.shape[0]} vs "
                          f"{teacher_hidden.shape[0]}")
    widths = [student_weight.shape[0]] + ([teacher_weight.shape[0]] if teacher_weight is not None else [])
    vocab = vocab_size or min(widths)
    if vocab > min(widths):
        raise SlimlmError(f"vocab_size {vocab} exceeds a logit width {min(widths)}")
    if chunk_size < 1:
        raise SlimlmError("chunk_size must be at least 1")
    # under no_grad (evaluation) the chunks compute the loss only, no gradients
    return _FusedLinearKD.apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, labels, cfg, vocab, chunk_size, torch.is_grad_enabled())
