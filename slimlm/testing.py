"""Tiny random models and a tiny tokenizer for tests and examples: real architectures (Llama, Qwen2, Qwen3,
Mistral) at a size that runs in milliseconds, built from configs in code (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimlm import SlimlmError
from slimlm.models import FAMILIES, save_model

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
