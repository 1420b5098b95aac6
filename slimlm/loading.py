"""Load a model or tokenizer by name: a plain Hugging Face directory, a compressed-tensors directory (slimlm's
quantized exports, run on slimlm's own quantized modules), or a built-in asset name (``teacher``).

This is the one place that knows every kind of model directory, so it sits above :mod:`slimlm.models`,
:mod:`slimlm.assets` and :mod:`slimlm.quantize.export` (all three stay free of it). Only safetensors weights
are read, and ``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimlm import SlimlmError
from slimlm.assets import teacher_dir
from slimlm.placement import check_device, default_dtype
from slimlm.quantize.export import is_compressed_tensors_dir, load_quantized


def _require_dir(path: Path) -> None:
    if not path.is_dir():  # else transformers would take the path for a Hub repo id and try to download it
        raise SlimlmError(f"{path}: not a directory (expected a Hugging Face model directory)")


def check_model_dir(path: str | Path) -> None:
    """A local Hugging Face model directory with safetensors weights, or a one-line SlimlmError."""
    path = resolve_model(path)
    _require_dir(path)
    if not (path / "config.json").is_file():
        raise SlimlmError(f"{path}: no config.json (expected a Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickled:
            raise SlimlmError(f"{path}: only pickle weights ({pickled[0]}); slimlm loads safetensors only "
                              "(convert with transformers: model.save_pretrained(dir) in a trusted environment)")
        raise SlimlmError(f"{path}: no *.safetensors weights")


def resolve_model(name_or_path: str | Path) -> Path:
    """``teacher`` names the built-in SmolLM2-135M-Instruct teacher (fetched on first use)."""
    if str(name_or_path) == "teacher":
        return teacher_dir()
    return Path(name_or_path).expanduser()


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM from a local directory (safetensors only), in eval mode, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; a loading bar per model is noise
    check_device(device)
    path = resolve_model(path)
    check_model_dir(path)
    if is_compressed_tensors_dir(path):  # quantized checkpoints run on slimlm's own quantized modules
        return load_quantized(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise SlimlmError(f"{path / 'config.json'}: {str(e).splitlines()[0]}") from e
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The directory's tokenizer exactly as saved.

    With a ``tokenizer.json`` we load it as a plain fast tokenizer: transformers 5 otherwise picks a
    class by ``model_type`` (e.g. Qwen2Tokenizer), which replaces the saved pre-tokenizer with its own.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model(path)
    _require_dir(path)
    try:
        if (path / "tokenizer.json").is_file() and not trust_remote_code:
            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SlimlmError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0][:200]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
