"""Distillation losses on logits: the divergences, temperature, hard-label mixing, token normalisation.

Notation, per token: ``t = log p_T`` (teacher) and ``s = log p_S`` (student) are log-softmax of the
logits divided by the temperature τ, over the vocabulary ``V``.

    forward_kl        KL(p_T ‖ p_S) = Σ p_T (t − s)                       (mode-covering; "word-level KD")
    reverse_kl        KL(p_S ‖ p_T) = Σ p_S (s − t)                       (mode-seeking)
    jsd (β)           β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m),  m = β p_T + (1 − β) p_S
                      β = 0 is exactly forward_kl and β = 1 exactly reverse_kl (the endpoints, where
                      the formula itself degenerates to 0, are defined that way, as in GKD / Liger-Kernel)
    skew_kl (α)       KL(p_T ‖ α p_T + (1 − α) p_S)                       (DistiLLM's skew KL)
    skew_reverse_kl   KL(p_S ‖ α p_S + (1 − α) p_T)
    tvd               ½ Σ |p_T − p_S|

Mixtures are formed in log space (``log m = logsumexp(log β + t, log(1 − β) + s)``), never by
exponentiating and adding. KD terms are multiplied by τ² so gradient scale does not shrink with τ.

The training loss over a batch is a *sum* over target tokens (``labels != ignore_index``):

    L = kd_weight · Σ_i D(t_i, s_i) · τ²  +  ce_weight · Σ_i CE(z_S,i, y_i)

and every loop divides by :func:`count_targets` taken over the whole gradient-accumulation window,
so one batch of 8 and 4 micro-batches of 2 give the same update whatever the padding.

Vocabulary: ``vocab_size`` is the number of real tokens. Logit columns at or above it (a padded
embedding matrix, as in Qwen) are dropped, i.e. treated as −inf (zero probability), never as logit 0.
:func:`check_vocab` rejects any other mismatch before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimlm import SlimlmError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


@dataclass(frozen=True)
class LossConfig:
    divergence: str = "forward_kl"
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew_kl / skew_reverse_kl
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise SlimlmError(f"unknown divergence {self.divergence!r}; expected one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.beta <= 1.0:
            raise SlimlmError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha < 1.0:
            raise SlimlmError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.temperature <= 0:
            raise SlimlmError(f"temperature must be positive, got {self.temperature}")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities (rows of finite values)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(w: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """log(w p + (1 − w) q), computed stably in log space; 0 < w < 1."""
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def token_divergence(s: torch.Tensor, t: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-row divergence [N] between student log-probs ``s`` and teacher log-probs ``t`` ([N, V])."""
    kind = cfg.divergence
    if kind == "jsd":
        if cfg.beta == 0.0:
            kind = "forward_kl"
        elif cfg.beta == 1.0:
            kind = "reverse_kl"
        else:
            m = _log_mix(cfg.beta, t, s)
            return cfg.beta * _kl(t, m) + (1 - cfg.beta) * _kl(s, m)
    if kind == "forward_kl":
        return _kl(t, s)
    if kind == "reverse_kl":
        return _kl(s, t)
    if kind == "skew_kl":
        return _kl(t, _log_mix(cfg.alpha, t, s)) if cfg.alpha > 0 else _kl(t, s)
    if kind == "skew_reverse_kl":
        return _kl(s, _log_mix(cfg.alpha, s, t)) if cfg.alpha > 0 else _kl(s, t)
    if kind == "tvd":
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    raise SlimlmError(f"unknown divergence {kind!r}")


def check_vocab(student_vocab: int, teacher_vocab: int | None, tokenizer_vocab: int) -> int:
    """The real vocabulary size both models share, or a clear error.

    Either model's logit width may exceed the tokenizer's vocabulary (padding for efficient matmuls);
    any other difference means the two models do not share a tokenizer and logit KD is meaningless.
    """
    if student_vocab < tokenizer_vocab or (teacher_vocab is not None and teacher_vocab < tokenizer_vocab):
        raise SlimlmError(f"vocabulary mismatch: student has {student_vocab} logits, teacher {teacher_vocab}, "
                          f"tokenizer {tokenizer_vocab} tokens; logit distillation needs a shared tokenizer")
    return tokenizer_vocab


