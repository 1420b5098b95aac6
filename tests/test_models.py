"""Tiny models of every family: save/load round trips, architecture facts, parameter counts, load errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm import SlimlmError
from slimlm.loading import load_model, load_tokenizer
from slimlm.models import FAMILIES, arch_facts, param_counts
from slimlm.placement import default_dtype
from slimlm.testing import tiny_config, tiny_model

TEXT = "User: 24-year-old male technician. Candidate movie: Four Rooms (1995; Thriller). Answer: Yes"

# Values tiny_config promises: 2 layers, hidden 64, MLP 128, 4 query heads over 2 KV heads.
TIED = {"llama": True, "qwen2": False, "qwen3": True, "mistral": False}
HEAD_DIM = {"llama": 16, "qwen2": 16, "qwen3": 32, "mistral": 16}  # qwen3: 32 != 64 / 4


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_slimlm_and_vanilla_transformers(family, tiny_model_dirs, tiny_tok):
    d = tiny_model_dirs[family]
    assert (d / "config.json").is_file()
    assert list(d.glob("*.safetensors")) and not list(d.glob("*.bin"))
    assert json.loads((d / "config.json").read_text())["model_type"] == family

    ref = tiny_model(family, seed=0, vocab_size=len(tiny_tok))  # what save_tiny_model saved
    ours = load_model(d)
    vanilla = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert not ours.training and next(ours.parameters()).dtype == torch.float32

    ids = torch.tensor([tiny_tok(TEXT).input_ids])
    with torch.no_grad():
        want = ref(ids).logits
        for m in (ours, vanilla):
            torch.testing.assert_close(m(ids).logits, want, atol=1e-6, rtol=0)
        # Other weights must fail the same check (guards against comparing a model with itself).
        other = tiny_model(family, seed=1, vocab_size=len(tiny_tok))(ids).logits
    assert (other - want).abs().max() > 1e-3


# transformers 5 maps model_type qwen2 to Qwen2Tokenizer, which replaces the saved tokenizer.json
# pre-tokenizer with Qwen's digit-splitting regex; load_tokenizer must honour tokenizer.json.
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trip(family, tiny_model_dirs, tiny_tok):
    tok = load_tokenizer(tiny_model_dirs[family])
    for text in (TEXT, "Rated 3.61 stars on average by 272 users.\nWill the user like it? Answer:"):
        assert tok(text).input_ids == tiny_tok(text).input_ids
    assert tok(" Yes", add_special_tokens=False).input_ids == tiny_tok(" Yes", add_special_tokens=False).input_ids
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"
    assert tok.chat_template == tiny_tok.chat_template


@pytest.mark.parametrize("family", FAMILIES)
def test_arch_facts(family, tiny_model_dirs):
    facts = arch_facts(tiny_config(family))
    assert facts.family == family
    assert (facts.num_layers, facts.hidden_size, facts.intermediate_size) == (2, 64, 128)
    assert (facts.num_heads, facts.num_kv_heads, facts.queries_per_kv) == (4, 2, 2)
    assert facts.head_dim == HEAD_DIM[family]
    assert facts.vocab_size == 384
    assert facts.tied_embeddings is TIED[family]
    # The facts must describe the real modules, not just echo the config: q_proj is [heads * head_dim, hidden].
    model = load_model(tiny_model_dirs[family])
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (facts.num_heads * facts.head_dim, facts.hidden_size)
    assert attn.k_proj.weight.shape == (facts.num_kv_heads * facts.head_dim, facts.hidden_size)
    assert arch_facts(model.config) == facts
    assert facts.to_dict()["head_dim"] == facts.head_dim


def test_arch_facts_defaults_without_kv_heads_or_head_dim():
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=None,
                      intermediate_size=8, num_hidden_layers=1, vocab_size=10)
    facts = arch_facts(cfg)
    assert (facts.head_dim, facts.num_kv_heads, facts.queries_per_kv) == (16, 6, 1)


def _hand_count(family: str) -> tuple[int, int]:
    """(embedding, non_embedding) parameters of tiny_config(family), counted from the architecture."""
    V, H, I, L, nh, nkv = 384, 64, 128, 2, 4, 2  # noqa: E741
    d = HEAD_DIM[family]
    attn = H * nh * d + 2 * H * nkv * d + nh * d * H  # q, k, v, o
    if family == "qwen2":
        attn += nh * d + 2 * nkv * d  # q/k/v biases
    if family == "qwen3":
        attn += 2 * d  # per-head q_norm, k_norm
    layer = attn + 3 * H * I + 2 * H  # gate/up/down, two RMSNorms
    non_embedding = L * layer + H  # + final norm
    embedding = V * H * (1 if TIED[family] else 2)
    return embedding, non_embedding


@pytest.mark.parametrize("family", FAMILIES)
def test_param_counts_match_hand_count(family):
    model = tiny_model(family)
    counts = param_counts(model)
    embedding, non_embedding = _hand_count(family)
    assert counts == {"total": embedding + non_embedding, "embedding": embedding, "non_embedding": non_embedding}


def test_default_dtype():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16  # no GPU needed to ask


def test_tiny_config_unknown_family():
    with pytest.raises(SlimlmError, match="gpt2.*llama"):
        tiny_config("gpt2")


# --------------------------------------------------------------------------- load errors


def test_load_model_missing_dir(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(SlimlmError) as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_load_model_refuses_pickle_weights(tmp_path):
    # A directory vanilla transformers would load (config + pytorch_model.bin): slimlm must refuse it.
    model = tiny_model("llama")
    d = tmp_path / "pickled"
    d.mkdir()
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(SlimlmError, match="safetensors") as e:
        load_model(d)
    assert str(d) in str(e.value) and "pytorch_model.bin" in str(e.value)


def test_load_model_no_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    tiny_config("qwen2").save_pretrained(d)
    with pytest.raises(SlimlmError, match="safetensors") as e:
        load_model(d)
    assert str(d) in str(e.value)


@pytest.mark.parametrize(("config_text", "message", "where"), [
    (None, "no config.json", ""),  # weights but no config
    ("{ not json", "config.json", "config.json"),  # an unreadable config
])
def test_load_model_missing_or_unreadable_config(tmp_path, tiny_model_dirs, config_text, message, where):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((tiny_model_dirs["llama"] / "model.safetensors").read_bytes())
    if config_text is not None:
        (d / "config.json").write_text(config_text)
    with pytest.raises(SlimlmError, match=message) as e:
        load_model(d)
    assert str(d / where if where else d) in str(e.value)


def test_load_tokenizer_errors_are_one_line_and_never_reach_the_hub(tmp_path):
    from slimlm.loading import load_tokenizer

    with pytest.raises(SlimlmError, match=r"org/some-model: not a directory"):  # not taken for a Hub repo id
        load_tokenizer("org/some-model")
    (tmp_path / "m").mkdir()
    tiny_config("llama").save_pretrained(tmp_path / "m")  # a config, but no tokenizer files
    with pytest.raises(SlimlmError, match=r"m: cannot load a tokenizer"):
        load_tokenizer(tmp_path / "m")


def test_devices_are_checked_before_loading(tiny_model_dirs):
    from slimlm.placement import check_device

    check_device("cpu")
    with pytest.raises(SlimlmError, match="not a torch device"):
        load_model(tiny_model_dirs["llama"], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SlimlmError, match="no CUDA GPU"):
            check_device("cuda:0")
