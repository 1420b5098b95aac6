"""quantize_model on tiny random models: every scheme, smoothing, GPTQ, errors, and the runtime on the result."""

from __future__ import annotations

import pytest
import torch

from slimlm import SlimlmError
from slimlm.calib import batches, layer0_inputs, run_layer
from slimlm.loading import load_model
from slimlm.models import param_counts
from slimlm.quantize.api import (
    QuantConfig,
    apply_smoothing,
    effective_group_size,
    quantize_model,
    select_targets,
)
from slimlm.quantize.calibrate import record_inputs, run_decoder
from slimlm.quantize.linear import Fp8Linear, Int4Linear, Int8Linear, QuantizedLinear
from slimlm.testing import tiny_model

CONFIGS = {
    "int8": QuantConfig(scheme="int8"),
    "int8-smooth": QuantConfig(scheme="int8", smooth=True),
    "fp8": QuantConfig(scheme="fp8"),
    "fp8-static": QuantConfig(scheme="fp8", static_activations=True),
    "int4-rtn": QuantConfig(scheme="int4", method="rtn", group_size=32),
    "int4-gptq": QuantConfig(scheme="int4", group_size=32),
    "int4-gptq-asym": QuantConfig(scheme="int4", group_size=32, symmetric=False),
    "int4-quantease": QuantConfig(scheme="int4", group_size=32, method="quantease", quantease_iters=3),
}
# relative logit error vs fp32 on a tiny random model (loose: these guard against breakage, not quality)
BOUNDS = {"int8": 0.03, "fp8": 0.08, "int4": 0.25}


def blocks(n=6, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 380, (n, t), generator=g).tolist()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantize_model_every_scheme(family, name):
    cfg = CONFIGS[name]
    model = tiny_model(family)
    ids = torch.tensor(blocks(2, 20, seed=1))
    ref = logits(model, ids)
    counts = param_counts(model)
    report = quantize_model(model, cfg, blocks())
    kind = {"int8": Int8Linear, "fp8": Fp8Linear, "int4": Int4Linear}[cfg.scheme]
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == report["quantized_layers"] == 2 * 7 and all(isinstance(m, kind) for m in quantized)
    assert type(model.lm_head) is torch.nn.Linear  # excluded by default
    assert param_counts(model) == counts  # logical parameters are unchanged
    y = logits(model, ids)
    assert float((y - ref).norm() / ref.norm()) < BOUNDS[cfg.scheme]
    if name == "fp8-static":
        assert all(m.input_scale is not None and m.input_scale > 0 for m in quantized)
    # smoothing ran exactly where asked, 3 groups a layer: input norm -> q/k/v, post-attention norm ->
    # gate/up, up_proj -> down_proj
    assert report.get("smoothed_groups", 0) == (2 * 3 if cfg.smooth else 0)
    if cfg.scheme == "int8":  # q/k/v and gate/up quantize their shared input once, to the same logits
        assert [m.input_role for m in quantized[:7]] == ["lead", "follow", "last", None, "lead", "last", None]
        for m in quantized:
            m.input_role = None
        assert torch.equal(logits(model, ids), y)


def test_gptq_beats_rtn_on_the_calibration_data():
    """Model-level: GPTQ's logits on its calibration blocks are closer to fp32 than round-to-nearest's."""
    calib = blocks(8, 64)
    ids = torch.tensor(calib)
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama", seed=3)
        ref = logits(model, ids)
        quantize_model(model, QuantConfig(scheme="int4", group_size=32, method=method), calib)
        errs[method] = float((logits(model, ids) - ref).norm())
    assert errs["gptq"] < errs["rtn"], errs