def _weighted(zs: torch.Tensor, labels: torch.Tensor, cfg: LossConfig, divergence) -> torch.Tensor:
    """kd_weight · τ² · divergence(zs) + ce_weight · CE(zs, labels) per token, zero on ignored tokens."""
    keep = labels != cfg.ignore_index
    out = torch.zeros(labels.shape, dtype=zs.dtype, device=zs.device)
    if cfg.kd_weight:
        out = out + torch.where(keep, divergence(zs) * (cfg.kd_weight * cfg.temperature**2), 0.0)
    if cfg.ce_weight:
        ce = F.cross_entropy(zs, labels.masked_fill(~keep, 0), reduction="none")
        out = out + torch.where(keep, ce * cfg.ce_weight, 0.0)
    return out


def _log_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)  # no [C, V] copy at τ = 1


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32 math for bf16/fp16; fp64 stays fp64


def kd_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    cfg: LossConfig, vocab_size: int | None = None) -> torch.Tensor:
    """Weighted per-token loss [N] (zero on ignored tokens) from full logits; see the module docstring."""
    v = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
    dtype = _math_dtype(student_logits)
    zt = teacher_logits[..., :v].to(dtype).detach()

    def divergence(zs: torch.Tensor) -> torch.Tensor:
        return token_divergence(_log_softmax(zs, cfg.temperature), _log_softmax(zt, cfg.temperature), cfg)

    return _weighted(student_logits[..., :v].to(dtype), labels, cfg, divergence)


# A finite stand-in for log 0 in the tail bucket: exp(-1e4) is exactly 0 in fp32, yet the gradients of
# logsumexp / mixtures stay finite (a true -inf would give 0 * nan = nan when the tail is empty, k = V).
LOG_ZERO = -1e4


