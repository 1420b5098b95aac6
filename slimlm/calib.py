"""Calibration data and layer-by-layer forward passes: the one place both one-shot compressors get them.

Pruning (:mod:`slimlm.prune.calibrate`: Gram matrices, layer statistics) and quantization
(:mod:`slimlm.quantize.calibrate`: Hessians, smoothing statistics) both need

1. token windows to calibrate on: :func:`calibration_windows` -> [samples, seq_len] (long);
2. those windows in batches on the model's device: :func:`batches` -> [≤batch_size, seq_len] each;
3. the inputs of decoder layer 0 (:func:`layer0_inputs`), so that the layers can then be run one at a
   time on stored inputs (:func:`run_layer`, :func:`propagate`): each layer's statistics are collected
   on the outputs of the already compressed layers before it, and only one layer's activations exist.

Sources of calibration text:

* ``text``: the built-in held-out prose; the windows are its *last* samples x seq_len tokens, so they stay
  disjoint from perplexity blocks taken from its start (``slimlm eval --task text --limit N``);
* ``movielens-ranking``: prompts of the train split (a seeded subsample), joined with EOS;
* a ``.txt`` / ``.jsonl`` / ``.parquet`` file (rows with ``text``): windows drawn at random (seeded).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from slimlm import SlimlmError

BUILTIN_SOURCES = ("text", "movielens-ranking")


def _token_stream(tokenizer, texts: Sequence[str]) -> list[int]:
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False).input_ids:
        stream.extend(ids)
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    return stream


def check_source(source: str) -> None:
    """Fail early (before any model work) on a calibration source that cannot be read."""
    if source in BUILTIN_SOURCES:
        return
    path = Path(source)
    if not path.is_file():
        raise SlimlmError(f"--calib {source}: not 'text', 'movielens-ranking' or an existing "
                          ".txt/.jsonl/.parquet file")
    if path.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
        raise SlimlmError(f"{path}: calibration files must be .txt, .jsonl or .parquet (rows with 'text')")


def calibration_windows(tokenizer, source: str, samples: int, seq_len: int, seed: int = 0,
                        data: str | Path | None = None) -> torch.Tensor:
    """``samples`` non-overlapping windows of ``seq_len`` tokens from ``source`` (module docstring),
    [samples, seq_len] (long). Too little text for that many windows is an error, not a silent shortfall.
    ``data``: the MovieLens directory for ``movielens-ranking`` (None: the fetched asset)."""
    from slimlm.tasks.text import read_texts

    if samples < 1 or seq_len < 2:
        raise SlimlmError("calibration needs samples >= 1 and seq_len >= 2")
    source = str(source)
    check_source(source)
    need = samples * seq_len
    if source == "text":
        stream = _token_stream(tokenizer, read_texts(None))
        if len(stream) < need:
            raise SlimlmError(f"the built-in text has {len(stream)} tokens: at most {len(stream) // seq_len} "
                              f"calibration windows of {seq_len}")
        tail = stream[len(stream) - need:]
        return torch.tensor(tail, dtype=torch.long).reshape(samples, seq_len)
    if source == "movielens-ranking":
        from slimlm.tasks import load_ranking_task

        # a prompt is ~250 tokens with this tokenizer; take enough whole users for the windows, then more
        examples = load_ranking_task(source, data, "train", limit=max(64, math.ceil(need / 100)), seed=seed)
        stream = _token_stream(tokenizer, [ex.prompt for ex in examples])
    else:
        stream = _token_stream(tokenizer, read_texts(source))
    n_windows = len(stream) // seq_len
    if n_windows < samples:
        raise SlimlmError(f"--calib {source}: {len(stream)} tokens give only {n_windows} windows of {seq_len}; "
                          f"lower --samples or --seq-len")
    starts = sorted(random.Random(seed).sample(range(n_windows), samples))
    return torch.tensor([stream[s * seq_len:(s + 1) * seq_len] for s in starts], dtype=torch.long)


def batches(windows: torch.Tensor | Sequence[Sequence[int]], batch_size: int,
            device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Token windows [N, T] (a tensor or N equal-length lists of ids) as consecutive batches
    [≤batch_size, T] (long) on ``device`` (None: where they are; lists: the CPU), in order."""
    ids = torch.as_tensor(windows, dtype=torch.long, device=device)
    return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs (the caller suppresses it)."""


@torch.no_grad()
def layer0_inputs(model: torch.nn.Module, input_batches: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """For each batch of token ids: (hidden states entering decoder layer 0, the keyword arguments the
    model passes to its layers: rotary embeddings, mask, positions). A pre-hook on layer 0 records them and
    stops the forward pass there. The keyword arguments are the same for every layer of one attention
    type, so mixed attention types are refused."""
    types = set(getattr(model.config, "layer_types", None) or [])
    if len(types) > 1:
        raise SlimlmError(f"layer-by-layer calibration needs one attention type for all layers; this model "
                          f"mixes {', '.join(sorted(types))}")
    layers = model.get_decoder().layers
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in input_batches:
            with contextlib.suppress(StopForward):
                model.get_decoder()(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on stored inputs (transformers 5 layers return a tensor; older ones a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def propagate(layer: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The next layer's inputs: this layer's outputs with the same keyword arguments."""
    return [(run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
