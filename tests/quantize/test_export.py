"""compressed-tensors export: the package's config model and compressors as oracles; reload in slimlm and transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from slimlm import SlimlmError
from slimlm.loading import load_model, load_tokenizer
from slimlm.models import param_counts
from slimlm.quantize.api import QuantConfig, QuantizeConfig, quantize_dir, quantize_model
from slimlm.quantize.export import export_quantized, scheme_of
from slimlm.quantize.linear import Int4Linear, QuantizedLinear

CONFIGS = {
    "int8": QuantConfig(scheme="int8"),
    "fp8": QuantConfig(scheme="fp8"),
    "fp8-static": QuantConfig(scheme="fp8", static_activations=True),
    "int4": QuantConfig(scheme="int4", method="rtn", group_size=32),
    "int4-asym": QuantConfig(scheme="int4", method="rtn", group_size=32, symmetric=False),
    "int4-mixed-groups": QuantConfig(scheme="int4", method="rtn", group_size=128),  # 64 for in=64, 128 for in=128
    "int8-with-head": QuantConfig(scheme="int8", ignore=[]),
    "int4-gptq-actorder": QuantConfig(scheme="int4", method="gptq", group_size=32, act_order=True),
}
EXPECTED_FORMAT = {"int8": "int-quantized", "fp8": "float-quantized", "int4": "pack-quantized"}


def ids():
    return torch.randint(3, 380, (2, 24), generator=torch.Generator().manual_seed(5))


def calib():
    return torch.randint(3, 380, (4, 32), generator=torch.Generator().manual_seed(6)).tolist()


def quantized_export(src, cfg, out, dtype=torch.float32):
    model = load_model(src)
    report = quantize_model(model, cfg, calib())
    export_quantized(model, load_tokenizer(src), out, dtype=dtype, report=report)
    return model


def tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def exports(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-exports")
    out = {}
    for name, cfg in CONFIGS.items():
        model = quantized_export(tiny_model_dirs["llama"], cfg, root / name)
        with torch.no_grad():
            out[name] = (root / name, model, model(ids()).logits)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_validates_with_compressed_tensors(exports, name):
    from compressed_tensors.quantization import QuantizationConfig

    path, model, _ = exports[name]
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert "version" in qc and qc["format"] == EXPECTED_FORMAT[CONFIGS[name].scheme]
    assert parsed.model_dump(mode="json")["config_groups"] == qc["config_groups"]  # nothing lost in the round trip
    assert qc["ignore"] == ([] if name == "int8-with-head" else ["lm_head"])
    assert cfg["tie_word_embeddings"] is (name != "int8-with-head")
    if name == "int4-mixed-groups":
        sizes = sorted(g["weights"]["group_size"] for g in qc["config_groups"].values())
        assert sizes == [64, 128]
        assert any(t.startswith("re:") for g in qc["config_groups"].values() for t in g["targets"])
    else:
        assert len(qc["config_groups"]) == 1 and qc["config_groups"]["group_0"]["targets"] == ["Linear"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_names_dtypes_shapes(exports, name):
    path, model, _ = exports[name]
    t = tensors(path)
    p = "model.layers.0.mlp.gate_proj"  # [128, 64]
    scheme = CONFIGS[name].scheme
    if scheme == "int8":
        assert t[f"{p}.weight"].dtype == torch.int8 and t[f"{p}.weight"].shape == (128, 64)
        assert t[f"{p}.weight_scale"].dtype == torch.float32 and t[f"{p}.weight_scale"].shape == (128, 1)
    elif scheme == "fp8":
        assert t[f"{p}.weight"].dtype == torch.float8_e4m3fn and t[f"{p}.weight_scale"].shape == (128, 1)
        assert (f"{p}.input_scale" in t) is (name == "fp8-static")
        if name == "fp8-static":
            assert t[f"{p}.input_scale"].shape == (1,) and t[f"{p}.input_scale"].dtype == torch.float32
    else:
        g = 64 if name == "int4-mixed-groups" else 32
        assert t[f"{p}.weight_packed"].dtype == torch.int32 and t[f"{p}.weight_packed"].shape == (128, 8)
        assert t[f"{p}.weight_scale"].shape == (128, 64 // g)
        assert t[f"{p}.weight_shape"].tolist() == [128, 64] and t[f"{p}.weight_shape"].dtype == torch.int64
        assert (f"{p}.weight_zero_point" in t) is (name == "int4-asym")
        if name == "int4-asym":
            assert t[f"{p}.weight_zero_point"].shape == (16, 2) and t[f"{p}.weight_zero_point"].dtype == torch.int32
    assert ("lm_head.weight" in t) is (name == "int8-with-head")
    assert t["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.parametrize("name", list(CONFIGS))
def test_package_compressors_agree_with_our_tensors(exports, name):
    """compressed-tensors' own compressor decompresses our tensors to our dequantized weights, and
    compresses those weights back to exactly our tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    path, model, _ = exports[name]
    t = tensors(path)
    for mod_name, m in model.named_modules():
        if not isinstance(m, QuantizedLinear):
            continue
        fields = scheme_of(m)
        scheme = QuantizationScheme(targets=["Linear"], **fields)
        compressor = BaseCompressor.get_value_from_registry(fields["format"])
        ours = {k[len(mod_name) + 1:]: v for k, v in t.items() if k.startswith(mod_name + ".") and not k.endswith("bias")}
        dense = compressor.decompress(dict(ours), scheme)["weight"]
        torch.testing.assert_close(dense.float(), m.dequantized_weight(), rtol=0, atol=0)
        dense_in = {"weight": m.dequantized_weight(), "weight_scale": ours["weight_scale"]}
        if "weight_zero_point" in ours:
            dense_in["weight_zero_point"] = m.weight_zero_point
        again = compressor.compress(dense_in, scheme)
        for key in ("weight", "weight_packed", "weight_zero_point"):
            if key in ours:
                assert torch.equal(again[key].view(torch.uint8) if key == "weight" else again[key],
                                   ours[key].view(torch.uint8) if key == "weight" else ours[key]), (mod_name, key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reload_in_slimlm_gives_identical_logits(exports, name):
    path, model, want = exports[name]
    reloaded = load_model(path)
    assert [type(m).__name__ for m in reloaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert param_counts(reloaded) == param_counts(model)
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, want)
    roles = [getattr(m, "input_role", None) for m in reloaded.modules()]
    assert roles.count("lead") == (4 if name.startswith("int8") else 0)  # 2 layers x (q_proj, gate_proj)


# transformers emulates dynamic int8 activations with scale = absmax / 127.5 and codes in [-128, 127]
# (compressed-tensors' fake quantization); slimlm (like vLLM's kernel) uses absmax / 127. Everything else
# is computed identically, so fp8 and int4 must match to float rounding.
TOLERANCE = {"int8": 2e-2, "fp8": 1e-5, "int4": 1e-5}


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_loads_the_export_to_the_same_logits(exports, name):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path, _, want = exports[name]
    kwargs = {}
    if name == "int4-asym":
        # transformers 5.23 + compressed-tensors 0.20 build the compressed layout on the meta device without
        # packing the zero points ([out, G] instead of the packed [ceil(out/8), G] the package's own compressor
        # writes, checked above): the default load fails on a size mismatch; dequantize-at-load works.
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        got = hf(ids()).logits
    rel = float((got - want).norm() / want.norm())
    assert rel < TOLERANCE[CONFIGS[name].scheme], rel


def test_bf16_storage_default(tiny_model_dirs, tmp_path):
    model = quantized_export(tiny_model_dirs["qwen2"], QuantConfig(scheme="fp8"), tmp_path / "q", dtype=torch.bfloat16)
    t = tensors(tmp_path / "q")
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16  # qwen2 has q/k/v biases
    assert t["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_model(tmp_path / "q")
    with torch.no_grad():
        for p in model.parameters():  # the only difference: embeddings, norms and biases rounded to bf16
            p.copy_(p.bfloat16().float())
        assert torch.equal(model(ids()).logits, reloaded(ids()).logits)


def test_int4_scales_are_stored_in_the_model_dtype(tiny_model_dirs, tmp_path):
    """vLLM's WNA16 scale parameters are in the model dtype: a bf16 export stores its group scales in bf16 (no
    per-layer load warning), and what slimlm loads back is exactly the model with those scales."""
    model = quantized_export(tiny_model_dirs["llama"], QuantConfig(scheme="int4", method="rtn", group_size=32),
                             tmp_path / "q", dtype=torch.bfloat16)
    t = tensors(tmp_path / "q")
    scales = [k for k in t if k.endswith("weight_scale")]
    assert scales and all(t[k].dtype == torch.bfloat16 for k in scales)
    reloaded = load_model(tmp_path / "q")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        for m in model.modules():
            if isinstance(m, Int4Linear):
                m.weight_scale.copy_(m.weight_scale.bfloat16().float())
        assert torch.equal(model(ids()).logits, reloaded(ids()).logits)
    fp32 = tmp_path / "f"
    quantized_export(tiny_model_dirs["llama"], QuantConfig(scheme="int4", method="rtn", group_size=32), fp32)
    assert all(v.dtype == torch.float32 for k, v in tensors(fp32).items() if k.endswith("weight_scale"))


def test_quantize_dir_names_the_run_dtype_for_the_models_use(tiny_model_dirs, tmp_path):
    """config.json's dtype: float32 for a ranking model (its scores keep full resolution when served), else the
    storage dtype; an explicit run_dtype wins. Storage stays as asked, and the report says why."""
    cases = ((True, "auto", "bfloat16", "float32"), (False, "auto", "bfloat16", "bfloat16"),
             (False, "auto", "float32", "float32"), (True, "bfloat16", "bfloat16", "bfloat16"))
    for ranking, run_dtype, storage, want in cases:
        out = tmp_path / f"{ranking}-{run_dtype}-{storage}"
        report = quantize_dir(tiny_model_dirs["llama"], out, QuantizeConfig(scheme="int8", dtype=storage,
                                                                             run_dtype=run_dtype), ranking=ranking)
        assert json.loads((out / "config.json").read_text())["dtype"] == want == report["config_dtype"]
        assert tensors(out)["model.embed_tokens.weight"].dtype == getattr(torch, storage)
        assert ("ranking" in report["config_dtype_why"]) == (ranking and run_dtype == "auto")
    assert QuantizeConfig(scheme="int8").config_dtype(ranking=False) == "bfloat16"


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=2), "is not supported by slimlm's runtime"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations=None), "is not supported by slimlm's runtime"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"}), "KV-cache"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status"),
    (lambda q: q["config_groups"]["group_0"].update(targets=["Embedding"]), "nn.Linear layers only"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="bogus"), "invalid compressed-tensors"),
])
def test_unsupported_checkpoints_are_clear_errors(tiny_model_dirs, tmp_path, edit, message):
    quantized_export(tiny_model_dirs["llama"], QuantConfig(scheme="int8"), tmp_path / "q")
    _edit_config(tmp_path / "q", edit)
    with pytest.raises(SlimlmError, match=message):
        load_model(tmp_path / "q")


def test_missing_tensor_is_a_clear_error(tiny_model_dirs, tmp_path):
    from safetensors.torch import save_file

    quantized_export(tiny_model_dirs["llama"], QuantConfig(scheme="int8"), tmp_path / "q")
    t = tensors(tmp_path / "q")
    del t["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(t, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(SlimlmError, match="up_proj.weight_scale missing"):
        load_model(tmp_path / "q")
