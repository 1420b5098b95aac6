"""compressed-tensors checkpoints: write a quantized model, and read one back into slimlm's runtime modules.

What :func:`export_quantized` writes (the layout vLLM and transformers read for ``quant_method:
"compressed-tensors"``, checked against the compressed-tensors package's own config model):

``config.json`` gets a ``quantization_config``: ``config_groups`` (one QuantizationScheme per distinct
scheme, targeting ``Linear`` or, when layers differ, ``re:`` patterns / names), ``ignore`` (every
``nn.Linear`` left unquantized, e.g. ``lm_head``), ``format``, ``quantization_status: "compressed"``,
``quant_method``, ``version``. Tensors per quantized layer ``P``:

| scheme | format | tensors |
|---|---|---|
| int8 W8A8 | int-quantized | ``P.weight`` int8 [out, in], ``P.weight_scale`` f32 [out, 1] |
| fp8 W8A8 | float-quantized | ``P.weight`` float8_e4m3fn [out, in], ``P.weight_scale`` f32 [out, 1] (+ ``P.input_scale`` f32 [1] when static) |
| int4 W4A16 | pack-quantized | ``P.weight_packed`` int32 [out, ceil(in/8)], ``P.weight_scale`` ``dtype`` [out, in/g], ``P.weight_shape`` int64 [2] (+ ``P.weight_zero_point`` int32 [ceil(out/8), in/g] when asymmetric) |

Everything else (embeddings, norms, ignored layers, biases) is stored in ``dtype`` (bf16 by default;
``float32`` keeps it exact). config.json's ``dtype`` is what the model is meant to run in: the storage
dtype, or float32 for a ranking model (``config_dtype``), whose label probabilities need the resolution;
bf16 tensors under a float32 config widen exactly. Scale dtypes follow the consumers: INT8 / FP8 scales
are float32 (vLLM keeps those parameters in float32 whatever the model dtype); INT4 group scales are in
``dtype``, as vLLM's WNA16 scale parameters are in the model dtype (an fp32 scale loaded into a bf16
parameter is a warning per layer; a bf16 one into fp32 widens exactly). What slimlm loads back is
exactly what was written.

:func:`load_quantized` reads such a directory (ours, or any compressed-tensors checkpoint that uses
the schemes above) into slimlm's runtime modules; anything else is a clear :class:`SlimlmError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm import SlimlmError
from slimlm.io import atomic_dir
from slimlm.quantize.linear import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    share_input_quantization,
)
from slimlm.quantize.schemes import FP8_DTYPE, unpack_int4

WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "slimlm_quantize.json"


# --------------------------------------------------------------------------- config


def scheme_of(m: QuantizedLinear) -> dict[str, Any]:
    """The compressed-tensors QuantizationScheme fields (minus targets) of one runtime module."""
    if isinstance(m, Int8Linear):
        return {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True},
                "format": "int-quantized"}
    if isinstance(m, Fp8Linear):
        act = ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
               if m.static_activations else
               {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True})
        return {"weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
                "input_activations": act, "format": "float-quantized"}
    if isinstance(m, Int4Linear):
        return {"weights": {"num_bits": 4, "type": "int", "symmetric": m.symmetric, "strategy": "group",
                            "group_size": m.group_size, "dynamic": False,
                            **({"actorder": m.actorder} if m.actorder else {})},
                "input_activations": None, "format": "pack-quantized"}
    raise TypeError(f"not a slimlm quantized module: {type(m).__name__}")


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """config.json's ``quantization_config`` for a model holding slimlm runtime modules, validated by
    compressed-tensors' ``QuantizationConfig`` model (and serialised by it)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not quantized:
        raise SlimlmError("the model holds no quantized layers; run quantize_model first")
    float_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    by_scheme: dict[str, list[str]] = {}
    for name, m in quantized.items():
        by_scheme.setdefault(json.dumps(scheme_of(m), sort_keys=True), []).append(name)
    groups = {}
    for i, (key, names) in enumerate(by_scheme.items()):
        if len(by_scheme) == 1:
            targets = ["Linear"]  # every Linear not in ``ignore``
        else:
            targets = []
            for leaf in sorted({n.rsplit(".", 1)[-1] for n in names}):
                same_leaf = [n for n in quantized if n.rsplit(".", 1)[-1] == leaf]
                if all(n in names for n in same_leaf):
                    targets.append(rf"re:.*\.{leaf}$" if any("." in n for n in same_leaf) else leaf)
                else:
                    targets.extend(n for n in same_leaf if n in names)
        groups[f"group_{i}"] = {"targets": targets, **json.loads(key)}
    formats = {g["format"] for g in groups.values()}
    raw = {"config_groups": groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
           "quantization_status": "compressed", "ignore": float_linears, "quant_method": "compressed-tensors"}
    try:
        cfg = QuantizationConfig.model_validate(raw)
    except Exception as e:  # pydantic's ValidationError: a bug on our side, not the user's
        raise RuntimeError(f"compressed-tensors rejects the quantization_config we built: {e}") from e
    out = cfg.model_dump(mode="json")
    out.update(quant_method="compressed-tensors", version=compressed_tensors.__version__, sparsity_config={},
               transform_config={})
    return out


