"""Generation: KV-cache decoding against a no-cache greedy reference, joining/leaving a running batch,
seeded sampling, stop strings, streaming, bf16."""

from __future__ import annotations

import itertools
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import greedy_reference

from slimlm import SlimlmError
from slimlm.models import FAMILIES
from slimlm.quantize import api
from slimlm.runtime import decoding
from slimlm.runtime.decoding import (
    DecodeBatch,
    Generation,
    SamplingParams,
    generate,
    generate_text,
    sample_next,
    stream,
)
from slimlm.runtime.scoring import label_probs_shared_prefix
from slimlm.testing import tiny_model

VOCAB = 384


pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py



def prompts(seed=0, lengths=(5, 1, 13, 8)):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, seed=1, initializer_range=0.2)


def test_kv_cache_greedy_equals_no_cache_greedy(model):
    ps = prompts()
    got = generate(model, ps, max_new_tokens=8, temperature=0, pad_id=0)
    assert got == [greedy_reference(model, p, 8) for p in ps]


def test_eos_ends_a_row_and_is_included(model):
    ps = prompts(1)
    free = generate(model, ps, max_new_tokens=6, temperature=0)
    eos = free[0][2]  # a token row 0 produces at step 3: make it the EOS
    got = generate(model, ps, max_new_tokens=6, temperature=0, eos_id=eos)
    assert got == [greedy_reference(model, p, 6, eos=eos) for p in ps]
    assert got[0] == free[0][:free[0].index(eos) + 1] and len(got[0]) < 6


def _join_and_leave(model, **batch_kw) -> DecodeBatch:
    """Requests admitted between decode steps (different prompt lengths, different max_tokens) give the
    same tokens as each request decoded alone without a cache."""
    ps = prompts(2, lengths=(6, 17, 2, 9, 4, 11))
    budgets = [7, 3, 5, 8, 2, 6]
    gens = [Generation(p, SamplingParams(max_tokens=m, temperature=0)) for p, m in zip(ps, budgets, strict=True)]
    batch = DecodeBatch(model, pad_id=0, **batch_kw)
    batch.add(gens[:2])
    schedule = {1: [2], 2: [3, 4], 5: [5]}  # step -> rows that join before it
    step = 0
    while len(batch) or step <= max(schedule):
        if step in schedule:
            batch.add([gens[i] for i in schedule[step]])
        batch.step()
        # every running row's next position is its prompt plus its tokens so far (its cached columns)
        assert batch.positions == [len(g.prompt) + len(g.tokens) for g in batch.rows]
        step += 1
    for g, p, m in zip(gens, ps, budgets, strict=True):
        assert g.finish_reason == "length"
        assert g.tokens == greedy_reference(model, p, m)
    return batch


def test_rows_join_and_leave_a_running_batch(model):
    _join_and_leave(model)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_rows_join_and_leave(scheme):
    """The same on INT8 (W8A8) and INT4 (weight-only) runtime modules: the KV dtype and shape come from the
    model's own forward, whatever its linear layers are."""
    q = tiny_model("llama", seed=7, initializer_range=0.2)
    cfg = {"scheme": "int8"} if scheme == "int8" else {"scheme": "int4", "method": "rtn", "group_size": 32}
    api.quantize_model(q, api.QuantConfig(**cfg))
    _join_and_leave(q)


def test_the_cache_grows_geometrically_and_not_per_step(model):
    """Rows joining one by one and decoding past the columns they started with: the KV buffers are
    reallocated a few times (slots 1, 2, 4; columns at least doubling), never per step, and the tokens
    equal the reference."""
    ps = prompts(9, (3, 5, 2, 4))
    gens = [Generation(p, SamplingParams(max_tokens=m, temperature=0)) for p, m in zip(ps, (40, 30, 12, 25), strict=True)]
    batch = DecodeBatch(model)
    buffers, steps = [], 0
    waiting = list(gens)
    while waiting or len(batch):
        if waiting:
            batch.add([waiting.pop(0)])
        batch.step()
        steps += 1
        if len(batch):
            buffers.append((batch.cache.keys[0].data_ptr(), batch.cache.batch_capacity, batch.cache.capacity))
    shapes = list(dict.fromkeys(buffers))
    assert steps >= 40 and len(shapes) <= 6, shapes
    assert [b for _, b, _ in shapes] == sorted(b for _, b, _ in shapes) and shapes[-1][1] == 4
    for a, b in itertools.pairwise(shapes):
        assert b[1] >= 2 * a[1] or b[2] >= min(2 * a[2], 43)  # each reallocation at least doubles (to the bound)
    for g, p in zip(gens, ps, strict=True):
        assert g.tokens == greedy_reference(model, p, g.params.max_tokens)


