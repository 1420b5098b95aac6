"""The server on a quantized model: an exported INT8 compressed-tensors directory served over HTTP."""

from __future__ import annotations

import numpy as np
import pytest

from slimlm.quantize import api, export
from slimlm.runtime.scoring import label_probs_full
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


def test_server_serves_an_exported_int8_directory(tmp_path, tiny_tok):
    """An INT8 compressed-tensors directory (slimlm quantize's output) served over HTTP: scores equal the
    runtime's whole-prompt scores on the same loaded model, greedy text equals the runtime's."""
    import httpx

    from slimlm.loading import load_model
    from slimlm.runtime.decoding import SamplingParams, generate_text
    from slimlm.serve.app import create_app, serve_in_thread

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
