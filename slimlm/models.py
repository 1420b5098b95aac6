"""Load and save Hugging Face causal LMs; architecture facts in one place; tiny models for tests.

Only safetensors weights are read or written (no pickle), and ``trust_remote_code`` stays off unless
the caller asks for it. Supported families: Llama, Qwen2, Qwen3, Mistral (anything whose config uses
the standard attribute names also loads).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm import SlimlmError
from slimlm.io import atomic_dir

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class ArchFacts:
    """The shape facts every stage needs (pruning, quantization, serving, reports)."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def arch_facts(config: Any) -> ArchFacts:
    """Read :class:`ArchFacts` from a transformers config (``head_dim`` defaults to hidden / heads)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ArchFacts(
        family=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total, embedding (input embeddings + an untied LM head) and non-embedding parameter counts.

    Quantized layers (slimlm.quantize) keep their weights as buffers in packed form; they count as the
    in x out logical weights they stand for (``logical_numel``), so counts do not change on quantizing."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already skips tied duplicates; be explicit anyway
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    total += sum(m.logical_numel for m in model.modules() if hasattr(m, "logical_numel"))
    emb_params = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    quantized_head = out is not None and hasattr(out, "logical_numel")
    if out is not None and not quantized_head:
        emb_params.add(id(out.weight))
    embedding = sum(p.numel() for p in model.parameters() if id(p) in emb_params)
    embedding += out.logical_numel if quantized_head else 0
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The KV-cache keyword argument for ``model(...)``: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before (passing the old name to a newer version works but warns on every run)."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (the fastest float on our CPUs), bf16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


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


def check_device(device: str | torch.device) -> None:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...), or a one-line SlimlmError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SlimlmError(f"device {str(device)!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SlimlmError(f"device {str(device)!r}: this machine has no CUDA GPU available to torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SlimlmError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s)")


def resolve_model(name_or_path: str | Path) -> Path:
    """``teacher`` names the built-in SmolLM2-135M-Instruct teacher (fetched on first use)."""
    if str(name_or_path) == "teacher":
        from slimlm.assets import teacher_dir

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
    from slimlm.quantize.export import is_compressed_tensors_dir, load_quantized

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


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path,
               extra: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config + safetensors weights + tokenizer (+ extra JSON files) to ``out_dir`` atomically.

    ``state_dict`` replaces the model's own (a distributed run passes the gathered full state)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------- tiny models for tests

_TINY_TEXT = (
    "User: 24-year-old male technician. Average rating 3.61 over 272 movies. Recently rated movies:\n"
    "- Toy Story (1995; Animation, Children's, Comedy): 4\n- GoldenEye (1995; Action, Adventure, Thriller): 3\n"
    "Candidate movie: Four Rooms (1995; Thriller). Will the user rate it 4 or higher? Answer: Yes No Yes No\n"
    "The quick brown fox jumps over the lazy dog. Hello world, this is a small test of the tokenizer.\n"
)


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory (GPT-2 style, like SmolLM2/Qwen), with a ChatML template.

    " Yes" and " No" come out as single tokens, as the ranking task requires.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TINY_TEXT] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


def tiny_config(family: str, vocab_size: int = 384, **overrides: Any):
    """A 2-layer config of ``family`` with GQA (4 query heads, 2 KV heads); for tests only."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # head_dim deliberately != hidden_size / heads in qwen3, as in real Qwen3
    families = {"llama": (LlamaConfig, {"tie_word_embeddings": True}),
                "qwen2": (Qwen2Config, {"tie_word_embeddings": False}),
                "qwen3": (Qwen3Config, {"head_dim": 32, "tie_word_embeddings": True}),
                "mistral": (MistralConfig, {"sliding_window": None, "tie_word_embeddings": False})}
    if family not in families:
        raise SlimlmError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    cls, extra = families[family]
    # overrides go to the constructor, so derived fields (e.g. Qwen's layer_types) follow them
    return cls(**{**common, **extra, **overrides})


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return model.eval()


def save_tiny_model(family: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny random model of ``family`` with the tiny tokenizer and save it as an HF directory."""
    tok = tiny_tokenizer()
    return save_model(tiny_model(family, seed=seed, vocab_size=len(tok), **overrides), tok, out_dir)