def test_clip_search_is_on_by_default_for_the_calibrated_methods_only():
    """gptq / quantease default to the clipping search (the quantized weights equal an explicit
    clip_search=True and differ from clip_search=False); rtn defaults to the plain range."""
    assert QuantConfig(scheme="int4").clip and QuantConfig(scheme="int4", method="quantease").clip
    assert not QuantConfig(scheme="int4", method="rtn").clip and not QuantConfig(scheme="int8").clip
    assert not QuantConfig(scheme="int4", clip_search=False).clip
    calib = blocks(8, 64)

    def weights(**kw):
        model = tiny_model("llama", seed=3)
        quantize_model(model, QuantConfig(scheme="int4", group_size=32, **kw), calib)
        return {n: b.clone() for n, b in model.named_buffers() if "mlp" in n or "self_attn" in n}

    for method in ("gptq", "rtn"):
        default = weights(method=method)
        on, off = weights(method=method, clip_search=True), weights(method=method, clip_search=False)
        same_as = on if method == "gptq" else off
        other = off if method == "gptq" else on
        assert all(torch.equal(default[n], same_as[n]) for n in default)
        assert any(not torch.equal(default[n], other[n]) for n in default)


def test_smoothing_preserves_fp32_outputs_and_shrinks_activation_ranges():
    model = tiny_model("llama", seed=2)
    with torch.no_grad():  # give one hidden channel an outlier, as real LLMs have
        model.model.layers[0].input_layernorm.weight[5] = 30.0
    ids = torch.tensor(blocks(2, 20, seed=1))
    ref = logits(model, ids)
    targets = select_targets(model, ["lm_head"])
    q_proj = model.model.layers[0].self_attn.q_proj
    with record_inputs(targets, channel_absmax=True) as stats:
        run_decoder(model, blocks())
    absmax = {id(targets[n]): s.channel_absmax for n, s in stats.items()}
    before = absmax[id(q_proj)].max() / absmax[id(q_proj)].median()
    assert apply_smoothing(model, absmax, targets, 0.5) == 2 * 3
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    with record_inputs({"q": q_proj}, channel_absmax=True) as after:
        run_decoder(model, blocks())
    a = after["q"].channel_absmax
    assert a.max() / a.median() < before / 3


def test_smoothquant_lowers_int8_error_on_an_outlier_channel():
    """End to end through quantize_model: with an outlier input channel (as real LLMs have), W8A8 with
    SmoothQuant is closer to fp32 than plain W8A8 — the point of smoothing."""
    errs = {}
    for smooth in (False, True):
        model = tiny_model("llama", seed=2)
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[5] = 30.0
        ids = torch.tensor(blocks(2, 20, seed=1))
        ref = logits(model, ids)
        quantize_model(model, QuantConfig(scheme="int8", smooth=smooth), blocks())
        errs[smooth] = float((logits(model, ids) - ref).norm() / ref.norm())
    assert errs[True] < 0.7 * errs[False], errs


def test_layerwise_capture_replays_the_model():
    """Running the decoder layers one at a time on captured inputs reproduces the model's hidden states."""
    model = tiny_model("qwen3")
    calib = blocks(4, 32)
    captured = layer0_inputs(model, batches(calib, 2))
    assert len(captured) == 2
    for layer in model.model.layers:
        captured = [(run_layer(layer, h, kw), kw) for h, kw in captured]
    with torch.no_grad():
        ref = model.model(input_ids=torch.tensor(calib[:2]), use_cache=False).last_hidden_state
    torch.testing.assert_close(model.model.norm(captured[0][0]), ref, rtol=1e-5, atol=1e-5)


def test_quantized_lm_head_unties_and_scores(tiny_tok):
    from slimlm.runtime import decoding

    model = tiny_model("llama", vocab_size=len(tiny_tok))
    assert model.config.tie_word_embeddings
    report = quantize_model(model, QuantConfig(scheme="int8", ignore=[]))
    assert isinstance(model.lm_head, Int8Linear) and not model.config.tie_word_embeddings
    assert type(model.model.embed_tokens) is torch.nn.Embedding and "tied" in report["notes"][0]
    prompts = [tiny_tok("Hello world").input_ids] * 2
    new = decoding.generate(model, prompts, max_new_tokens=4, temperature=0)
    assert len(new[0]) == 4 and new[0] == new[1]


