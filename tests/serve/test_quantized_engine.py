"""The engine runs quantized models (INT8 W8A8, FP8, INT4 weight-only from slimlm.quantize) and bf16 ones:
prefix reuse equals whole prompts, KV-cache greedy equals no-cache greedy, on the quantized model itself."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import greedy_reference

from slimlm.quantize import api, export
from slimlm.serve.engine import generate, label_probs_full, label_probs_shared_prefix
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


def test_server_serves_an_exported_int8_directory(tmp_path, tiny_tok):
    """An INT8 compressed-tensors directory (slimlm quantize's output) served over HTTP: scores equal the
    engine's whole-prompt scores on the same loaded model, greedy text equals the engine's."""
    import httpx

    from slimlm.loading import load_model
    from slimlm.serve.engine import SamplingParams, generate_text
    from slimlm.serve.server import create_app, serve_in_thread

    m = tiny_model("llama", seed=8, vocab_size=len(tiny_tok), initializer_range=0.2)
    api.quantize_model(m, api.QuantConfig(scheme="int8"))
    d = export.export_quantized(m, tiny_tok, tmp_path / "tiny-int8")
    loaded = load_model(d)
    assert any(type(x).__module__.startswith("slimlm.quantize") for x in loaded.modules())
    prefix, cands = "User: 24-year-old male technician.\n", ["Candidate movie: Toy Story. Answer:", "Four Rooms?"]
    yes, no = (tiny_tok(t, add_special_tokens=False).input_ids[0] for t in (" Yes", " No"))
    pre = tiny_tok(prefix).input_ids
    want = label_probs_full(loaded, [pre + tiny_tok(c, add_special_tokens=False).input_ids for c in cands], (yes, no))
    ref_text = generate_text(loaded, tiny_tok, ["Hello world"], SamplingParams(max_tokens=6, temperature=0))[0].text
    with serve_in_thread(create_app(d)) as url:
        r = httpx.post(url + "/v1/score", json={"prefix": prefix, "candidates": cands}, timeout=60)
        np.testing.assert_allclose(r.json()["scores"], want, atol=1e-4)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-int8", "prompt": "Hello world", "max_tokens": 6,
                                                      "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"] == ref_text