@pytest.mark.parametrize("family,overrides", [
    ("mistral", {"sliding_window": 5}),  # every layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),  # full, then sliding
])
def test_sliding_window_layers_decode_like_the_reference(family, overrides):
    """Past the window, each sliding layer sees only its last ``window`` positions (cache column = position,
    so the mask is a band per row), the full layers everything."""
    m = tiny_model(family, seed=3, initializer_range=0.2, **overrides)
    ps = prompts(11, (3, 9, 6))
    assert generate(m, ps, max_new_tokens=10, temperature=0) == [greedy_reference(m, p, 10) for p in ps]


def test_eager_attention_gets_an_additive_mask():
    m = tiny_model("llama", seed=2, initializer_range=0.2, attn_implementation="eager")
    ps = prompts(12)
    assert generate(m, ps, max_new_tokens=6, temperature=0) == [greedy_reference(m, p, 6) for p in ps]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "transformers-forward"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_of_one_length_attend_without_a_mask(fused, attn, monkeypatch):
    """Batch 1 (and rows at one position) attend to every cached column, so no mask reaches attention (as in
    ``generate`` without padding: SDPA may then take its flash kernel); rows at different positions get one.
    Greedy tokens equal the no-cache reference either way."""
    m = tiny_model("llama", seed=2, initializer_range=0.2, attn_implementation=attn)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        seen.append(attn_mask is not None)
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    eager = []
    from transformers.models.llama import modeling_llama
    orig_eager = modeling_llama.eager_attention_forward

    def eager_spy(module, query, key, value, attention_mask, *args, **kwargs):
        eager.append(attention_mask is not None)
        return orig_eager(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager_spy)
    masks = eager if attn == "eager" and not fused else seen
    for ps, want_mask in (([prompts(4)[2]], False), (prompts(5, (6, 6)), False), (prompts(6, (3, 7)), True)):
        batch = DecodeBatch(m, fused=fused)
        gens = [Generation(p, SamplingParams(max_tokens=5, temperature=0)) for p in ps]
        batch.add(gens)  # the prompts' forward (its masks are not the decode steps')
        masks.clear()
        while len(batch):
            batch.step()
        stepped = list(masks)  # (the reference below runs attention too)
        if attn == "eager" and not fused:  # transformers' eager attention always builds its own (here all-True) mask
            assert stepped and all(stepped)
        else:
            assert stepped and set(stepped) == {want_mask}, (ps, stepped)
        assert [g.tokens for g in gens] == [greedy_reference(m, p, 5) for p in ps]


def test_cancel_removes_a_row_and_the_rest_continue(model):
    ps = prompts(3)
    gens = [Generation(p, SamplingParams(max_tokens=6, temperature=0)) for p in ps]
    batch = DecodeBatch(model)
    batch.add(gens)
    batch.step()
    batch.cancel(gens[2])
    while len(batch):
        batch.step()
    assert gens[2].finish_reason == "cancelled" and len(gens[2].tokens) == 1
    for i in (0, 1, 3):
        assert gens[i].tokens == greedy_reference(model, ps[i], 6)


def test_context_limit_ends_with_length(model):
    g = Generation([5, 6, 7], SamplingParams(max_tokens=50, temperature=0))
    batch = DecodeBatch(model, max_positions=8)
    batch.add([g])
    while len(batch):
        batch.step()
    assert g.finish_reason == "length" and len(g.tokens) == 5  # positions 3..7
    with pytest.raises(SlimlmError, match="context"):
        DecodeBatch(model, max_positions=3).add([Generation([1, 2, 3], SamplingParams(temperature=0))])


def test_seeded_sampling_does_not_depend_on_batch_neighbours(model):
    p = prompts(4)[2]
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)

    def run(neighbours):
        gens = [Generation(p, params)] + [Generation(q, SamplingParams(max_tokens=3, temperature=0.7, seed=9))
                                         for q in neighbours]
        batch = DecodeBatch(model)
        batch.add(gens)
        while len(batch):
            batch.step()
        return gens[0].tokens

    alone = run([])
    assert run(prompts(5)) == alone
    assert alone == run([])  # the same seed gives the same sample on a second run
    other = [Generation(p, SamplingParams(max_tokens=8, temperature=1.0, seed=s)) for s in range(4)]
    batch = DecodeBatch(model)
    batch.add(other)
    while len(batch):
        batch.step()
    assert len({tuple(g.tokens) for g in other}) > 1, "different seeds should give different samples"