def topk_buckets(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Collapse log-probs [N, V] onto the buckets [N, k + 1]: the k listed tokens, then the tail (the rest)."""
    top = logp.gather(-1, ids)
    rest = torch.logsumexp(logp.scatter(-1, ids, LOG_ZERO), dim=-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def cached_token_losses(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                        teacher_tail: torch.Tensor, labels: torch.Tensor, cfg: LossConfig,
                        vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss [N] against a cached sparse teacher: top-k log-probs [N, k] + tail log-mass [N].

    Both distributions are compared on k + 1 buckets (the teacher's top-k tokens and "everything else"),
    so every divergence applies unchanged; with k = V the tail is empty and this equals the dense loss.
    The cached log-probs must have been computed at ``cfg.temperature``.
    """
    v = vocab_size or student_logits.shape[-1]
    dtype = _math_dtype(student_logits)
    t = torch.cat([teacher_logprobs.to(dtype), teacher_tail.to(dtype)[..., None]], -1).clamp_min(LOG_ZERO)

    def divergence(zs: torch.Tensor) -> torch.Tensor:
        s = topk_buckets(_log_softmax(zs, cfg.temperature), teacher_ids.long())
        return token_divergence(s, t, cfg)

    return _weighted(student_logits[..., :v].to(dtype), labels, cfg, divergence)


def closed_form_grad(cfg: LossConfig) -> bool:
    """Whether :func:`closed_form_value_and_grad` covers ``cfg``: cross-entropy alone, or forward KL, reverse
    KL or JSD (any β), each with or without cross-entropy. The skew divergences and TVD use autograd."""
    return cfg.kd_weight == 0 or cfg.divergence in ("forward_kl", "reverse_kl", "jsd")


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v] · b[n, v] per row."""
    return (a * b).sum(-1)


def closed_form_value_and_grad(zs: torch.Tensor, zt: torch.Tensor | None, labels: torch.Tensor, divergence: str,
                               beta: float, tau: float, w: float, c: float, ignore_index: int = -100,
                               grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] and its gradient w.r.t. the student logits ``zs`` [N, V], in closed form (no autograd
    graph); ``zt`` [N, V] the teacher's logits (None when ``w`` = 0). The same values as
    :func:`kd_token_losses` (tested), as plain tensor maths that ``torch.compile`` fuses into a few passes.
    Logits of any float dtype: the maths runs in at least float32 (bf16 / fp16 logits are widened inside, so
    a compiled function reads them as they are, without a widened copy first); the loss comes back in that
    precision, the gradient in ``grad_dtype`` (default: that precision; the chunked loss asks for the LM-head
    products' dtype, the narrowing fused into the same pass).

    With s = log p_S, t = log p_T (log-softmax of z / τ), the token loss is L = w τ² D + c CE(z_S, y) and

        forward KL   D = Σ p_T (t − s)                      dD/dz_S = (p_S − p_T) / τ
        reverse KL   D = Σ p_S (s − t)                      dD/dz_S = p_S ⊙ (g − ⟨p_S, g⟩) / τ,  g = s − t
        JSD (β)      D = β Σ p_T (t − m) + (1 − β) Σ p_S (s − m),  m = log(β p_T + (1 − β) p_S)
                                                            dD/dz_S = p_S ⊙ (g − ⟨p_S, g⟩) / τ,  g = (1 − β)(s − m)
        CE           −log softmax(z_S)_y                    dCE/dz_S = softmax(z_S) − e_y

    (for JSD, ∂D/∂p_S = (1 − β)(s − m): the terms from m's dependence on p_S sum to zero); JSD with β = 0 is
    forward KL and with β = 1 reverse KL, as in :func:`token_divergence`. Ignored tokens get 0 and 0.
    """
    zs = zs.to(torch.promote_types(zs.dtype, torch.float32))
    keep = (labels != ignore_index).to(zs.dtype)
    loss = zs.new_zeros(zs.shape[0])
    grad = zs.new_zeros(zs.shape)
    if w:
        kind = divergence
        if kind == "jsd" and beta in (0.0, 1.0):
            kind = "forward_kl" if beta == 0.0 else "reverse_kl"
        s = torch.log_softmax(zs / tau, -1)
        t = torch.log_softmax(zt.to(zs.dtype) / tau, -1)
        p_s = s.exp()
        if kind == "forward_kl":
            p_t = t.exp()
            d, g_z = _rowdot(p_t, t - s), p_s - p_t
        else:
            if kind == "reverse_kl":
                d = _rowdot(p_s, s - t)
                g = s - t
            else:
                m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
                d = beta * _rowdot(t.exp(), t - m) + (1 - beta) * _rowdot(p_s, s - m)
                g = (1 - beta) * (s - m)
            g_z = p_s * (g - _rowdot(p_s, g)[:, None])
        loss = loss + d * (keep * (w * tau * tau))
        grad = grad + g_z * (keep * (w * tau))[:, None]
    if c:
        s1 = torch.log_softmax(zs, -1)
        y = labels.masked_fill(keep == 0, 0)
        loss = loss - s1.gather(-1, y[:, None]).squeeze(-1) * (keep * c)
        onehot = torch.zeros_like(zs).scatter_(-1, y[:, None], 1.0)
        grad = grad + (s1.exp() - onehot) * (keep * c)[:, None]
    return loss, grad if grad_dtype is None else grad.to(grad_dtype)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            cfg: LossConfig, vocab_size: int | None = None) -> torch.Tensor:
    """Summed loss over target tokens, from full logits [N, V] (the plain, non-chunked form)."""
    return kd_token_losses(student_logits, teacher_logits, labels, cfg, vocab_size).sum()


def count_targets(labels: list[torch.Tensor] | torch.Tensor, ignore_index: int = -100) -> int:
    """Number of target tokens over a gradient-accumulation window (every loop divides by this)."""
    if isinstance(labels, torch.Tensor):
        labels = [labels]
    return int(sum(int((lab != ignore_index).sum()) for lab in labels))


def normalize(loss_sum: torch.Tensor, window_targets: int) -> torch.Tensor:
    """Scale a micro-batch's summed loss by the window's target count (0 targets -> a zero loss)."""
    return loss_sum / max(window_targets, 1)
