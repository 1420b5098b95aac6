"""Calibration statistics for pruning: Gram matrices via hooks, and per-layer depth statistics.

The model is run one decoder layer at a time (:mod:`slimlm.calib`: layer 0's inputs are captured once,
then layer i runs on the outputs of the already pruned layer i − 1). While a layer runs, forward
pre-hooks on its ``o_proj`` / ``down_proj`` accumulate

    H = Σ_batches X_bᵀ X_b      X_b [tokens, in] the inputs of that linear layer,

each batch's product in float32 (fast on CPU) added into a float64 accumulator (what the solver needs).
Only one layer's statistics exist at a time. The diagonal of H (per-channel sum of squares) is the
activation statistic of the Minitron-style baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from slimlm.calib import StopForward, run_layer


class GramCollector:
    """Forward pre-hooks on linear modules accumulating H = Σ XᵀX (``mode='gram'``, float64 [in, in]) or
    only its diagonal (``mode='diag'``, float64 [in]); ``tokens`` counts the rows seen."""

    def __init__(self, modules: dict[str, torch.nn.Module], mode: str = "gram") -> None:
        if mode not in ("gram", "diag"):
            raise ValueError(mode)
        self.mode = mode
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            part = (x * x).sum(0) if self.mode == "diag" else x.T @ x
            part = part.to(torch.float64)
            if name in self.stats:
                self.stats[name] += part
            else:
                self.stats[name] = part
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> GramCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def collect(layer: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, dict]], modules: dict[str, torch.nn.Module],
            mode: str = "gram", keep_outputs: bool = False) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """Run ``layer`` over every calibration batch with collectors on ``modules``; returns the statistics
    (and the layer's outputs when ``keep_outputs``)."""
    outs = [] if keep_outputs else None
    with GramCollector(modules, mode) as col:
        for hidden, kwargs in inputs:
            y = run_layer(layer, hidden, kwargs)
            if outs is not None:
                outs.append(y)
    return col.stats, outs


@torch.no_grad()
def gram_until(layer: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, dict]], module: torch.nn.Module) -> torch.Tensor:
    """The Gram matrix of ``module``'s inputs, stopping each batch's forward pass as soon as ``module`` is
    reached (for ``o_proj`` this skips the MLP, ~3/4 of a layer's work)."""
    col = GramCollector({"x": module})

    def stop(_module, _args):
        raise StopForward

    handle = module.register_forward_pre_hook(stop)  # runs after the collector's hook (registration order)
    try:
        for hidden, kwargs in inputs:
            with contextlib.suppress(StopForward):
                run_layer(layer, hidden, kwargs)
    finally:
        handle.remove()
        col.close()
    return col.stats["x"]


@torch.no_grad()
def gram_and_outputs(layer: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, dict]],
                     module: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One pass: the Gram matrix of ``module``'s inputs, those inputs (per batch) and the layer's outputs.

    With ``module`` = ``down_proj`` the layer output is ``y = r + down_proj(a)`` (residual r, down_proj
    input a), so after ``W`` is replaced by ``Ŵ`` the new output is ``y + a (Ŵ − W)ᵀ``
    (:func:`shift_outputs`): the next layer's inputs without running this layer again."""
    acts: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: acts.append(args[0].detach()))
    outs: list[torch.Tensor] = []
    try:
        with GramCollector({"x": module}) as col:
            for hidden, kwargs in inputs:
                outs.append(run_layer(layer, hidden, kwargs))
    finally:
        handle.remove()
    return col.stats["x"], acts, outs


@torch.no_grad()
def shift_outputs(outs: Sequence[torch.Tensor], acts: Sequence[torch.Tensor], delta: torch.Tensor) -> list[torch.Tensor]:
    """``y + a Δᵀ`` per batch (``Δ = Ŵ − W`` [hidden, in]): the outputs after a change of the last linear map."""
    return [y + a @ delta.to(a.dtype).T for y, a in zip(outs, acts, strict=True)]


# --------------------------------------------------------------------------- residual-stream statistics


def residual_readers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """Every RMSNorm over the residual stream with the linear maps that read its output: per decoder layer
    (input norm: q/k/v), (post-attention norm: gate/up), then (final norm: LM head)."""
    dec = model.get_decoder()
    pairs = []
    for layer in dec.layers:
        a, m = layer.self_attn, layer.mlp
        pairs.append((layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]))
        pairs.append((layer.post_attention_layernorm, [m.gate_proj, m.up_proj]))
    pairs.append((dec.norm, [model.get_output_embeddings()]))
    return pairs


@torch.no_grad()
def norm_output_energy(model: torch.nn.Module, input_batches: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """Per residual-stream norm (in :func:`residual_readers` order): the mean over calibration tokens of
    each channel's squared output, float64 [hidden]; all ones without data (``input_batches`` None).
    One forward pass of the decoder per batch (the LM head is not run)."""
    pairs = residual_readers(model)
    d = model.config.hidden_size
    if not input_batches:
        return [torch.ones(d, dtype=torch.float64) for _ in pairs]
    sums = [torch.zeros(d, dtype=torch.float64) for _ in pairs]
    count = [0]

    def hook(i):
        def fn(_module, _args, output):
            y = output.detach().reshape(-1, d).float()
            sums[i] += (y * y).sum(0).to(torch.float64).cpu()
            if i == 0:
                count[0] += y.shape[0]
        return fn

    handles = [norm.register_forward_hook(hook(i)) for i, (norm, _) in enumerate(pairs)]
    device = next(model.parameters()).device
    try:
        for ids in input_batches:
            model.get_decoder()(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


# --------------------------------------------------------------------------- depth statistics


@torch.no_grad()
def layer_io_cosines(model: torch.nn.Module, input_batches: Sequence[torch.Tensor]) -> list[float]:
    """Per decoder layer: the mean over calibration tokens of cos(layer input, layer output) (one forward
    pass of the whole model per batch; see :func:`slimlm.prune.depth.block_influence`)."""
    from slimlm.prune.depth import token_cosines

    layers = model.get_decoder().layers
    sums = [0.0] * len(layers)
    count = 0
    handles = []
    for i, layer in enumerate(layers):
        def hook(_module, args, kwargs, output, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sums[i] += float(token_cosines(x, y).sum())
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for ids in input_batches:
            model.get_decoder()(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / count for s in sums]


@torch.no_grad()
def layer_skip_losses(model: torch.nn.Module, input_batches: Sequence[torch.Tensor],
                      progress=None) -> tuple[float, list[float]]:
    """Next-token loss of the whole model, and the loss with each decoder layer skipped (its output
    replaced by its input through a forward hook): one full forward pass per layer per batch."""
    layers = model.get_decoder().layers
    device = next(model.parameters()).device

    def loss() -> float:
        total, n = 0.0, 0
        for ids in input_batches:
            ids = ids.to(device)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            total += float(out.loss) * (ids.numel() - ids.shape[0])
            n += ids.numel() - ids.shape[0]
        return total / n

    base = loss()
    skipped = []
    for layer in layers:
        def identity(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            return (x, *output[1:]) if isinstance(output, tuple) else x
        handle = layer.register_forward_hook(identity, with_kwargs=True)
        try:
            skipped.append(loss())
        finally:
            handle.remove()
        if progress:
            progress(1)
    return base, skipped