def test_sample_next_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.75, g)  # nucleus {0, 1}: 0.5 < 0.75 <= 0.8
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert set(sample_next(logits, 1.0, 1e-6, g).tolist()) == {0}
    assert sample_next(logits[:3], 0, 0.5).tolist() == [0, 0, 0]
    all4 = sample_next(logits, 1.0, 1.0, g)
    assert set(all4.tolist()) == {0, 1, 2, 3}


def test_sampling_params_reject_bad_values():
    for kw in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"stop": ("",)}):
        with pytest.raises(SlimlmError):
            SamplingParams(**kw)
    with pytest.raises(SlimlmError, match="tokenizer"):
        Generation([1], SamplingParams(stop=("x",)))


def test_generate_text_stop_strings_and_streaming(tiny_tok):
    model = tiny_model("llama", seed=4, vocab_size=len(tiny_tok), initializer_range=0.2)
    prompt = "User: 24-year-old male"
    free = generate_text(model, tiny_tok, [prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    ref_tokens = greedy_reference(model, tiny_tok(prompt).input_ids, 12)
    assert free.tokens == ref_tokens
    assert free.text == tiny_tok.decode(ref_tokens, skip_special_tokens=True)
    assert len(free.text) >= 6, free.text
    stop = free.text[3:5]
    cut = free.text[:free.text.find(stop)]
    params = SamplingParams(max_tokens=12, temperature=0, stop=(stop,))
    got = generate_text(model, tiny_tok, [prompt, prompt], params, max_batch=1)
    assert [g.text for g in got] == [cut, cut] and got[0].finish_reason == "stop"
    pieces = list(stream(model, tiny_tok, prompt, params))
    assert "".join(pieces) == cut
    assert "".join(stream(model, tiny_tok, prompt, SamplingParams(max_tokens=12, temperature=0))) == free.text


def test_generate_text_refills_slots_and_seeds_per_prompt(tiny_tok):
    model = tiny_model("qwen2", seed=5, vocab_size=len(tiny_tok), initializer_range=0.2)
    texts = ["Hello world", "The quick brown fox jumps", "Yes", "Candidate movie: Four Rooms", "No"]
    greedy = generate_text(model, tiny_tok, texts, SamplingParams(max_tokens=5, temperature=0), max_batch=2)
    for g, t in zip(greedy, texts, strict=True):
        assert g.tokens == greedy_reference(model, tiny_tok(t).input_ids, 5)
    sp = SamplingParams(max_tokens=5, temperature=0.8, seed=7)
    a = generate_text(model, tiny_tok, texts, sp, max_batch=2)
    b = generate_text(model, tiny_tok, texts, sp, max_batch=5)
    assert [g.tokens for g in a] == [g.tokens for g in b]


# --------------------------------------------------------------------------- other dtypes


def test_bf16_model_generates_and_scores_close_to_fp32():
    m32 = tiny_model("llama", seed=6, initializer_range=0.2)
    m16 = tiny_model("llama", seed=6, initializer_range=0.2).to(torch.bfloat16)
    prefix, suffixes = prompts(6, (12,))[0], prompts(7, (3, 5, 1))
    p32 = label_probs_shared_prefix(m32, prefix, suffixes, (10, 11, 12))
    p16 = label_probs_shared_prefix(m16, prefix, suffixes, (10, 11, 12))
    np.testing.assert_allclose(p16, p32, atol=0.05)
    out = generate(m16, prompts(8), max_new_tokens=4, temperature=0)
    # batched, padded, KV-cached bf16 greedy equals the no-cache oracle on the same bf16 model
    assert out == [greedy_reference(m16, p, 4) for p in prompts(8)]


def test_a_rows_own_failure_reaches_library_callers_as_an_error(tiny_tok):
    """The batch ends a row whose sampling fails (the server fails that request alone); generate() and
    generate_text() raise it rather than return the row's partial output as if it had finished."""
    model = tiny_model("llama", seed=3, vocab_size=len(tiny_tok))
    with pytest.raises(SlimlmError, match="sampling failed"):
        generate(model, [[5, 6, 7]], max_new_tokens=3, temperature=0.7, generator="not a generator")
    assert generate(model, [[5, 6, 7]], max_new_tokens=3, temperature=0) == [greedy_reference(model, [5, 6, 7], 3)]


# --------------------------------------------------------------------------- the compiled step


def _broken_compile(fn, mode=None, dynamic=None):
    def run(*args, **kwargs):
        raise RuntimeError("simulated: no C++ compiler")
    return run


def _no_compile(fn, mode=None, dynamic=None):
    raise RuntimeError("simulated: torch.compile unavailable")


@pytest.mark.parametrize("hook", [_broken_compile, _no_compile], ids=["fails-at-first-step", "unavailable"])
def test_a_failing_compile_warns_once_and_decodes_eagerly(monkeypatch, hook):
    model = tiny_model("llama", seed=1, initializer_range=0.2)
    ps = prompts(13)
    eager = generate(model, ps, max_new_tokens=6, temperature=0)
    monkeypatch.setattr(decoding, "_compile_step", hook)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate(model, ps, max_new_tokens=6, temperature=0, compile=True)
    assert got == eager
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith(decoding.COMPILE_FAILED)]
    assert len(fallbacks) == 1 and "simulated" in fallbacks[0]


@pytest.mark.slow  # compiling takes tens of seconds on a 2-core CPU
@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "transformers-forward"])
def test_compiled_step_gives_the_eager_tokens(fused):
    """The compiled step (static shapes: rows rounded up to a power of two, every column; idle slots computed
    and ignored) gives the eager step's tokens, with rows joining and leaving: the fused step (weights in the
    ordinary layout) and transformers' forward. Skips where torch.compile cannot run."""
    from torch._dynamo.utils import counters

    model = tiny_model("qwen3", seed=1, initializer_range=0.2, num_hidden_layers=1)
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = _join_and_leave(model, compile=True, fused=fused)
        # more row counts and a longer row: buffers grown past 32 columns and to 8 slots
        long = [Generation(p, SamplingParams(max_tokens=n, temperature=0))
                for p, n in zip(prompts(9, (30, 3, 5, 7, 2, 4, 6, 8)), (40, 3, 9, 5, 2, 6, 4, 7), strict=True)]
        batch.add(long)
        while len(batch):
            batch.step()
    assert (batch._fused is not None) == fused and (not fused or not batch._fused.packed)
    if not batch.compiled:
        pytest.skip("torch.compile is unavailable here: " + "; ".join(
            str(w.message) for w in caught if str(w.message).startswith(decoding.COMPILE_FAILED)))
    assert [g.tokens for g in long] == [greedy_reference(model, g.prompt, g.params.max_tokens) for g in long]
    # automatic dynamic shapes: the first shape static, then a recompile as each dimension (rows, columns) turns
    # symbolic, one row kept apart (torch specialises a size of 1): at most 5 graphs for any mix of shapes. One
    # compile per shape (row counts 1, 2, 4, 8 x 32 and 64 columns here) ran into torch's recompile limit
    # of 8 and then decoded eagerly
    assert batch.cache.batch_capacity == 8 and batch.cache.capacity >= 64
    assert counters["stats"]["unique_graphs"] - graphs <= 5


