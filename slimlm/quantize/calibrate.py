"""Calibration: token blocks to calibrate on, and forward hooks that collect per-Linear input statistics.

For a linear layer with inputs x_t ∈ R^in (one row per token) we collect, over n calibration tokens:

- ``hessian``: H = (1/n) Σ_t x_t x_tᵀ  [in, in]  (GPTQ's layer Hessian, up to the factor 2)
- ``channel_absmax``: max_t |x_t,j|  [in]      (SmoothQuant's activation ranges)
- ``absmax``: max_t,j |x_t,j|                   (a static per-tensor activation scale)

The hooks only read the inputs; the model's outputs are unchanged.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimlm import SlimlmError

CALIB_SOURCES = ("text", "movielens-ranking")


@dataclass
class InputStats:
    """Running statistics of one layer's inputs (see the module docstring)."""

    want_hessian: bool = False
    want_channel_absmax: bool = False
    count: int = 0
    absmax: float = 0.0
    hessian_sum: torch.Tensor | None = field(default=None, repr=False)
    channel_absmax: torch.Tensor | None = field(default=None, repr=False)

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if x2.shape[0] == 0:
            return
        self.count += x2.shape[0]
        amax = x2.abs().amax(0)
        self.absmax = max(self.absmax, float(amax.max()))
        if self.want_channel_absmax:
            self.channel_absmax = amax if self.channel_absmax is None else torch.maximum(self.channel_absmax, amax)
        if self.want_hessian:
            if self.hessian_sum is None:
                self.hessian_sum = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device)
            self.hessian_sum += (x2.T @ x2).double()  # fp32 product per batch, fp64 running sum

    @property
    def hessian(self) -> torch.Tensor:
        if self.hessian_sum is None or self.count == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.hessian_sum / self.count


@contextlib.contextmanager
def record_inputs(modules: dict[str, nn.Module], *, hessian: bool = False,
                  channel_absmax: bool = False) -> Iterator[dict[str, InputStats]]:
    """Collect :class:`InputStats` for each named module while the ``with`` body runs forward passes."""
    stats = {name: InputStats(want_hessian=hessian, want_channel_absmax=channel_absmax) for name in modules}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(lambda _m, inputs, _out, s=stats[name]: s.update(inputs[0])))
        yield stats
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- data


def _sample(blocks: list[list[int]], n: int, seed: int) -> list[list[int]]:
    if len(blocks) <= n:
        return blocks
    idx = sorted(random.Random(seed).sample(range(len(blocks)), n))
    return [blocks[i] for i in idx]


def calibration_blocks(tokenizer, source: str | Path, samples: int = 64, seq_len: int = 512,
                       seed: int = 0) -> list[list[int]]:
    """Up to ``samples`` token blocks of exactly ``seq_len`` tokens (seeded choice) from ``source``:

    - ``text``: the built-in held-out prose, second half only (the first half is where benchmarks
      measure perplexity, so calibration never sees the evaluation text);
    - ``movielens-ranking``: prompts of the task's train split, joined with EOS;
    - a file path: .txt, or .jsonl/.parquet rows with a ``text`` field.
    """
    from slimlm.tasks.text import read_texts, text_blocks

    if samples < 1 or seq_len < 2:
        raise SlimlmError("calibration needs samples >= 1 and seq_len >= 2")
    src = str(source)
    if src == "text":
        blocks = text_blocks(tokenizer, read_texts(None), seq_len)
        blocks = blocks[len(blocks) // 2:]
    elif src == "movielens-ranking":
        from slimlm.tasks import load_ranking_task

        examples = load_ranking_task("movielens-ranking", None, "train", limit=max(4 * samples * seq_len // 200, 64),
                                     seed=seed)
        blocks = text_blocks(tokenizer, [ex.prompt for ex in examples], seq_len)
    else:
        path = Path(src)
        if not path.exists():
            raise SlimlmError(f"--calib {src!r}: not {' or '.join(CALIB_SOURCES)}, and no such file")
        blocks = text_blocks(tokenizer, read_texts(path), seq_len)
    blocks = [b for b in blocks if len(b) == seq_len]
    if not blocks:
        raise SlimlmError(f"calibration data {src!r} holds less than one block of {seq_len} tokens "
                          "(give more text or a smaller seq_len)")
    return _sample(blocks, samples, seed)


def batches(blocks: Sequence[Sequence[int]], batch_size: int, device) -> Iterator[torch.Tensor]:
    for i in range(0, len(blocks), batch_size):
        yield torch.tensor([list(b) for b in blocks[i:i + batch_size]], dtype=torch.long, device=device)


@torch.no_grad()
def run_decoder(model, blocks: Sequence[Sequence[int]], batch_size: int = 8,
                progress: Callable[[int], None] | None = None,
                on_output: Callable[[torch.Tensor], None] | None = None) -> None:
    """Forward the decoder stack over ``blocks`` (no LM head, no KV cache); hooks see every layer's inputs.

    ``on_output`` receives the final (normed) hidden states, i.e. the LM head's inputs."""
    device = next(model.parameters()).device
    base = model.get_decoder()
    for ids in batches(blocks, batch_size, device):
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        if on_output is not None:
            on_output(hidden)
        if progress:
            progress(ids.shape[0])


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model, blocks: Sequence[Sequence[int]], batch_size: int = 8) -> list[tuple[torch.Tensor, dict]]:
    """The inputs of decoder layer 0 for each batch of ``blocks``: (hidden [B, T, H], keyword args).

    The keyword arguments (rotary position embeddings, mask, positions) are the same for every layer of
    one attention type, so the layers can be run one at a time on stored inputs (sequential GPTQ).
    The forward stops at layer 0; the rest of the model does not run.
    """
    device = next(model.parameters()).device
    layers = model.get_decoder().layers
    types = set(getattr(model.config, "layer_types", None) or [])
    if len(types) > 1:
        raise SlimlmError(f"layer-wise calibration needs one attention type for all layers; this model mixes {sorted(types)}")
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches(blocks, batch_size, device):
            with contextlib.suppress(_Captured):
                model.get_decoder()(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run one decoder layer on stored inputs (transformers 5 layers return a tensor; older ones a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
