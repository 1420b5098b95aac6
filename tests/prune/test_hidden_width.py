"""Hidden-size (residual-stream) pruning: the sliced model equals the original with the removed channels
zeroed wherever they enter the stream, loads in vanilla transformers, and the pruning stage chooses the
channels from calibration energy."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm import SlimlmError
from slimlm.config import PruneConfig
from slimlm.models import FAMILIES, arch_facts, param_counts, save_model
from slimlm.prune import baselines, calibrate
from slimlm.prune.api import prune_model, prune_targets
from slimlm.prune.slice import mask_hidden, mask_width, slice_width
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py

# tied and untied embeddings in every family
CASES = [(f, tied) for f in FAMILIES for tied in (True, False)]


def zeroed_oracle(model, hidden):
    """The original with residual channels outside ``hidden`` zeroed where they enter the stream (embedding
    columns, o_proj / down_proj rows), written out by hand: those channels then stay 0 in every layer."""
    ref = copy.deepcopy(model)
    drop = [c for c in range(model.config.hidden_size) if c not in set(hidden)]
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, drop] = 0
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[drop] = 0
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def random_channels(d, keep, seed):
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(d, generator=g)[:keep].tolist())


def scaled_up(model):
    """Residual stream of a trained model's magnitude (init std 0.02 leaves mean(x²) ~ 4e-4, comparable to ε)."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50)
    return model


