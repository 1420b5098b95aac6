"""The runtime runs quantized models (INT8 W8A8, FP8, INT4 weight-only from slimlm.quantize): prefix reuse
equals whole prompts, KV-cache greedy equals no-cache greedy, on the quantized model itself."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import greedy_reference

from slimlm.quantize import api
from slimlm.runtime.decoding import generate
from slimlm.runtime.scoring import label_probs_full, label_probs_shared_prefix
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


def _ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(n)]



@pytest.mark.parametrize("cfg", [{"scheme": "int8"}, {"scheme": "fp8"}, {"scheme": "int4", "method": "rtn",
                                                                         "group_size": 32}], ids=lambda c: c["scheme"])
def test_quantized_model_scores_and_generates(cfg):
    ref = tiny_model("llama", seed=7, initializer_range=0.2)
    q = tiny_model("llama", seed=7, initializer_range=0.2)
    api.quantize_model(q, api.QuantConfig(**cfg))
    assert any(type(m).__name__.endswith("Linear") and type(m).__module__.startswith("slimlm.quantize")
               for m in q.modules())
    prefix, suffixes, labels = _ids(20, 1), [_ids(n, 10 + n) for n in (3, 7, 1, 5)], (10, 20, 30)
    reuse = label_probs_shared_prefix(q, prefix, suffixes, labels, batch_size=3)
    full = label_probs_full(q, [prefix + s for s in suffixes], labels, batch_size=1)
    np.testing.assert_allclose(reuse, full, atol=1e-4)
    fp = label_probs_full(ref, [prefix + s for s in suffixes], labels)
    assert np.abs(full - fp).max() > 1e-4  # the quantized layers ran, not the float weights
    prompts = [_ids(n, 30 + n) for n in (4, 9, 2)]
    assert generate(q, prompts, max_new_tokens=5, temperature=0) == [greedy_reference(q, p, 5) for p in prompts]
