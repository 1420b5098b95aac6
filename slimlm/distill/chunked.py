"""Chunked fused-linear distillation loss: LM head + divergence without [tokens x vocab] logits.

Inputs are the final hidden states, not logits: student ``h_S`` [N, H_S] with its LM head ``W_S``
[V_S, H_S] (and optional bias), and teacher ``h_T`` [N, H_T] with ``W_T`` [V_T, H_T]; the hidden sizes
may differ. Only rows whose label is not ``ignore_index`` are computed at all.

The forward pass walks the target rows in chunks of ``chunk_size``. For each chunk it forms the
student and teacher logits [C, V], the per-token loss (:func:`slimlm.distill.losses.kd_token_losses`,
so the math is the same code as the plain form) and, right away, its gradient g with respect to the
chunk's logits; then ``grad_h[rows] += g W_S`` and ``grad_W += gᵀ h`` go straight into accumulators
(fp32, or fp64 for fp64 inputs). The chunk's logits are then freed. The backward pass only scales the
stored gradients, in place, by the incoming gradient. Peak memory is therefore
O(C x V) for the logits plus O(N x H_S + V x H_S) for the gradients, instead of O(N x V) several times.

The teacher side is a per-chunk closure, so the same machinery serves a live teacher (its hidden states
and LM head: :func:`fused_linear_kd_loss`) and a cached sparse teacher (top-k log-probs + tail mass:
:func:`fused_linear_cached_kd_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimlm import SlimlmError
from slimlm.distill.losses import (
    LossConfig,
    cached_token_losses,
    closed_form_grad,
    closed_form_value_and_grad,
    kd_token_losses,
)

# the closed-form per-chunk function: closed_form_value_and_grad or the same function compiled
# (slimlm.compiled.Compiled; see compile_closed_form)
ClosedForm = Callable[..., tuple[torch.Tensor, torch.Tensor]]
COMPILE_MIN_TILE = 2**20  # "auto": compile the per-chunk maths when a chunk's logits have at least this many entries


def compile_closed_form(setting: bool | str, chunk_size: int, vocab: int) -> ClosedForm:
    """The per-chunk closed form a run uses: compiled when ``setting`` is True, or "auto" and a chunk's
    [chunk_size, vocab] logits tile has ≥ COMPILE_MIN_TILE entries (there the fused element-wise passes save
    more than a compile costs: forward KL ~37 -> 8 ms per 64 x 49,152 chunk on a 2-core CPU; tiny test models
    stay eager, where compiling would cost seconds for nothing)."""
    from slimlm.compiled import Compiled

    if setting is True or (setting == "auto" and chunk_size * vocab >= COMPILE_MIN_TILE):
        return Compiled(closed_form_value_and_grad, "the per-chunk loss")
    return closed_form_value_and_grad

# chunk_loss(student_logits [C, V], rows [C] (indices into N), targets slice (positions among target rows))
# returns per-token losses [C] (differentiated by autograd), or (loss sum, dloss/dlogits [C, V]) when the
# gradient has a closed form
ChunkLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, labels, chunk_loss: ChunkLoss, ignore_index, vocab, chunk, grad_mode):
        need_h, need_w, need_b = (grad_mode and ctx.needs_input_grad[i] for i in range(3))
        need_b = need_b and s_bias is not None
        rows = (labels != ignore_index).nonzero().squeeze(1)
        acc = torch.promote_types(s_hidden.dtype, torch.float32)  # gradient accumulators: >= fp32
        low = gemm_dtype(s_hidden)  # bf16 / fp16: the LM-head GEMMs run in it (None: in acc)
        w = s_weight.detach()[:vocab]
        w_acc = w.to(low or acc)  # the weight as the GEMMs take it (one copy per call, not per chunk, if any)
        b = s_bias.detach()[:vocab] if s_bias is not None else None
        grad_h = torch.zeros(s_hidden.shape, dtype=acc, device=s_hidden.device) if need_h else None
        grad_w = torch.zeros((vocab, s_weight.shape[1]), dtype=acc, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=s_weight.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=s_hidden.device)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            h = s_hidden.detach().index_select(0, idx)
            zs = h.to(w_acc.dtype) @ w_acc.T
            if b is not None:
                zs = zs + b
            # autograd runs only from the chunk's loss back to its logits [C, V]; the LM-head products
            # are done by hand into the accumulators, so no [V, H] temporaries appear per chunk
            wants_grad = need_h or need_w or need_b
            # a closed-form chunk loss takes the GEMM's logits as they are (it widens them inside, and gives its
            # gradient back in the GEMMs' dtype: no widened [C, V] copy each way); autograd needs them in acc
            z = zs if getattr(chunk_loss, "takes_low", False) else zs.to(acc)
            with torch.enable_grad():
                out = chunk_loss(z.requires_grad_(wants_grad), idx, slice(start, start + idx.numel()))
                closed = isinstance(out, tuple)  # closed form: (sum, grad), no autograd graph was built
                loss, g = out if closed else (out.sum(), None)
                if wants_grad and not closed:
                    g = torch.autograd.grad(loss, [z])[0]
            del zs, z
            if wants_grad:
                gw = g.to(w_acc.dtype)  # the products in the GEMMs' precision (bf16 / fp16 when low), sums in acc
                if need_h:
                    grad_h.index_add_(0, idx, (gw @ w_acc).to(acc))
                if need_w and low:  # a [V, H] low-precision temporary per chunk, as autograd would make
                    grad_w.add_(gw.T @ h.to(low))
                elif need_w:
                    grad_w.addmm_(g.T, h.to(acc))  # in place: no [V, H] temporary per chunk
                if need_b:
                    grad_b += g.sum(0, dtype=acc)
            total += loss.detach()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.shapes = (s_hidden.dtype, s_weight.shape, s_weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_shape, w_dtype = ctx.shapes
        gh = grad_h.mul_(grad_out).to(h_dtype) if grad_h is not None else None
        return gh, _fit(grad_w, grad_out, w_shape, w_dtype), _fit(grad_b, grad_out, w_shape[:1], w_dtype), \
            None, None, None, None, None, None


def _fit(grad: torch.Tensor | None, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
    """Scale an accumulator in place; pad rows past ``vocab`` with zeros only if the weight is wider."""
    if grad is None:
        return None
    grad.mul_(scale)
    if grad.shape == shape:
        return grad.to(dtype)
    out = torch.zeros(shape, dtype=dtype, device=grad.device)
    out[: grad.shape[0]] = grad
    return out


def gemm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The low precision the LM-head products run in: autocast's dtype inside an autocast region, else the
    input's own when it is bf16 / fp16 (a model trained in bf16, FSDP2's bf16 parameters); None: full precision.
    (On a GPU an fp32 GEMM is ~10x slower than bf16: first measured on an H200, the chunked loss 5x slower
    than Liger's until the products of bf16 inputs stopped running in fp32.)"""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None