@pytest.mark.parametrize("family,tied", CASES)
def test_sliced_equals_zeroed_original(family, tied, tmp_path, tiny_tok):
    eps = {"rms_norm_eps": 1e-12} if family == "qwen3" else {}  # qwen3 keeps ε (see slice.py); exact as ε -> 0
    model = tiny_model(family, seed=11, vocab_size=len(tiny_tok), tie_word_embeddings=tied, **eps)
    d = model.config.hidden_size
    hidden = random_channels(d, 40, seed=1)
    small = slice_width(model, hidden=hidden)
    assert small.config.hidden_size == 40 and model.config.hidden_size == d  # source untouched
    ids = torch.randint(3, len(tiny_tok), (2, 11))
    want = logits(zeroed_oracle(model, hidden), ids)
    torch.testing.assert_close(logits(small, ids), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model, ids), want, atol=1e-4)  # the channels mattered
    # the embedding is what shrank: 40/64 of it
    before, after = param_counts(model), param_counts(small)
    assert after["embedding"] * d == before["embedding"] * 40
    assert after["non_embedding"] < before["non_embedding"]
    # a standard config that vanilla transformers loads to the same function
    save_model(small, tiny_tok, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["hidden_size"] == 40 and cfg["head_dim"] == arch_facts(model.config).head_dim
    assert cfg["tie_word_embeddings"] == tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
    if tied:
        assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


def test_rms_eps_rescaled_exactly():
    """At the default ε the sliced model still equals the zeroed original: ε·d/d' in the config."""
    model = scaled_up(tiny_model("llama", seed=2, rms_norm_eps=1e-5))
    hidden = random_channels(64, 24, seed=3)
    small = slice_width(model, hidden=hidden)
    assert small.config.rms_norm_eps == pytest.approx(1e-5 * 64 / 24)
    ids = torch.randint(3, 300, (2, 9))
    torch.testing.assert_close(logits(small, ids), logits(zeroed_oracle(model, hidden), ids), rtol=1e-5, atol=1e-5)


def test_qwen3_keeps_eps_and_stays_close():
    """Qwen3's q/k norms share rms_norm_eps, so it stays; the residual norms then differ by the ε term only."""
    model = scaled_up(tiny_model("qwen3", seed=2, rms_norm_eps=1e-6))
    hidden = random_channels(64, 32, seed=4)
    small = slice_width(model, hidden=hidden)
    assert small.config.rms_norm_eps == 1e-6
    ids = torch.randint(3, 300, (2, 9))
    got, want = logits(small, ids), logits(zeroed_oracle(model, hidden), ids)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_with_heads_and_neurons(family):
    """Hidden, heads and MLP neurons sliced in one go equal the model masked in all three ways."""
    eps = {"rms_norm_eps": 1e-12} if family == "qwen3" else {}
    model = tiny_model(family, seed=5, **eps)
    hd = arch_facts(model.config).head_dim
    mlp = [random_channels(128, 48, seed=i) for i in range(2)]
    heads, kv = [[0, 1], [2, 3]], [[0], [1]]
    hidden = random_channels(64, 48, seed=9)
    small = slice_width(model, mlp=mlp, heads=heads, kv_heads=kv, hidden=hidden)
    ref = copy.deepcopy(model)
    for i, layer in enumerate(ref.model.layers):
        mask_width(layer, mlp=mlp[i], heads=heads[i], head_dim=hd)
    mask_hidden(ref, hidden)
    ids = torch.randint(3, 300, (2, 9))
    torch.testing.assert_close(logits(small, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    c = small.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (48, 48, 2, 1)


def test_mask_hidden_equals_hand_oracle():
    model = tiny_model("qwen2", seed=1, tie_word_embeddings=False)
    hidden = random_channels(64, 20, seed=6)
    masked = copy.deepcopy(model)
    mask_hidden(masked, hidden)
    ids = torch.randint(3, 300, (1, 7))
    torch.testing.assert_close(logits(masked, ids), logits(zeroed_oracle(model, hidden), ids), rtol=1e-6, atol=1e-6)


def test_bad_hidden_sets_refused():
    model = tiny_model("llama")
    for bad in ([], [3, 1], [0, 0], [64]):
        with pytest.raises(SlimlmError, match="hidden"):
            slice_width(model, hidden=bad)


def test_channel_scores_naive():
    """Σ_norms E[y_c²] Σ_readers ‖W[:, c]‖², against a loop over channels."""
    g = torch.Generator().manual_seed(0)
    energy = [torch.rand(7, generator=g, dtype=torch.float64) for _ in range(3)]
    readers = [[torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)], [torch.randn(4, 7, generator=g)],
               [torch.randn(9, 7, generator=g)]]
    want = [sum(float(e[c]) * sum(float((w[:, c].double() ** 2).sum()) for w in ws) for e, ws in zip(energy, readers, strict=True))
            for c in range(7)]
    torch.testing.assert_close(baselines.channel_scores(energy, readers), torch.tensor(want, dtype=torch.float64))


def test_norm_output_energy_matches_hooks_free_computation():
    """The per-channel mean square of the final norm's output, recomputed from the model's hidden states."""
    model = tiny_model("mistral", seed=4)
    batches = [torch.randint(3, 300, (2, 8)), torch.randint(3, 300, (3, 8))]
    energy = calibrate.norm_output_energy(model, batches)
    assert len(energy) == 2 * model.config.num_hidden_layers + 1
    with torch.no_grad():
        finals = torch.cat([model.model(b).last_hidden_state.reshape(-1, 64) for b in batches])
    torch.testing.assert_close(energy[-1], finals.double().pow(2).mean(0), rtol=1e-5, atol=1e-9)
    assert all(torch.equal(e, torch.ones(64, dtype=torch.float64))
               for e in calibrate.norm_output_energy(model, None))


def test_prune_model_hidden(tiny_tok):
    """The stage: counts rounded to --multiple, the highest-scoring channels kept, a loadable smaller model."""
    model = tiny_model("llama", seed=3, vocab_size=len(tiny_tok))
    calib = [torch.randint(3, len(tiny_tok), (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = PruneConfig(hidden_keep=0.4, mlp_keep=0.5, method="activation")
    small, report = prune_model(model, calib, cfg)
    assert small.config.hidden_size == 24 and report["targets"]["hidden"] == 24
    kept = report["hidden"]["kept"]
    assert len(kept) == 24 and kept == sorted(kept) and 0 < report["hidden"]["score_kept_fraction"] <= 1
    assert report["params_after"]["embedding"] * 64 == report["params_before"]["embedding"] * 24
    # the kept channels are the top scores on the MLP-pruned working copy, recomputed here
    work = copy.deepcopy(model)
    for i, layer in enumerate(work.model.layers):
        mask_width(layer, mlp=report["layers"][i]["mlp"]["kept"])
    energy = calibrate.norm_output_energy(work, calib)
    scores = baselines.channel_scores(energy, [[m.weight for m in ms] for _, ms in calibrate.residual_readers(work)])
    assert kept == sorted(scores.argsort(descending=True)[:24].tolist())
    # magnitude: no data needed
    small_m, _ = prune_model(model, None, PruneConfig(hidden_keep=16, method="magnitude"))
    assert small_m.config.hidden_size == 16


def test_hidden_targets_checked():
    facts = arch_facts(tiny_model("llama").config)
    assert prune_targets(facts, PruneConfig(hidden_keep=0.5)).hidden == 32
    with pytest.raises(SlimlmError, match="only 64 hidden channels"):
        prune_targets(facts, PruneConfig(hidden_keep=128))
    with pytest.raises(SlimlmError, match="multiple of 8"):
        prune_targets(facts, PruneConfig(hidden_keep=30))