def test_engine_scores_and_generates_on_quantized_models(tiny_tok):
    from slimlm.runtime import decoding, scoring
    from slimlm.tasks.ranking import TokenizedRanking

    for cfg in (CONFIGS["int8"], CONFIGS["fp8"], CONFIGS["int4-rtn"]):
        model = tiny_model("qwen2", vocab_size=len(tiny_tok))
        quantize_model(model, cfg)
        yes, no = tiny_tok(" Yes").input_ids[0], tiny_tok(" No").input_ids[0]
        prefix = tuple(tiny_tok("User: 24-year-old male technician.\n").input_ids)
        exs = [TokenizedRanking(str(i), "g", prefix, tuple(tiny_tok(s).input_ids), 0)
               for i, s in enumerate(["Candidate movie: Toy Story", "Candidate movie: GoldenEye (1995)"])]
        shared = scoring.score(model, exs, (yes, no))
        full = scoring.score(model, exs, (yes, no), reuse_prefix=False)
        assert ((shared > 0) & (shared < 1)).all()
        # prefix reuse changes the int8 per-token activation scales of nothing: same tokens, same rows
        assert abs(shared - full).max() < 1e-4
        out = decoding.generate(model, [prefix], max_new_tokens=3, temperature=0)
        assert len(out[0]) == 3


def test_effective_group_size():
    assert effective_group_size(576, 128) == 64
    assert effective_group_size(1536, 128) == 128
    assert effective_group_size(96, 32) == 32
    with pytest.raises(SlimlmError, match="multiple of 8"):
        effective_group_size(100, 32)


def test_group_fallback_is_reported():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    report = quantize_model(model, QuantConfig(scheme="int4", method="rtn", group_size=128))
    assert model.model.layers[0].self_attn.q_proj.group_size == 64
    assert model.model.layers[0].mlp.down_proj.group_size == 128
    assert "does not divide" in report["notes"][0]


@pytest.mark.parametrize("cfg, calib, message", [
    (QuantConfig(scheme="int4"), None, "--method gptq needs calibration data"),
    (QuantConfig(scheme="int8", smooth=True), None, "--smooth needs calibration data"),
    (QuantConfig(scheme="fp8", static_activations=True), None, "--static-activations needs calibration"),
    (QuantConfig(scheme="int8", group_size=32), None, "apply to --scheme int4 only"),
    (QuantConfig(scheme="int4", method="quantease"), None, "--method quantease needs calibration data"),
    (QuantConfig(scheme="int8", method="quantease"), None, "--method quantease needs calibration data"),
    (QuantConfig(scheme="int8", damp=0.05), None, "damp applies to --scheme int8 with --method quantease only"),
    (QuantConfig(scheme="int4", method="rtn", quantease_iters=3), None, "--quantease-iters applies to --method quantease"),
    (QuantConfig(scheme="fp8", smooth=True), None, "--smooth applies to --scheme int8 only"),
    (QuantConfig(scheme="int4", static_activations=True), None, "--static-activations applies to --scheme fp8"),
    (QuantConfig(scheme="int8", ignore=["lm_heda"]), None, "ignore entry 'lm_heda' matches no module"),
    (QuantConfig(scheme="int8", ignore=["Linear"]), None, "no nn.Linear layers left to quantize"),
])
def test_clear_errors(cfg, calib, message):
    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match=message.replace("(", r"\(")):
        quantize_model(model, cfg, calib)


def test_unknown_scheme_and_requantizing_are_errors(tiny_model_dirs):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        QuantConfig(scheme="int3")
    model = load_model(tiny_model_dirs["llama"])
    quantize_model(model, QuantConfig(scheme="int8"))
    with pytest.raises(SlimlmError, match="already quantized"):
        quantize_model(model, QuantConfig(scheme="int4", method="rtn", group_size=32))


def test_model_without_linear_layers_is_an_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(SlimlmError, match="no nn.Linear layers"):
        select_targets(model, [])