# --------------------------------------------------------------------------- the fused step


def _next_logits(model, ps, **kw) -> torch.Tensor:
    batch = DecodeBatch(model, **kw)
    batch.add([Generation(p, SamplingParams(max_tokens=4, temperature=0)) for p in ps])
    batch.step()  # one decode forward: these logits come from the step
    batch.step()
    return batch.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_step_runs_for_every_family_and_matches_transformers_forward(family):
    m = tiny_model(family, seed=5, initializer_range=0.2,
                   **({"attention_bias": True, "mlp_bias": True} if family == "llama" else {}))
    assert DecodeBatch(m)._fused is not None and DecodeBatch(m, fused=False)._fused is None
    ps = prompts(4, (7, 3, 12))
    torch.testing.assert_close(_next_logits(m, ps), _next_logits(m, ps, fused=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_step_in_bf16_where_the_cpu_has_bf16_dot_products(family, monkeypatch):
    """A model served in bf16 (``--dtype bfloat16``) on a CPU with AVX512_BF16 / AMX runs the fused step with
    bf16 weights in oneDNN's layout: the next-token logits agree with transformers' bf16 forward and with the
    fp32 model to bf16's rounding; on a CPU without bf16 dot products it keeps transformers' forward."""
    import slimlm.placement

    m = tiny_model(family, seed=5, initializer_range=0.2).to(torch.bfloat16)
    ps = prompts(4, (7, 3, 12))
    monkeypatch.setattr(slimlm.placement, "fast_bf16", lambda device: False)
    assert DecodeBatch(m)._fused is None
    monkeypatch.setattr(slimlm.placement, "fast_bf16", lambda device: True)
    assert DecodeBatch(m)._fused is not None
    fused, plain = _next_logits(m, ps), _next_logits(m, ps, fused=False)
    fp32 = _next_logits(m.float(), ps, fused=False)
    assert fused.dtype == plain.dtype == torch.float32 and not torch.equal(fused, fp32)  # it ran in bf16
    # bf16 rounding moves these logits 1.4-2.3% of their scale from fp32 (the fused step's attention runs in
    # fp32, transformers' in bf16: 1% apart); a wrong mask, rotary or projection moves them by O(1)
    scale = fp32.abs().max().item()
    torch.testing.assert_close(fused, plain, rtol=0, atol=0.03 * scale)
    torch.testing.assert_close(fused, fp32, rtol=0, atol=0.03 * scale)


def test_the_fused_step_follows_weights_updated_in_place_and_skips_fp8_and_int4_models():
    m = tiny_model("qwen2", seed=6, initializer_range=0.2)
    ps = prompts(5, (6, 9))
    before = _next_logits(m, ps)
    with torch.no_grad():  # what an optimizer step does (on-policy sampling decodes with the student in training)
        m.get_decoder().layers[0].mlp.down_proj.weight.mul_(3.0)
        m.get_decoder().layers[1].self_attn.k_proj.bias.add_(0.5)
    after = _next_logits(m, ps)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, _next_logits(m, ps, fused=False), rtol=1e-5, atol=1e-5)
    for cfg in ({"scheme": "fp8"}, {"scheme": "int4", "method": "rtn", "group_size": 32}):
        q = tiny_model("llama", seed=7, initializer_range=0.2)
        api.quantize_model(q, api.QuantConfig(**cfg))
        assert DecodeBatch(q)._fused is None  # these quantized layers run transformers' forward


@pytest.mark.parametrize("int_mm", [True, False], ids=["int_mm", "float-codes"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_step_runs_int8_w8a8_layers_as_their_own_path_does(family, int_mm, monkeypatch):
    """INT8 W8A8 models are fused with either kernel (``_int_mm`` over the int8 codes where it is fast, a float
    GEMM of the codes elsewhere): the logits equal transformers' forward over the Int8Linear modules
    (activations quantized per token, exact integer sums, both scales, biases), an INT8 LM head included."""
    from slimlm.quantize import linear
    from slimlm.runtime import fused_step

    monkeypatch.setattr(linear, "int_mm_is_fast", lambda: int_mm)
    for ignore in (["lm_head"], []):
        q = tiny_model(family, seed=7, initializer_range=0.2,
                       **({"attention_bias": True, "mlp_bias": True} if family == "llama" else {}))
        api.quantize_model(q, api.QuantConfig(scheme="int8", ignore=ignore))
        step = DecodeBatch(q)._fused
        assert step is not None and isinstance(step.layers[0].qkv, fused_step.FusedInt8Linear)
        assert (step.layers[0].qkv.int_mm is not None) == int_mm
        assert isinstance(step.head, fused_step.FusedInt8Linear) == (not ignore)
        ps = prompts(8, (6, 11, 2))
        torch.testing.assert_close(_next_logits(q, ps), _next_logits(q, ps, fused=False), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiling takes seconds to tens of seconds on a 2-core CPU
@pytest.mark.parametrize("int_mm", [True, False], ids=["int_mm", "float-codes"])
def test_the_compiled_fused_step_runs_int8_w8a8_layers_as_their_own_path_does(int_mm, monkeypatch):
    from slimlm.quantize import linear

    q = tiny_model("llama", seed=7, initializer_range=0.2, num_hidden_layers=1)
    api.quantize_model(q, api.QuantConfig(scheme="int8"))
    monkeypatch.setattr(linear, "int_mm_is_fast", lambda: int_mm)
    ps = prompts(8, (6, 11, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _next_logits(q, ps, compile=True)
    if any(str(w.message).startswith(decoding.COMPILE_FAILED) for w in caught):
        pytest.skip("torch.compile is unavailable here")
    torch.testing.assert_close(got, _next_logits(q, ps, fused=False), rtol=1e-5, atol=1e-5)