def exact(device: torch.device):
    """A context with autocast off: the per-chunk softmax / divergence maths run in the accumulators' dtype
    (fp32 or fp64) even inside a bf16 autocast region; only the LM-head products are low precision."""
    return torch.autocast(device.type, enabled=False)


def _check(student_hidden, labels, chunk_size) -> None:
    if student_hidden.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student_hidden.shape[0]:
        raise SlimlmError(f"expected hidden [N, H] and labels [N], got {tuple(student_hidden.shape)} "
                          f"and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise SlimlmError("chunk_size must be at least 1")


def _apply(student_hidden, student_weight, student_bias, labels, chunk_loss, cfg, vocab, chunk_size):
    # under no_grad (evaluation) the chunks compute the loss only, no gradients
    return _FusedLinearLoss.apply(student_hidden, student_weight, student_bias, labels, chunk_loss,
                                  cfg.ignore_index, vocab, chunk_size, torch.is_grad_enabled())


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
    chunk_size: int = 64,
    closed_form: ClosedForm = closed_form_value_and_grad,
) -> torch.Tensor:
    """Summed KD (+ CE) loss over target tokens, equal to ``kd_loss(h_S W_S^T, h_T W_T^T, labels)``.

    Shapes: hidden [N, H] (flatten batch and time first; shift labels yourself), weights [V, H],
    labels [N]. ``teacher_*`` may be omitted only when ``cfg.kd_weight == 0`` (pure cross-entropy).
    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``; never to the teacher.
    Divergences with a closed-form gradient (:func:`~slimlm.distill.losses.closed_form_grad`) run
    ``closed_form`` per chunk (:func:`compile_closed_form` gives a compiled one); the rest use autograd.
    """
    _check(student_hidden, labels, chunk_size)
    if teacher_hidden is None and cfg.kd_weight:
        raise SlimlmError("teacher hidden states are required when kd_weight > 0")
    if teacher_hidden is not None and teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise SlimlmError(f"student and teacher token counts differ: {student_hidden.shape[0]} vs "
                          f"{teacher_hidden.shape[0]}")
    widths = [student_weight.shape[0]] + ([teacher_weight.shape[0]] if teacher_weight is not None else [])
    vocab = vocab_size or min(widths)
    if vocab > min(widths):
        raise SlimlmError(f"vocab_size {vocab} exceeds a logit width {min(widths)}")

    closed = closed_form_grad(cfg)

    def chunk_loss(zs: torch.Tensor, idx: torch.Tensor, _: slice):
        y = labels.index_select(0, idx)
        zt = None
        if teacher_hidden is not None and cfg.kd_weight:
            with torch.no_grad():
                zt = teacher_hidden.detach().index_select(0, idx) @ teacher_weight.detach()[:vocab].T
                if teacher_bias is not None:
                    zt = zt + teacher_bias.detach()[:vocab]
        if closed:  # value and gradient in closed form, no autograd graph; zs, zt as the GEMMs gave them
            with torch.no_grad(), exact(zs.device):
                loss, grad = closed_form(zs.detach(), zt, y, cfg.divergence, cfg.beta, cfg.temperature,
                                         cfg.kd_weight, cfg.ce_weight, cfg.ignore_index, grad_dtype=zs.dtype)
            return loss.sum(), grad
        zt = zt if zt is None else zt.to(zs.dtype)  # bf16 under autocast; the maths is zs's dtype (acc)
        with exact(zs.device):
            return kd_token_losses(zs, zt, y, cfg, vocab)  # not closed form: kd_weight > 0, so zt exists

    chunk_loss.takes_low = bool(closed)  # see _FusedLinearLoss.forward
    return _apply(student_hidden, student_weight, student_bias, labels, chunk_loss, cfg, vocab, chunk_size)


