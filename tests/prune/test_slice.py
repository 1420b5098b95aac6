"""Layer slicing: a genuinely smaller model that computes what the kept layers of the source compute."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm import SlimlmError
from slimlm.models import FAMILIES, param_counts, save_model
from slimlm.prune.slice import evenly_spaced, keep_layers
from slimlm.testing import tiny_model


def test_evenly_spaced():
    assert evenly_spaced(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert evenly_spaced(5, 5) == [0, 1, 2, 3, 4] and evenly_spaced(7, 1) == [0] and evenly_spaced(7, 2) == [0, 6]
    with pytest.raises(SlimlmError):
        evenly_spaced(4, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_layers_matches_module_surgery(family, tmp_path, tiny_tok):
    source = tiny_model(family, seed=3, num_hidden_layers=4)
    keep = [0, 2, 3]
    small = keep_layers(source, keep)
    # oracle: the same model with its layer list cut by hand
    ref = copy.deepcopy(source)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    for new_i, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = new_i
    ref.config.num_hidden_layers = len(keep)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(small(ids).logits, source(ids).logits, atol=1e-3)  # really fewer layers
    assert small.config.num_hidden_layers == 3 and source.config.num_hidden_layers == 4
    assert param_counts(small)["non_embedding"] < param_counts(source)["non_embedding"]
    save_model(small, tiny_tok, tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert loaded.config.num_hidden_layers == 3 and len(loaded.model.layers) == 3


def test_keep_layers_rejects_bad_indices():
    m = tiny_model("llama")
    for bad in ([], [0, 0], [5], [-1]):
        with pytest.raises(SlimlmError, match="layer indices"):
            keep_layers(m, bad)
