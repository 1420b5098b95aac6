"""Distillation losses against naive references (values and gradients), plain and chunked.

The references below are written from the definitions, independently of slimlm.distill: probabilities
by an explicit softmax in float64, mixtures as β·p_T + (1 − β)·p_S in probability space, KL as an
explicit sum, TVD as ½·Σ|p_T − p_S|, CE as −log softmax gathered at the label. Gradients of the
references come from autograd through those float64 formulas.

Tolerance table (the implementation at the input dtype vs the float64 reference built from the same
input values, so input rounding is not counted). An element passes when
|got − ref| ≤ rtol·|ref| + rtol·max|ref| (the second term keeps tiny gradient entries from failing on
noise far below the tensor's scale):

    input dtype   rtol    what is compared
    float64       1e-9    plain and chunked: loss and every gradient
    float32       1e-5    plain and chunked: loss and every gradient
    bfloat16      2e-2    chunked only (its matmuls run in bf16, the loss math in fp32); TVD on value
                          only, its gradient being discontinuous where p_S = p_T
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm import SlimlmError
from slimlm.compiled import Compiled
from slimlm.distill.chunked import COMPILE_MIN_TILE, compile_closed_form, fused_linear_kd_loss
from slimlm.distill.losses import (
    LossConfig,
    check_vocab,
    closed_form_value_and_grad,
    count_targets,
    kd_loss,
    normalize,
    token_divergence,
)

RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}
IGNORE = -100

# (divergence, LossConfig kwargs): every divergence, JSD at three β, the skews at two α (skew KL also at 0).
DIVS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("skew_kl", {"alpha": 0.0}),  # the α = 0 endpoint: plain forward KL
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.5}),
    ("tvd", {}),
]
DIV_IDS = [d + "".join(f"-{k[0]}{v}" for k, v in kw.items()) for d, kw in DIVS]


pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


# --------------------------------------------------------------------------- naive references


def naive_softmax(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def naive_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_v p_v (log p_v − log q_v) per row; all entries are positive here."""
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


def naive_divergence(p_s: torch.Tensor, p_t: torch.Tensor, kind: str, beta: float = 0.5,
                     alpha: float = 0.1) -> torch.Tensor:
    if kind == "forward_kl":
        return naive_kl(p_t, p_s)
    if kind == "reverse_kl":
        return naive_kl(p_s, p_t)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * naive_kl(p_t, m) + (1 - beta) * naive_kl(p_s, m)
    if kind == "skew_kl":
        return naive_kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    if kind == "skew_reverse_kl":
        return naive_kl(p_s, alpha * p_s + (1 - alpha) * p_t)
    if kind == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise AssertionError(kind)


def naive_loss(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, kind: str, *, beta: float = 0.5,
               alpha: float = 0.1, temperature: float = 1.0, kd_weight: float = 1.0,
               ce_weight: float = 0.0) -> torch.Tensor:
    """kd_weight·τ²·Σ_targets D(p_T^τ, p_S^τ) + ce_weight·Σ_targets −log softmax(z_S)[y], in float64."""
    keep = labels != IGNORE
    zs, zt, y = zs[keep].double(), zt[keep].double(), labels[keep]
    total = zs.new_zeros(())
    if kd_weight:
        d = naive_divergence(naive_softmax(zs / temperature), naive_softmax(zt / temperature), kind, beta, alpha)
        total = total + kd_weight * temperature**2 * d.sum()
    if ce_weight:
        p = naive_softmax(zs)
        total = total - ce_weight * torch.log(p.gather(1, y[:, None])).sum()
    return total


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol = RTOL[dtype]
    got, ref = got.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- inputs


