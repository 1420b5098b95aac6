"""Structured pruning of a whole model: ``prune_model(model, calib_batches, config) -> (model, report)``.

1. Targets are checked against the architecture before any work (GQA-valid head counts, counts within
   range, a supported family).
2. Depth: the least important decoder layers are removed (importance on calibration data, see depth.py).
3. Width, one decoder layer at a time on a working copy, calibration inputs coming from the already
   pruned earlier layers: attention first (Gram of the o_proj inputs -> choose heads -> zero the removed
   heads' o_proj columns, write the refit kept columns), then the MLP on inputs that see the pruned
   attention (Gram of the down_proj inputs -> choose neurons -> same), then the layer's outputs feed
   the next layer. Masking is exactly equivalent to slicing (tested), so calibration can run on it.
4. Hidden size: the residual-stream channels are scored on the width-pruned working copy (calibration
   energy of every residual-stream norm's output into the maps that read it, see
   :func:`slimlm.prune.baselines.channel_scores`) and the top ones kept, the same in every layer.
5. The working copy is sliced into a genuinely smaller model (slice.py) with a standard config.

Every layer keeps the same counts (selection per layer, count shared), so the result loads anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm import SlimlmError, placement
from slimlm.calib import batches, calibration_windows, check_source, layer0_inputs, propagate
from slimlm.config import PruneConfig
from slimlm.models import FAMILIES, ArchFacts, arch_facts, param_counts
from slimlm.placement import Placement, choose
from slimlm.progress import Progress
from slimlm.prune import baselines, calibrate, depth, osscar
from slimlm.prune.slice import depth_config, keep_layers, mask_width, slice_width, width_config


@dataclass(frozen=True)
class Targets:
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    hidden: int

    def to_dict(self) -> dict:
        return asdict(self)


def _count(value: int | float, size: int) -> int:
    return round(value * size) if isinstance(value, float) else int(value)


def check_supported(config) -> None:
    """Refuse architectures the slicing does not know, before any work."""
    if config.model_type not in FAMILIES:
        raise SlimlmError(f"pruning supports {', '.join(FAMILIES)} models; this one is {config.model_type!r}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        raise SlimlmError(f"layers of different attention types ({', '.join(sorted(set(layer_types)))}) are not "
                          "supported by the layer-by-layer calibration")


def _rounded(keep: int | float | None, size: int, multiple: int, flag: str, what: str) -> int:
    """A width to keep: a fraction rounded to ``multiple`` (at least one multiple, at most ``size``), or a
    count that must fit and be a multiple (or the whole size)."""
    if keep is None:
        return size
    if isinstance(keep, float):
        return min(size, max(multiple, round(keep * size / multiple) * multiple))
    if keep > size:
        raise SlimlmError(f"{flag} {keep}: the model has only {size} {what}")
    if keep % multiple and keep != size:
        raise SlimlmError(f"{flag} {keep} is not a multiple of {multiple} (--multiple)")
    return keep


def prune_targets(facts: ArchFacts, cfg: PruneConfig) -> Targets:
    """Counts to keep, validated: every impossible target is a one-line error here, before any work."""
    L, inter, heads, kv, qpk = (facts.num_layers, facts.intermediate_size, facts.num_heads, facts.num_kv_heads,
                                facts.queries_per_kv)
    layers = L
    if cfg.layers_keep is not None:
        layers = max(1, _count(cfg.layers_keep, L))
        if layers > L:
            raise SlimlmError(f"--layers-keep {cfg.layers_keep}: the model has only {L} layers")
    new_inter = _rounded(cfg.mlp_keep, inter, cfg.multiple, "--mlp-keep", "MLP neurons per layer")
    new_heads, new_kv = heads, kv
    if cfg.heads_keep is not None:
        new_heads = _count(cfg.heads_keep, heads)
        if new_heads > heads:
            raise SlimlmError(f"--heads-keep {cfg.heads_keep}: the model has only {heads} query heads")
        if cfg.head_mode == "kv":
            valid = [qpk * g for g in range(1, kv + 1)]
            if new_heads not in valid:
                raise SlimlmError(f"--heads-keep {cfg.heads_keep} gives {new_heads} query heads, which breaks GQA "
                                  f"({heads} heads / {kv} KV heads, whole KV groups removed): valid counts are "
                                  f"{', '.join(map(str, valid))} (or use --head-mode query)")
            new_kv = new_heads // qpk
        else:
            valid = [kv * q for q in range(1, qpk + 1)]
            if new_heads not in valid:
                raise SlimlmError(f"--heads-keep {cfg.heads_keep} gives {new_heads} query heads, which breaks GQA "
                                  f"({heads} heads / {kv} KV heads, the same number removed per KV group): valid "
                                  f"counts are {', '.join(map(str, valid))} (or use --head-mode kv)")
    new_hidden = _rounded(cfg.hidden_keep, facts.hidden_size, cfg.multiple, "--hidden-keep", "hidden channels")
    return Targets(layers, new_inter, new_heads, new_kv, new_hidden)


def check_pruned_config(hf_config: Any, facts: ArchFacts, t: Targets, cfg: PruneConfig) -> Any:
    """The pruned model's config as transformers will validate it when it is saved and loaded, checked before
    any work: a shape its config class refuses (LlamaConfig: ``hidden_size`` a multiple of the attention heads,
    even with an explicit ``head_dim``) is a one-line error here, not a failure at the save after the solvers.
    Returns that config (the pruned model's shape, no weights)."""
    new = depth_config(width_config(hf_config, head_dim=facts.head_dim, heads=t.heads, kv_heads=t.kv_heads,
                                    intermediate=t.intermediate, hidden=t.hidden), t.layers)
    validate = getattr(new, "validate", None)
    if validate is None:  # a transformers without config validation
        return new
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - transformers raises its own validation error types
        reason = str(getattr(e, "__cause__", None) or e).strip().splitlines()[-1].strip().rstrip(".")
        hint = ""
        if t.hidden % t.heads:
            step = math.lcm(t.heads, cfg.multiple)
            sizes = [h for h in (t.hidden // step * step, (t.hidden // step + 1) * step) if 0 < h <= facts.hidden_size]
            hint = (f"; keep a hidden size that is a multiple of the {t.heads} heads kept"
                    + (f" (e.g. {', '.join(map(str, sizes))})" if sizes else "") + " or fewer heads (heads_keep)")
        raise SlimlmError(f"the pruned {hf_config.model_type} config would not load in transformers: {reason}{hint}") from e
    return new


def planned_config(hf_config: Any, cfg: PruneConfig) -> tuple[ArchFacts, Targets, Any]:
    """Every check of a prune that needs only the source's config, in the order :func:`prune_dir` makes
    them: (the source's facts, the counts to keep, the pruned config). The pipeline runs it at plan time
    on each prune stage's input shape, so a recipe whose later prune cannot apply fails before any stage."""
    if getattr(hf_config, "quantization_config", None) is not None:
        raise SlimlmError("the model is quantized; prune the unquantized model (quantize last)")
    check_supported(hf_config)
    facts = arch_facts(hf_config)
    targets = prune_targets(facts, cfg)
    return facts, targets, check_pruned_config(hf_config, facts, targets, cfg)


def needs_calibration(cfg: PruneConfig, facts: ArchFacts, t: Targets) -> bool:
    width = (t.intermediate < facts.intermediate_size or t.heads < facts.num_heads
             or t.hidden < facts.hidden_size)
    return (width and cfg.method != "magnitude") or t.layers < facts.num_layers


@contextlib.contextmanager
def _threads(n: int):
    """Run the block with ``n`` intra-op threads (0: unchanged), restoring the previous count after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc). Each layer's calibration and solver temporaries are
    freed but stay in malloc's arenas otherwise: on a 200M-parameter Llama on CPU the resident set grew by
    ~50 MiB per layer (measured), so the peak grew with depth."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _choose(cfg: PruneConfig, W: torch.Tensor, H: torch.Tensor | None, m: int, keep: int,
            part: torch.Tensor | None, device: torch.device) -> tuple[list[int], torch.Tensor | None, dict]:
    """One linear layer: the kept groups, the new weights of the kept columns (None = unchanged), stats.

    The solver runs on ``device`` — the calibration device, where H already is — in float64; on a CPU with
    ``solver_threads`` intra-op threads (None: :func:`slimlm.placement.solver_threads`)."""
    threads = 0
    if device.type == "cpu":
        threads = placement.solver_threads(device) if cfg.solver_threads is None else cfg.solver_threads
    with _threads(threads):
        return _choose_inner(cfg, W.detach().to(device), None if H is None else H.to(device), m, keep, part)


def _choose_inner(cfg: PruneConfig, W: torch.Tensor, H: torch.Tensor | None, m: int, keep: int,
                  part: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None, dict]:
    t0 = time.perf_counter()
    info: dict = {}
    if cfg.method in ("osscar", "greedy"):
        res = osscar.solve(H, W, m, keep, damping=cfg.damping, local=cfg.method == "osscar", steps=cfg.greedy_steps,
                           part=part, max_iters=cfg.local_search_iters, max_swap=cfg.max_swap,
                           candidates=cfg.swap_candidates, device=W.device)
        kept, weight = res.kept, res.weight
        info.update(objective=res.objective, objective_greedy=res.objective_greedy, swaps=res.swaps)
    else:
        scores = baselines.magnitude_scores(W, m) if cfg.method == "magnitude" else \
            baselines.activation_scores(H.diagonal(), m)
        kept, weight = baselines.top_groups(scores.cpu(), keep, part), None
    if H is not None:
        w = weight if weight is not None else W[:, osscar.group_columns(kept, m, device=W.device)]
        info["rel_error"] = osscar.relative_error(H, W, kept, m, w)
        if weight is None:
            G, _ = osscar.damped(H, cfg.damping)
            info["objective"] = osscar.objective(G, W, kept, m, w)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return kept, weight, info


def prune_model(model: torch.nn.Module, calib: Sequence[torch.Tensor] | None, cfg: PruneConfig,
                progress: Progress | None = None) -> tuple[torch.nn.Module, dict]:
    """A new, smaller model (``model`` is untouched) and a JSON-able report.

    ``calib``: batches of token ids [B, T] (no padding); not needed for magnitude width pruning alone."""
    t_start = time.perf_counter()
    check_supported(model.config)
    facts = arch_facts(model.config)
    t = prune_targets(facts, cfg)
    if needs_calibration(cfg, facts, t) and not calib:
        raise SlimlmError(f"method {cfg.method!r} needs calibration data")
    tick = progress or (lambda *_: None)
    seconds = {"depth": 0.0, "calibration": 0.0, "solve": 0.0, "slice": 0.0}
    report: dict = {"method": cfg.method, "config": cfg.model_dump(mode="json"), "arch_before": facts.to_dict(),
                    "targets": t.to_dict(), "params_before": param_counts(model)}
    if calib:
        report["calibration"] = {"batches": len(calib), "sequences": sum(len(b) for b in calib),
                                 "tokens": sum(b.numel() for b in calib)}

    # ---- depth
    kept_layers = list(range(facts.num_layers))
    if t.layers < facts.num_layers:
        t0 = time.perf_counter()
        tick("depth importance", 0, facts.num_layers)
        if cfg.depth_metric == "cosine":
            importance = depth.block_influence(calibrate.layer_io_cosines(model, calib))
        else:
            subset, n = [], 0
            for b in calib:  # the loss metric costs one forward pass per layer: use a few sequences
                if n >= cfg.depth_loss_samples:
                    break
                subset.append(b[:cfg.depth_loss_samples - n])
                n += len(subset[-1])
            done = [0]

            def step(k: int) -> None:
                done[0] += k
                tick("depth importance", done[0], facts.num_layers)

            base, skipped = calibrate.layer_skip_losses(model, subset, progress=step)
            importance = depth.loss_importance(base, skipped)
            report["depth_base_loss"] = base
        kept_layers = depth.select_layers(importance, t.layers)
        report["depth_importance"] = importance
        work = keep_layers(model, kept_layers)
        seconds["depth"] = time.perf_counter() - t0
        tick("depth importance", facts.num_layers, facts.num_layers)
    else:
        work = copy.deepcopy(model)
    report["kept_layers"] = kept_layers

    # ---- width
    prune_mlp = t.intermediate < facts.intermediate_size
    prune_heads = t.heads < facts.num_heads
    layers_report: list[dict] = []
    mlp_kept: list[list[int]] = []
    heads_kept: list[list[int]] = []
    kv_kept: list[list[int]] = []
    if prune_mlp or prune_heads:
        hd, qpk = facts.head_dim, facts.queries_per_kv
        if cfg.head_mode == "kv":
            m_attn, n_keep_attn, part = qpk * hd, t.kv_heads, None
        else:
            m_attn, n_keep_attn, part = hd, t.heads, torch.arange(facts.num_heads) // qpk
        use_data = cfg.method != "magnitude"
        device = next(work.parameters()).device  # calibration runs there, and so do the solvers
        t0 = time.perf_counter()
        inputs = layer0_inputs(work, calib) if use_data else []
        seconds["calibration"] += time.perf_counter() - t0
        layers = work.get_decoder().layers
        for i, layer in enumerate(layers):
            entry: dict = {"source_layer": kept_layers[i]}
            last = i + 1 == len(layers)
            if prune_heads:
                o = layer.self_attn.o_proj
                H = None
                if use_data:
                    t0 = time.perf_counter()
                    H = calibrate.gram_until(layer, inputs, o)
                    seconds["calibration"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                kept, weight, info = _choose(cfg, o.weight.detach(), H, m_attn, n_keep_attn, part, device)
                H = None  # an 8B down_proj's Gram is 1.6 GB: don't carry it into the next step
                seconds["solve"] += time.perf_counter() - t0
                if cfg.head_mode == "kv":
                    kv = kept
                    heads = [g * qpk + j for g in kept for j in range(qpk)]
                else:
                    kv, heads = list(range(facts.num_kv_heads)), kept
                mask_width(layer, heads=heads, head_dim=hd, o_weight=weight)
                heads_kept.append(heads)
                kv_kept.append(kv)
                entry["attn"] = {"kept_heads": heads, "kept_kv_heads": kv, **info}
            if prune_mlp:
                down = layer.mlp.down_proj
                H = acts = outs = None
                if use_data:  # the MLP's statistics see this layer's pruned attention
                    t0 = time.perf_counter()
                    H, acts, outs = calibrate.gram_and_outputs(layer, inputs, down)
                    seconds["calibration"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                old = down.weight.detach().clone()
                kept, weight, info = _choose(cfg, old, H, 1, t.intermediate, None, device)
                H = None
                seconds["solve"] += time.perf_counter() - t0
                mask_width(layer, mlp=kept, down_weight=weight)
                mlp_kept.append(kept)
                entry["mlp"] = {"kept": kept, **info}
                if use_data and not last:
                    t0 = time.perf_counter()
                    inputs = list(zip(calibrate.shift_outputs(outs, acts, down.weight.detach() - old),
                                      [kw for _, kw in inputs], strict=True))
                    seconds["calibration"] += time.perf_counter() - t0
                del acts, outs
            elif use_data and not last:
                t0 = time.perf_counter()
                inputs = propagate(layer, inputs)
                seconds["calibration"] += time.perf_counter() - t0
            layers_report.append(entry)
            _trim_heap()
            tick("prune layers", i + 1, len(layers))
        del inputs

    # ---- hidden size (on the width-pruned working copy, which computes what the sliced model will)
    prune_hidden = t.hidden < facts.hidden_size
    hidden_kept = None
    if prune_hidden:
        t0 = time.perf_counter()
        tick("hidden channels", 0, 1)
        energy = calibrate.norm_output_energy(work, calib if cfg.method != "magnitude" else None)
        readers = [[m.weight for m in mods] for _, mods in calibrate.residual_readers(work)]
        scores = baselines.channel_scores(energy, readers)
        hidden_kept = baselines.top_groups(scores, t.hidden)
        report["hidden"] = {"kept": hidden_kept,
                            "score_kept_fraction": float(scores[hidden_kept].sum() / scores.sum().clamp_min(1e-300))}
        seconds["calibration"] += time.perf_counter() - t0
        tick("hidden channels", 1, 1)
    if prune_mlp or prune_heads or prune_hidden:
        t0 = time.perf_counter()
        small = slice_width(work, mlp=mlp_kept if prune_mlp else None, heads=heads_kept if prune_heads else None,
                            kv_heads=kv_kept if prune_heads else None, hidden=hidden_kept)
        seconds["slice"] = time.perf_counter() - t0
    else:
        small = work
    report["layers"] = layers_report
    report["arch_after"] = arch_facts(small.config).to_dict()
    report["params_after"] = param_counts(small)
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    for kind in ("attn", "mlp"):
        errs = [e[kind]["rel_error"] for e in layers_report if kind in e and "rel_error" in e[kind]]
        if errs:
            report[f"{kind}_rel_error_mean"] = sum(errs) / len(errs)
    return small, report


def prune_dir(source: str | Path, out_dir: str | Path, cfg: PruneConfig, *, placement: Placement | None = None,
              progress: Progress | None = None, status: Callable[[str], None] | None = None) -> dict:
    """Prune the model in ``source`` (a directory or ``teacher``) into ``out_dir`` (written atomically, with
    ``prune_report.json``); returns the report. The model is loaded, calibrated and solved where
    ``placement`` says (default: :func:`slimlm.placement.choose`; the solvers' own float64/float32 maths
    runs on that device), and the pruned model keeps the placement's dtype. Every check that needs only
    config.json and the calibration source runs before the weights are loaded."""
    from transformers import AutoConfig

    from slimlm.io import peak_rss_mib
    from slimlm.loading import load_model, load_tokenizer, resolve_model
    from slimlm.models import save_model

    t_start = time.perf_counter()
    path = resolve_model(str(source))
    if not (path / "config.json").is_file():
        raise SlimlmError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise SlimlmError(f"{path / 'config.json'}: {str(e).splitlines()[0]}") from e
    try:
        facts, targets, _ = planned_config(hf_config, cfg)
    except SlimlmError as e:
        raise SlimlmError(f"{path}: {e}") from None
    use_calib = needs_calibration(cfg, facts, targets)
    if use_calib:
        check_source(cfg.calib)
    where = placement or choose()
    device = str(where.device)
    source_model = load_model(path, device=where.device, dtype=where.dtype)
    tokenizer = load_tokenizer(path)
    calib = None
    if use_calib:
        if status:
            status(f"calibration data: {cfg.samples} x {cfg.seq_len} tokens of {cfg.calib}")
        windows = calibration_windows(tokenizer, cfg.calib, cfg.samples, cfg.seq_len, cfg.seed, data=cfg.calib_data)
        calib = batches(windows, cfg.batch_size, device)
    small, report = prune_model(source_model, calib, cfg, progress=progress)
    report.update(source=str(path), placement=where.to_dict(), wall_seconds=round(time.perf_counter() - t_start, 2),
                  peak_rss_mib=round(peak_rss_mib(), 1))
    save_model(small, tokenizer, out_dir, extra={"prune_report.json": report})
    return report