# --------------------------------------------------------------------------- write


def export_state(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: compressed tensors of quantized layers, the rest cast to ``dtype``."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized:
            continue
        if tied and t.data_ptr() in seen:
            continue  # a tied duplicate (lm_head.weight == embed_tokens.weight); transformers re-ties it
        seen[t.data_ptr()] = key
        state[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
    for name, m in quantized.items():
        for leaf, t in m.compressed_state().items():
            if isinstance(m, Int4Linear) and leaf == "weight_scale":
                t = t.to(dtype)  # as vLLM's WNA16 parameter (see the module docstring)
            state[f"{name}.{leaf}"] = t.detach()
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach().to(dtype)
    return {k: v.contiguous().cpu() for k, v in state.items()}


def export_quantized(model: nn.Module, tokenizer, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                     config_dtype: str | None = None, report: dict | None = None) -> Path:
    """Write ``model`` (with slimlm runtime modules) as a compressed-tensors directory, atomically: float
    tensors in ``dtype``, config.json's ``dtype`` = ``config_dtype`` (default: the same)."""
    from safetensors.torch import save_file

    qcfg = quantization_config(model)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = config_dtype or str(dtype).removeprefix("torch.")
    config["quantization_config"] = qcfg
    state = export_state(model, dtype)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------- read


def is_compressed_tensors_dir(path: Path) -> bool:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


SUPPORTED = ("int8 W8A8 (channel weights, dynamic token activations)",
             "fp8 W8A8 (channel or tensor weights; dynamic token or static tensor activations)",
             "int4 weight-only pack-quantized (group or channel, symmetric or asymmetric)")


def _describe(scheme) -> str:
    w, a = scheme.weights, scheme.input_activations
    wd = "none" if w is None else f"{w.type}{w.num_bits} {w.strategy}{'' if w.symmetric else ' asym'}"
    ad = "none" if a is None else f"{a.type}{a.num_bits} {a.strategy}{' dynamic' if a.dynamic else ' static'}"
    return f"weights {wd}, activations {ad}, format {scheme.format}"


def _runtime_kind(scheme, fmt: str) -> str | None:
    """'int8' | 'fp8' | 'int4' when slimlm's runtime executes ``scheme`` exactly; else None."""
    w, a = scheme.weights, scheme.input_activations
    if w is None or scheme.output_activations is not None or w.actorder not in (None, "weight"):
        return None
    if (w.type == "int" and w.num_bits == 8 and w.symmetric and w.strategy == "channel" and fmt == "int-quantized"
            and a is not None and a.type == "int" and a.num_bits == 8 and a.symmetric and a.strategy == "token"
            and a.dynamic is True):
        return "int8"
    if (w.type == "float" and w.num_bits == 8 and w.strategy in ("channel", "tensor") and fmt == "float-quantized"
            and a is not None and a.type == "float" and a.num_bits == 8 and a.symmetric
            and ((a.strategy == "token" and a.dynamic is True) or (a.strategy == "tensor" and a.dynamic is False))):
        return "fp8"
    if (w.type == "int" and w.num_bits == 4 and w.strategy in ("group", "channel") and fmt == "pack-quantized"
            and a is None):
        return "int4"
    return None


def _build(kind: str, scheme, name: str, linear: nn.Linear, t: dict[str, torch.Tensor], path: Path) -> QuantizedLinear:
    out, inp = linear.out_features, linear.in_features

    def need(key: str) -> torch.Tensor:
        if key not in t:
            raise SlimlmError(f"{path}: tensor {name}.{key} missing for its {kind} scheme")
        return t[key]

    bias = t.get("bias")
    bias = None if bias is None else bias.float()
    if kind == "int8":
        w, s = need("weight"), need("weight_scale").float()
        if w.dtype != torch.int8 or w.shape != (out, inp) or s.numel() != out:
            raise SlimlmError(f"{path}: {name}: expected int8 weight [{out}, {inp}] and {out} scales")
        return Int8Linear(w, s.reshape(out, 1), bias)
    if kind == "fp8":
        w, s = need("weight"), need("weight_scale").float()
        if w.dtype != FP8_DTYPE or w.shape != (out, inp) or s.numel() not in (1, out):
            raise SlimlmError(f"{path}: {name}: expected float8_e4m3fn weight [{out}, {inp}] and 1 or {out} scales")
        static = scheme.input_activations.strategy == "tensor"
        in_scale = need("input_scale").float().reshape(-1)[:1] if static else None
        return Fp8Linear(w, s.reshape(-1, 1).expand(out, 1), bias, input_scale=in_scale)
    packed, s = need("weight_packed"), need("weight_scale").float()
    if "weight_g_idx" in t:
        raise SlimlmError(f"{path}: {name}: activation-ordered int4 (weight_g_idx) is not supported")
    shape = t.get("weight_shape")
    if shape is not None and [int(v) for v in shape.reshape(-1)] != [out, inp]:
        raise SlimlmError(f"{path}: {name}: weight_shape {shape.tolist()} != [{out}, {inp}]")
    g = inp if scheme.weights.strategy == "channel" else scheme.weights.group_size
    if inp % g or s.shape != (out, inp // g):
        raise SlimlmError(f"{path}: {name}: scales {tuple(s.shape)} do not fit [{out}, {inp}] in groups of {g}")
    zero = None
    if not scheme.weights.symmetric:
        zero = unpack_int4(need("weight_zero_point").to(torch.int32), out, dim=0)
    m = Int4Linear(packed.to(torch.int32), s, zero, g, inp, bias)
    if scheme.weights.actorder is not None:  # only "weight" gets here (static groups: the format is unchanged)
        m.actorder = str(getattr(scheme.weights.actorder, "value", scheme.weights.actorder))
    return m


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """A compressed-tensors directory as a model with slimlm runtime modules (eval mode, on ``device``).

    The architecture is built from config.json without its quantization_config, each targeted
    ``nn.Linear`` is replaced by the runtime module of its scheme, and the remaining tensors are loaded
    (in ``dtype``, default fp32 on CPU / bf16 on CUDA). Weights are read with safetensors only."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import match_named_modules
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.placement import default_dtype

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    try:
        qc = QuantizationConfig.model_validate(raw)
    except Exception as e:
        raise SlimlmError(f"{path / 'config.json'}: invalid compressed-tensors quantization_config: "
                          f"{str(e).splitlines()[0]}") from e
    if getattr(qc.quantization_status, "value", qc.quantization_status) != "compressed":
        raise SlimlmError(f"{path}: quantization_status {qc.quantization_status!r}; slimlm loads 'compressed' checkpoints")
    if qc.kv_cache_scheme is not None:
        raise SlimlmError(f"{path}: KV-cache quantization (kv_cache_scheme) is not supported by slimlm's runtime")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)

    files = sorted(path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    claimed: set[str] = set()
    for group_name, scheme in qc.config_groups.items():
        fmt = scheme.format or qc.format
        kind = _runtime_kind(scheme, fmt)
        if kind is None:
            raise SlimlmError(f"{path}: compressed-tensors group {group_name!r} ({_describe(scheme)}) is not supported "
                              f"by slimlm's runtime; supported: {'; '.join(SUPPORTED)}")
        for name, module in list(match_named_modules(model, scheme.targets, qc.ignore)):
            if not isinstance(module, nn.Linear):
                raise SlimlmError(f"{path}: group {group_name!r} targets {name} ({type(module).__name__}); "
                                  "slimlm quantizes nn.Linear layers only")
            if name in claimed:
                continue
            local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            model.set_submodule(name, _build(kind, scheme, name, module, local, path))
            claimed.add(name)
            for k in local:
                tensors.pop(f"{name}.{k}")
    if not claimed:
        raise SlimlmError(f"{path}: the quantization_config targets no layer of this model")
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise SlimlmError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    if getattr(config, "tie_word_embeddings", False):  # the head shares the embedding Parameter, loaded above
        missing = [k for k in missing if k != "lm_head.weight"]
    quantized_keys = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    missing = [k for k in missing if k.rpartition(".")[0] not in quantized_keys]
    if missing:
        raise SlimlmError(f"{path}: tensor {missing[0]} missing from the checkpoint ({len(missing)} in all)")
    share_input_quantization(model)
    return model.to(device).eval()