def make_labels(n: int, v: int, gen: torch.Generator, n_ignored: int | None = None) -> torch.Tensor:
    labels = torch.randint(0, v, (n,), generator=gen)
    k = max(1, n // 4) if n_ignored is None else n_ignored
    labels[torch.randperm(n, generator=gen)[:k]] = IGNORE
    return labels


def make_logits(n: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = (2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    zt = (2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    return zs, zt, make_labels(n, v, g)


def make_hidden(n: int, v: int, hs: int, ht: int, dtype: torch.dtype, seed: int = 0, bias: bool = False):
    """Student hidden [n, hs] + head [v, hs] (+ bias), teacher hidden [n, ht] + head [v, ht]; logits ~ N(0, 4)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    t = {"s_h": r(n, hs), "s_w": r(v, hs, scale=2 / hs**0.5), "t_h": r(n, ht), "t_w": r(v, ht, scale=2 / ht**0.5)}
    if bias:
        t["s_b"], t["t_b"] = r(v, scale=0.5), r(v, scale=0.5)
    return t, make_labels(n, v, g)


def cfg_for(kind: str, kw: dict, **more) -> LossConfig:
    return LossConfig(divergence=kind, **kw, **more)


# --------------------------------------------------------------------------- plain kd_loss vs naive


# (kd_weight, ce_weight): KD alone, and a mix with a KD weight other than 1 (so a dropped or squared
# kd_weight factor in a loss or its hand-written gradient fails).
WEIGHTS = [(1.0, 0.0), (0.4, 0.3)]
WEIGHT_IDS = ["kd1-ce0", "kd0.4-ce0.3"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("kd_weight", "ce_weight"), WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("kind", "kw"), DIVS, ids=DIV_IDS)
def test_kd_loss_matches_naive(kind, kw, temperature, kd_weight, ce_weight, dtype):
    zs, zt, labels = make_logits(37, 101, dtype)
    zs.requires_grad_(True)
    cfg = cfg_for(kind, kw, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)
    loss = kd_loss(zs, zt, labels, cfg)
    loss.backward()

    ref_zs = zs.detach().double().requires_grad_(True)
    ref = naive_loss(ref_zs, zt, labels, kind, temperature=temperature, kd_weight=kd_weight,
                     ce_weight=ce_weight, **kw)
    ref.backward()
    assert_close(loss, ref, dtype, "loss")
    assert_close(zs.grad, ref_zs.grad, dtype, "grad student logits")
    assert not zs.grad[labels == IGNORE].any(), "ignored rows must get no gradient"


# --------------------------------------------------------------------------- chunked vs naive


UPSTREAM = 0.7  # backward through 0.7·loss, so an incoming gradient other than 1 is exercised


def run_chunked(t: dict, labels, cfg, chunk_size, vocab_size=None, closed_form=closed_form_value_and_grad):
    """fused_linear_kd_loss + backward; returns (loss, {name: grad}) for the student tensors."""
    student = {k: t[k].clone().requires_grad_(True) for k in ("s_h", "s_w", "s_b") if k in t}
    loss = fused_linear_kd_loss(student["s_h"], student["s_w"], labels, cfg, teacher_hidden=t["t_h"],
                                teacher_weight=t["t_w"], student_bias=student.get("s_b"),
                                teacher_bias=t.get("t_b"), vocab_size=vocab_size, chunk_size=chunk_size,
                                closed_form=closed_form)
    (UPSTREAM * loss).backward()
    return loss, {k: x.grad for k, x in student.items()}


def run_naive(t: dict, labels, kind, **kw):
    """The float64 reference on logits = h Wᵀ (+ b); returns (loss, {name: grad})."""
    student = {k: t[k].detach().double().requires_grad_(True) for k in ("s_h", "s_w", "s_b") if k in t}
    zs = student["s_h"] @ student["s_w"].T + (student["s_b"] if "s_b" in student else 0)
    zt = t["t_h"].double() @ t["t_w"].double().T + (t["t_b"].double() if "t_b" in t else 0)
    ref = naive_loss(zs, zt, labels, kind, **kw)
    (UPSTREAM * ref).backward()
    return ref, {k: x.grad for k, x in student.items()}


def check_chunked(t, labels, kind, kw, dtype, chunk_size, temperature=1.0, ce_weight=0.0, grads_too=True,
                  kd_weight=1.0, closed_form=closed_form_value_and_grad):
    cfg = cfg_for(kind, kw, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)
    loss, grads = run_chunked(t, labels, cfg, chunk_size, closed_form=closed_form)
    ref, ref_grads = run_naive(t, labels, kind, temperature=temperature, kd_weight=kd_weight,
                               ce_weight=ce_weight, **kw)
    assert grads.keys() == ref_grads.keys()
    assert_close(loss, ref, dtype, "loss")
    for k in grads:
        assert grads[k].dtype == t[k].dtype and grads[k].shape == t[k].shape
        if grads_too:
            assert_close(grads[k], ref_grads[k], dtype, f"grad {k}")


@pytest.mark.parametrize(("kd_weight", "ce_weight"), WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("kind", "kw"), DIVS, ids=DIV_IDS)
def test_chunked_matches_naive_every_divergence(kind, kw, temperature, kd_weight, ce_weight):
    t, labels = make_hidden(37, 101, 24, 40, torch.float64, bias=True)
    check_chunked(t, labels, kind, kw, torch.float64, chunk_size=5, temperature=temperature,
                  kd_weight=kd_weight, ce_weight=ce_weight)


# (N, V, H_S, H_T, chunk size, bias): an odd shape with chunks of 1, 5 and more than N, a power-of-two
# shape, and a single token; student and teacher hidden sizes always differ.
CASES = [
    (37, 101, 24, 40, 1, False),
    (37, 101, 24, 40, 5, True),
    (37, 101, 24, 40, 1000, False),
    (64, 128, 16, 32, 16, True),
    (64, 128, 16, 32, 1000, False),
    (1, 7, 3, 5, 1, True),
    (1, 7, 3, 5, 5, False),
]


@pytest.mark.parametrize("case", CASES, ids=["N{}-V{}-H{}-{}-C{}-{}".format(*c[:5], "b" if c[5] else "nob") for c in CASES])
@pytest.mark.parametrize(("kind", "kw"), [DIVS[0], DIVS[3], DIVS[-1]], ids=[DIV_IDS[0], DIV_IDS[3], DIV_IDS[-1]])
def test_chunked_shapes_and_chunk_sizes(kind, kw, case):
    n, v, hs, ht, chunk_size, bias = case
    t, labels = make_hidden(n, v, hs, ht, torch.float64, seed=n + chunk_size, bias=bias)
    if n == 1:
        labels[0] = 3  # one target, not ignored
    check_chunked(t, labels, kind, kw, torch.float64, chunk_size, temperature=2.0, ce_weight=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("kind", "kw"), DIVS, ids=DIV_IDS)
def test_chunked_low_precision_vs_fp64_reference(kind, kw, dtype):
    t, labels = make_hidden(37, 101, 24, 40, dtype, seed=1, bias=True)
    # TVD's gradient is sign(p_S − p_T)-shaped: where the two are within bf16 rounding of each other
    # its sign, and so an O(1) share of the gradient, is arbitrary; bf16 TVD is checked on value only.
    grads_too = not (kind == "tvd" and dtype == torch.bfloat16)
    check_chunked(t, labels, kind, kw, dtype, chunk_size=8, temperature=2.0, ce_weight=0.3, grads_too=grads_too)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("kind", "kw"), DIVS, ids=DIV_IDS)
def test_chunked_under_bf16_autocast_vs_fp64_reference(kind, kw, compiled):
    """fp32 weights inside a CPU bf16 autocast region (training where bf16 is fast): the LM-head products run
    in bf16, the per-chunk maths and the gradient accumulators in fp32, the gradients come back fp32; the loss
    and gradients agree with the fp64 reference to bf16's tolerance. (Adding bf16 products into the fp32
    accumulators once raised "index_add_(): self (Float) and source (BFloat16)".)"""
    t, labels = make_hidden(37, 101, 24, 40, torch.float32, seed=2, bias=True)
    closed_form = Compiled(closed_form_value_and_grad, "test") if compiled else closed_form_value_and_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cfg = cfg_for(kind, kw, temperature=2.0, kd_weight=1.0, ce_weight=0.3)
        loss, grads = run_chunked(t, labels, cfg, chunk_size=8, closed_form=closed_form)
    assert loss.dtype == torch.float32
    ref, ref_grads = run_naive(t, labels, kind, temperature=2.0, kd_weight=1.0, ce_weight=0.3, **kw)
    assert_close(loss, ref, torch.bfloat16, "loss")
    for k in grads:
        assert grads[k].dtype == torch.float32
        if kind != "tvd":  # TVD's sign-shaped gradient: see test_chunked_low_precision_vs_fp64_reference
            assert_close(grads[k], ref_grads[k], torch.bfloat16, f"grad {k}")
    fp32_loss, _ = run_chunked(t, labels, cfg, chunk_size=8)
    assert loss.item() != fp32_loss.item()  # the products did run in bf16


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-inputs", "fp32-inputs-autocast"])
def test_the_lm_head_products_run_in_bf16_for_bf16_training(autocast):
    """bf16 inputs (a model trained in bf16, FSDP2's bf16 parameters) or fp32 inputs under bf16 autocast: every
    matrix product that touches the [V, H] head runs on bf16 operands; none in fp32, which on a GPU is ~10x
    slower (on an H200 the chunked loss ran 5x slower than Liger's while two of its three products were fp32)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    v = 101
    t, labels = make_hidden(37, v, 24, 40, torch.float32 if autocast else torch.bfloat16, seed=4)
    products = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
                mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
                if any(v in a.shape for a in mats[-2:]):
                    products.append({a.dtype for a in mats[-2:]})
            return func(*args, **(kwargs or {}))

    with Record(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, grads = run_chunked(t, labels, LossConfig(ce_weight=0.3), chunk_size=8)
    chunks = -(-int((labels != IGNORE).sum()) // 8)
    assert len(products) == 4 * chunks  # student and teacher logits, grad_h, grad_w per chunk
    assert all(dtypes == {torch.bfloat16} for dtypes in products), products
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-inputs", "fp32-under-autocast"])
def test_the_closed_form_reads_the_bf16_logit_tiles_and_hands_back_a_bf16_gradient(autocast):
    """In bf16 the per-chunk closed form gets the LM-head products' logits as they are and gives its [C, V]
    gradient back in bf16, so a compiled closed form does the widening and narrowing inside its kernel
    rather than three extra passes over the tile; inside, the maths is fp32: the same loss and gradient as the
    closed form on the widened tiles, the gradient rounded once to bf16."""
    v = 101
    t, labels = make_hidden(37, v, 24, 40, torch.float32 if autocast else torch.bfloat16, seed=5)
    seen = []

    def spy(zs, zt, *args, **kwargs):
        loss, grad = closed_form_value_and_grad(zs, zt, *args, **kwargs)
        wide = closed_form_value_and_grad(zs.float(), zt.float(), *args)
        seen.append((zs.dtype, zt.dtype, grad.dtype))
        torch.testing.assert_close(loss, wide[0], rtol=0, atol=0)
        torch.testing.assert_close(grad, wide[1].to(grad.dtype), rtol=0, atol=0)
        return loss, grad

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        run_chunked(t, labels, LossConfig(ce_weight=0.3), chunk_size=8, closed_form=spy)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, torch.bfloat16)}
    # fp32 stays fp32 throughout
    seen.clear()
    run_chunked(make_hidden(37, v, 24, 40, torch.float32, seed=5)[0], labels, LossConfig(), chunk_size=8,
                closed_form=spy)
    assert set(seen) == {(torch.float32, torch.float32, torch.float32)}


def test_chunked_all_rows_ignored_is_zero():
    t, labels = make_hidden(9, 11, 4, 6, torch.float64)
    labels[:] = IGNORE
    loss, grads = run_chunked(t, labels, LossConfig(ce_weight=0.5), chunk_size=4)
    assert loss.item() == 0.0 and all(not g.any() for g in grads.values())


# --------------------------------------------------------------------------- exact endpoints, zero loss


def test_jsd_beta_endpoints_are_exactly_the_kls():
    zs, zt, labels = make_logits(37, 101, torch.float32, seed=3)
    s, t = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    fwd, rev = LossConfig("forward_kl"), LossConfig("reverse_kl")
    assert torch.equal(token_divergence(s, t, LossConfig("jsd", beta=0.0)), token_divergence(s, t, fwd))
    assert torch.equal(token_divergence(s, t, LossConfig("jsd", beta=1.0)), token_divergence(s, t, rev))
    assert kd_loss(zs, zt, labels, LossConfig("jsd", beta=0.0)) == kd_loss(zs, zt, labels, fwd)
    assert kd_loss(zs, zt, labels, LossConfig("jsd", beta=1.0)) == kd_loss(zs, zt, labels, rev)
    # and the two KLs differ here, so the equalities above are not vacuous
    assert not torch.allclose(kd_loss(zs, zt, labels, fwd), kd_loss(zs, zt, labels, rev))


@pytest.mark.parametrize(("kind", "kw"), DIVS, ids=DIV_IDS)
def test_identical_distributions_give_zero_loss_and_grad(kind, kw):
    cfg = cfg_for(kind, kw, temperature=2.0)
    zs, _, labels = make_logits(37, 101, torch.float64, seed=4)
    zs.requires_grad_(True)
    loss = kd_loss(zs, zs.detach().clone(), labels, cfg)
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert zs.grad.abs().max().item() < 1e-12

    # chunked, student == teacher (same hidden states and head)
    t, labels = make_hidden(37, 101, 24, 24, torch.float64, seed=4)
    t["t_h"], t["t_w"] = t["s_h"].clone(), t["s_w"].clone()
    loss, grads = run_chunked(t, labels, cfg, chunk_size=5)
    assert abs(loss.item()) < 1e-12
    assert all(g.abs().max().item() < 1e-12 for g in grads.values())


# --------------------------------------------------------------------------- padded vocabulary


def padded(z: torch.Tensor, extra: int, value: float) -> torch.Tensor:
    return torch.cat([z, torch.full((z.shape[0], extra), value, dtype=z.dtype)], dim=1)


def naive_masked(zs_pad, zt_pad, labels, v, kind, **kw):
    """Reference with slots ≥ v explicitly set to −inf, softmaxed, then dropped (p = 0 there, no 0·log 0)."""

    def mask(z):
        out = z.double().clone()
        out[:, v:] = float("-inf")
        return out

    ps, pt = (naive_softmax(mask(z))[:, :v] for z in (zs_pad, zt_pad))
    keep = labels != IGNORE
    return naive_divergence(ps[keep], pt[keep], kind, **kw).sum()


@pytest.mark.parametrize(("kind", "kw"), DIVS, ids=DIV_IDS)
def test_padded_vocab_slots_are_minus_inf_not_zero(kind, kw):
    v = 101
    zs, zt, labels = make_logits(37, v, torch.float64, seed=5)
    zs_pad, zt_pad = padded(zs, 3, 0.0), padded(zt, 9, 40.0)  # teacher padding: large junk logits
    cfg = cfg_for(kind, kw)
    got = kd_loss(zs_pad, zt_pad, labels, cfg, vocab_size=v)
    assert_close(got, kd_loss(zs, zt, labels, cfg), torch.float64, "padded vs unpadded")
    assert_close(got, naive_masked(zs_pad, zt_pad, labels, v, kind, **kw), torch.float64, "vs -inf reference")
    # Padded slots read as logit 0 (Liger-Kernel zero-pads the student) would be a different loss:
    as_zero = naive_loss(padded(zs, 9, 0.0), padded(zt, 9, 0.0), labels, kind, **kw)
    as_junk = naive_loss(padded(zs, 9, 0.0), zt_pad, labels, kind, **kw)
    for wrong in (as_zero, as_junk):
        assert abs(wrong.item() - got.item()) > 1e-3 * abs(got.item())


def test_chunked_padded_heads_match_unpadded():
    v = 101
    t, labels = make_hidden(37, v, 24, 40, torch.float64, seed=6, bias=True)
    g = torch.Generator().manual_seed(7)
    tp = dict(t)
    tp["s_w"] = torch.cat([t["s_w"], torch.randn(5, 24, generator=g, dtype=torch.float64)])
    tp["s_b"] = torch.cat([t["s_b"], torch.zeros(5, dtype=torch.float64)])
    tp["t_w"] = torch.cat([t["t_w"], 50 * torch.randn(11, 40, generator=g, dtype=torch.float64)])
    tp["t_b"] = torch.cat([t["t_b"], torch.full((11,), 30.0, dtype=torch.float64)])
    cfg = LossConfig("jsd", beta=0.5, ce_weight=0.3)
    loss_p, grads_p = run_chunked(tp, labels, cfg, chunk_size=8, vocab_size=v)
    loss, grads = run_chunked(t, labels, cfg, chunk_size=8)
    assert_close(loss_p, loss, torch.float64, "loss")
    assert_close(grads_p["s_h"], grads["s_h"], torch.float64, "grad s_h")
    for k in ("s_w", "s_b"):
        assert grads_p[k].shape == tp[k].shape
        assert_close(grads_p[k][:v], grads[k], torch.float64, f"grad {k}")
        assert not grads_p[k][v:].any(), f"padded rows of {k} must get no gradient"


def test_check_vocab():
    assert check_vocab(151936, 151936, 151665) == 151665  # Qwen-style padded heads
    assert check_vocab(49152, 49280, 49152) == 49152
    assert check_vocab(49152, 49152, 49152) == 49152
    with pytest.raises(SlimlmError, match="vocabulary mismatch"):
        check_vocab(49151, 49152, 49152)
    with pytest.raises(SlimlmError, match="vocabulary mismatch"):
        check_vocab(49152, 32000, 49152)


# --------------------------------------------------------------------------- teacher gets no gradient


def test_no_gradient_reaches_the_teacher():
    t, labels = make_hidden(37, 101, 24, 40, torch.float64, bias=True)
    teacher = {k: t[k].clone().requires_grad_(True) for k in ("t_h", "t_w", "t_b")}
    s_h = t["s_h"].clone().requires_grad_(True)
    loss = fused_linear_kd_loss(s_h, t["s_w"], labels, LossConfig("jsd", ce_weight=0.3),
                                teacher_hidden=teacher["t_h"], teacher_weight=teacher["t_w"],
                                teacher_bias=teacher["t_b"], chunk_size=8)
    loss.backward()
    assert s_h.grad is not None and s_h.grad.any()
    for k, x in teacher.items():
        assert x.grad is None or not x.grad.any(), k

    zs, zt, labels = make_logits(37, 101, torch.float64)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    kd_loss(zs, zt, labels, LossConfig("reverse_kl")).backward()
    assert zs.grad.any() and (zt.grad is None or not zt.grad.any())


# --------------------------------------------------------------------------- gradient accumulation


def test_grad_accumulation_matches_one_batch():
    """One batch of 8 == 4 micro-batches of 2 (uneven padding) when every micro-batch divides by the
    window's target count; dividing by each micro-batch's own count would not."""
    b, seq, h_in, hs, ht, v = 8, 11, 10, 12, 20, 53
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    proj = torch.nn.Linear(h_in, hs).double()
    head = torch.nn.Parameter(torch.randn(v, hs, generator=g, dtype=torch.float64) / hs**0.5)
    params = [proj.weight, proj.bias, head]
    x = torch.randn(b, seq, h_in, generator=g, dtype=torch.float64)
    t_h = torch.randn(b, seq, ht, generator=g, dtype=torch.float64)
    t_w = torch.randn(v, ht, generator=g, dtype=torch.float64) / ht**0.5
    labels = torch.randint(0, v, (b, seq), generator=g)
    for i, pad in enumerate([0, 7, 2, 10, 5, 0, 9, 1]):  # trailing padding, different per sequence
        if pad:
            labels[i, -pad:] = IGNORE
    cfg = LossConfig("jsd", beta=0.5, ce_weight=0.3, temperature=2.0)

    def summed(rows):
        return fused_linear_kd_loss(proj(x[rows]).reshape(-1, hs), head, labels[rows].reshape(-1), cfg,
                                    teacher_hidden=t_h[rows].reshape(-1, ht), teacher_weight=t_w, chunk_size=6)

    def grads_of(step):
        for p in params:
            p.grad = None
        step()
        return [p.grad.clone() for p in params]

    full = grads_of(lambda: normalize(summed(slice(0, b)), count_targets(labels)).backward())
    micro = [slice(i, i + 2) for i in range(0, b, 2)]
    window = count_targets([labels[m] for m in micro])
    assert window == count_targets(labels) == int((labels != IGNORE).sum())

    def accumulate(per_micro_count: bool):
        for m in micro:
            n = count_targets(labels[m]) if per_micro_count else window
            normalize(summed(m), n).backward()

    accumulated = grads_of(lambda: accumulate(False))
    for a, f in zip(accumulated, full, strict=True):
        assert_close(a, f, torch.float64, "accumulated grad")
    wrong = grads_of(lambda: accumulate(True))
    assert not all(torch.allclose(w / len(micro), f, rtol=1e-3) for w, f in zip(wrong, full, strict=True))


def test_count_targets_and_normalize():
    lab = torch.tensor([[1, IGNORE, 3], [IGNORE, IGNORE, 0]])
    assert count_targets(lab) == 3
    assert count_targets([lab[:1], lab[1:]]) == 3
    assert count_targets(torch.tensor([5, 5]), ignore_index=5) == 0
    assert normalize(torch.tensor(6.0), 3).item() == 2.0
    assert normalize(torch.tensor(6.0), 1).item() == 6.0
    assert normalize(torch.tensor(0.0), 0).item() == 0.0


# --------------------------------------------------------------------------- config and errors


@pytest.mark.parametrize("bad", [
    {"divergence": "kl"},
    {"beta": -0.1},
    {"beta": 1.1},
    {"temperature": 0.0},
    {"temperature": -1.0},
    {"alpha": 1.0},
    {"alpha": -0.5},
])
def test_loss_config_rejects_bad_values(bad):
    with pytest.raises(SlimlmError):
        LossConfig(**bad)


def test_loss_config_accepts_endpoints():
    LossConfig("jsd", beta=0.0)
    LossConfig("jsd", beta=1.0)
    LossConfig("skew_kl", alpha=0.0)


def test_chunked_rejects_bad_inputs():
    t, labels = make_hidden(6, 9, 4, 5, torch.float32)
    with pytest.raises(SlimlmError, match="teacher hidden"):
        fused_linear_kd_loss(t["s_h"], t["s_w"], labels, LossConfig())
    with pytest.raises(SlimlmError, match="exceeds"):
        fused_linear_kd_loss(t["s_h"], t["s_w"], labels, LossConfig(), teacher_hidden=t["t_h"],
                             teacher_weight=t["t_w"], vocab_size=10)
    with pytest.raises(SlimlmError, match="token counts"):
        fused_linear_kd_loss(t["s_h"], t["s_w"], labels, LossConfig(), teacher_hidden=t["t_h"][:5],
                             teacher_weight=t["t_w"])


# --------------------------------------------------------------------------- pure cross-entropy


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_ce_only_equals_torch_cross_entropy(chunk_size):
    t, labels = make_hidden(37, 101, 24, 40, torch.float64, seed=9, bias=True)
    h, w, b = (t[k].clone().requires_grad_(True) for k in ("s_h", "s_w", "s_b"))
    loss = fused_linear_kd_loss(h, w, labels, LossConfig(kd_weight=0.0, ce_weight=1.0), student_bias=b,
                                chunk_size=chunk_size)
    loss.backward()
    rh, rw, rb = (t[k].clone().requires_grad_(True) for k in ("s_h", "s_w", "s_b"))
    ref = F.cross_entropy(rh @ rw.T + rb, labels, reduction="sum", ignore_index=IGNORE)
    ref.backward()
    assert_close(loss, ref, torch.float64, "loss")
    for got, want, name in ((h.grad, rh.grad, "h"), (w.grad, rw.grad, "w"), (b.grad, rb.grad, "b")):
        assert_close(got, want, torch.float64, f"grad {name}")


# --------------------------------------------------------------------------- the compiled per-chunk maths


@pytest.mark.parametrize(("kind", "kw", "temperature", "ce_weight"),
                         [("forward_kl", {}, 1.0, 0.0), ("jsd", {"beta": 0.3}, 2.0, 0.5)], ids=["fkl", "jsd-ce-t2"])
def test_compiled_closed_form_matches_naive(kind, kw, temperature, ce_weight):
    """torch.compile of the closed-form chunk maths (37 rows in chunks of 5: two shapes) against the naive
    reference, at the fp32 tolerance."""
    compiled = compile_closed_form(True, 5, 101)
    assert isinstance(compiled, Compiled) and compiled.active
    t, labels = make_hidden(37, 101, 24, 40, torch.float32, bias=True)
    check_chunked(t, labels, kind, kw, torch.float32, chunk_size=5, temperature=temperature, ce_weight=ce_weight,
                  closed_form=compiled)
    assert compiled.active  # it ran compiled, not through the fallback


def test_compile_policy_and_fallback():
    assert compile_closed_form(False, 64, 49152) is closed_form_value_and_grad
    assert compile_closed_form("auto", 64, 384) is closed_form_value_and_grad  # a tiny tile: not worth compiling
    assert isinstance(compile_closed_form("auto", 64, COMPILE_MIN_TILE // 64), Compiled)
    with pytest.warns(RuntimeWarning, match="torch.compile of the per-chunk loss failed"):
        broken = Compiled(closed_form_value_and_grad, "the per-chunk loss", backend="no-such-backend")
        t, labels = make_hidden(9, 31, 8, 12, torch.float64)
        check_chunked(t, labels, "jsd", {"beta": 0.5}, torch.float64, chunk_size=4, closed_form=broken)
    assert not broken.active