def fused_linear_cached_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig,
    *,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Summed loss against a cached sparse teacher, chunked like :func:`fused_linear_kd_loss`.

    ``teacher_ids`` / ``teacher_logprobs`` [T, k] and ``teacher_tail`` [T] hold one row per *target*
    token, in the order the targets appear in ``labels`` (T = number of labels != ignore_index).
    """
    _check(student_hidden, labels, chunk_size)
    n_targets = int((labels != cfg.ignore_index).sum())
    if teacher_ids.shape[0] != n_targets or teacher_logprobs.shape != teacher_ids.shape \
            or teacher_tail.shape[0] != n_targets:
        raise SlimlmError(f"cached teacher rows ({teacher_ids.shape[0]}) do not match the batch's "
                          f"{n_targets} target tokens")
    vocab = vocab_size or student_weight.shape[0]

    def chunk_loss(zs: torch.Tensor, idx: torch.Tensor, pos: slice) -> torch.Tensor:
        with exact(zs.device):
            return cached_token_losses(zs, teacher_ids[pos], teacher_logprobs[pos], teacher_tail[pos],
                                       labels.index_select(0, idx), cfg, vocab)

    return _apply(student_hidden, student_weight, student_bias, labels, chunk_loss, cfg, vocab, chunk_size)
