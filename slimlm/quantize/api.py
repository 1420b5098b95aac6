"""Quantize a loaded model in place: ``quantize_model(model, QuantConfig(...), calib_blocks) -> report``.

Every ``nn.Linear`` not named in ``ignore`` (default: ``lm_head``; embeddings are never quantized) is
replaced by the runtime module of the scheme (:mod:`slimlm.quantize.linear`):

- ``fp8``:  e4m3fn weights, per-channel scales; activations per token (dynamic) or, with
  ``static_activations``, one per-tensor scale per layer from the calibration max |x| / 448.
- ``int8``: int8 weights, per-channel scales, dynamic per-token int8 activations. With ``smooth``,
  SmoothQuant first moves activation outliers into the weights (calibrated; exact in real arithmetic):
  q/k/v inputs via the input RMSNorm, gate/up via the post-attention RMSNorm, down via up_proj's rows.
- ``int4``: weight-only int4 in groups of ``group_size`` input columns, symmetric or asymmetric, by
  round-to-nearest (``rtn``), GPTQ (``gptq``) or QuantEase (``quantease``: coordinate descent on the
  same layer objective, from GPTQ's solution and on its grid; with ``act_order`` from GPTQ's
  activation-order solution). The calibrated methods run sequentially: layer l's Hessians are
  collected on the outputs of the already-quantized layers < l. A layer whose in_features is not a
  multiple of ``group_size`` uses the largest power-of-two divisor below it (e.g. 576 -> 64), and the
  report says so. QuantEase's report lists each layer's objective before (GPTQ) and after.
- ``int8`` with ``method="quantease"``: the int8 per-channel weight grid refined by QuantEase from
  round-to-nearest (calibrated, sequential as above; after SmoothQuant when ``smooth``).

Ignore entries follow compressed-tensors: an exact module name, a class name, or ``re:REGEX``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from slimlm import SlimlmError
from slimlm.calib import batches, layer0_inputs, propagate, run_layer
from slimlm.placement import Placement
from slimlm.progress import Progress
from slimlm.quantize.calibrate import InputStats, record_inputs, run_decoder
from slimlm.quantize.gptq import gptq_int4
from slimlm.quantize.linear import (
    SIBLINGS,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    is_quantized,
    share_input_quantization,
)
from slimlm.quantize.quantease import quantease_refine
from slimlm.quantize.schemes import (
    CLIP_RATIOS,
    INT4_QMAX,
    INT4_QMIN,
    INT8_QMAX,
    fp8_static_scale,
    quantize_fp8_per_channel,
    quantize_int8_per_channel,
    rtn_int4,
    smoothing_scales,
)

SCHEMES = ("fp8", "int8", "int4")
INT4_ONLY = ("group_size", "symmetric", "act_order", "clip_search")
CALIBRATED_METHODS = ("gptq", "quantease")  # "method" values that solve a layer objective (need --calib)


class QuantConfig(BaseModel):
    """How to quantize. Options that belong to another scheme are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    scheme: Literal["fp8", "int8", "int4"]
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    # int4 (method, damp, quantease_iters: also int8 with method="quantease")
    group_size: Literal[32, 64, 128] = 128
    symmetric: bool = True
    method: Literal["gptq", "rtn", "quantease"] = "gptq"
    damp: float = Field(0.01, gt=0, lt=1)
    act_order: bool = False  # GPTQ: visit columns by decreasing Hessian diagonal (static groups); QuantEase: its init
    quantease_iters: int = Field(25, ge=1, le=1000)  # QuantEase: most sweeps (stops early when f stops improving)
    # each group's range by a search over clipping ratios (schemes.CLIP_RATIOS: least rounding error weighted by
    # the calibration Hessian's diagonal; uniform for rtn); GPTQ / QuantEase then work on that grid. None: on
    # for the calibrated methods (where it measured better: BENCHMARKS.md, "Clipping search"), off for rtn
    # (where uniform weights made it worse)
    clip_search: bool | None = None
    # the dtype int4 group scales are stored in (the export's ``dtype``; set by QuantizeConfig): the grid is
    # rounded to it before the codes are chosen
    scale_dtype: Literal["bfloat16", "float32"] = "float32"
    # int8
    smooth: bool = False
    smooth_alpha: float = Field(0.5, ge=0, le=1)
    # fp8
    static_activations: bool = False

    def check(self) -> None:
        given = self.model_fields_set
        if self.scheme != "int4":
            wrong = [k for k in INT4_ONLY if k in given]
            if self.scheme == "fp8":
                wrong += [k for k in ("method", "damp") if k in given]
            if wrong:
                raise SlimlmError(f"{', '.join(wrong)} apply to --scheme int4 only (got --scheme {self.scheme})")
            if self.scheme == "int8" and "method" in given and self.method == "gptq":
                raise SlimlmError("--method gptq applies to --scheme int4 only (int8 weights: rtn or quantease)")
            if self.scheme == "int8" and "damp" in given and self.method != "quantease":
                raise SlimlmError("damp applies to --scheme int8 with --method quantease only")
        elif self.act_order and self.method == "rtn":
            raise SlimlmError("--act-order applies to --method gptq or quantease only (round-to-nearest has no "
                              "column order)")
        if "quantease_iters" in given and self.method != "quantease":
            raise SlimlmError("--quantease-iters applies to --method quantease only")
        if self.scheme != "int8" and (self.smooth or "smooth_alpha" in given):
            raise SlimlmError(f"--smooth applies to --scheme int8 only (got --scheme {self.scheme})")
        if self.scheme != "fp8" and self.static_activations:
            raise SlimlmError(f"--static-activations applies to --scheme fp8 only (got --scheme {self.scheme})")

    @property
    def quantease(self) -> bool:
        """Weights by QuantEase (int4, or int8 with an explicit method="quantease")."""
        return self.scheme in ("int4", "int8") and self.method == "quantease"

    @property
    def clip(self) -> bool:
        """Whether int4 group ranges come from the clipping search (``clip_search``, or its per-method default)."""
        if self.clip_search is not None:
            return self.clip_search
        return self.scheme == "int4" and self.method in CALIBRATED_METHODS

    @property
    def needs_calibration(self) -> bool:
        return ((self.scheme == "int4" and self.method in CALIBRATED_METHODS) or self.quantease
                or (self.scheme == "int8" and self.smooth) or (self.scheme == "fp8" and self.static_activations))


class QuantizeConfig(QuantConfig):
    """A whole ``slimlm quantize`` run: the scheme (:class:`QuantConfig`) plus its calibration data and the
    storage dtype of the tensors left in float (pipeline recipes use this as a quantize stage's config)."""

    calib: str | None = None  # text | movielens-ranking | a .txt/.jsonl/.parquet file (schemes that calibrate)
    calib_data: str | None = None  # calib movielens-ranking: its data directory (None: the fetched asset)
    samples: int = Field(64, ge=1)  # calibration blocks
    seq_len: int = Field(512, ge=2)  # tokens per block
    batch_size: int = Field(8, ge=1)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # storage of the tensors left in float
    # config.json's "dtype": what transformers loads the model in and what it should be served in. auto:
    # float32 for a ranking model (its label probabilities need the resolution: in bf16 the P(" Yes") of
    # one user's 100 candidates collapse onto a dozen distinct values), else the storage dtype. bf16
    # storage under a float32 config is exact (every bf16 value is an fp32 value) and half the size.
    run_dtype: Literal["auto", "bfloat16", "float32"] = "auto"

    def config_dtype(self, ranking: bool) -> str:
        if self.run_dtype == "auto":
            return "float32" if ranking else self.dtype
        return self.run_dtype

    def check(self) -> None:
        super().check()
        if self.needs_calibration and self.calib is None:
            raise SlimlmError("this scheme needs calibration data: add --calib text|movielens-ranking|FILE")

    def scheme_config(self) -> QuantConfig:
        fields = self.model_dump(include=set(QuantConfig.model_fields), exclude_unset=True)
        if self.scheme == "int4":  # the export stores int4 group scales in ``dtype``
            fields["scale_dtype"] = self.dtype
        return QuantConfig.model_validate(fields)


def select_targets(model: nn.Module, ignore: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to quantize, by name, in model order; every ignore entry must match something."""
    from compressed_tensors.utils import is_match

    named = list(model.named_modules())
    for entry in ignore:
        if not any(is_match(name, m, entry) for name, m in named if name):
            example = next((n for n, m in named if isinstance(m, nn.Linear)), "lm_head")
            raise SlimlmError(f"ignore entry {entry!r} matches no module (names look like {example!r}; "
                              "use an exact name, a class name or 're:REGEX')")
    targets = {name: m for name, m in named if isinstance(m, nn.Linear) and not (ignore and is_match(name, m, ignore))}
    if not targets:
        kinds = sorted({type(m).__name__ for _, m in named if m is not model})[:6]
        raise SlimlmError(f"no nn.Linear layers left to quantize (model {type(model).__name__}; module types "
                          f"{', '.join(kinds)}; ignore={ignore})")
    return targets


def effective_group_size(in_features: int, group_size: int) -> int:
    """``group_size``, or the largest power-of-two divisor of ``in_features`` below it (at least 8)."""
    g = group_size
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    raise SlimlmError(f"in_features {in_features} has no int4 group size in {group_size}, {group_size // 2}, ..., 8 "
                      "(it must be a multiple of 8); ignore this layer")


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    model.set_submodule(name, module)


def quantize_linear(linear: nn.Linear, cfg: QuantConfig, *, group_size: int | None = None,
                    input_scale: torch.Tensor | None = None) -> QuantizedLinear:
    """Round-to-nearest quantization of one layer into its runtime module (no calibration)."""
    w, b = linear.weight.detach(), linear.bias
    if cfg.scheme == "int8":
        return Int8Linear(*quantize_int8_per_channel(w), b)
    if cfg.scheme == "fp8":
        return Fp8Linear(*quantize_fp8_per_channel(w), b, input_scale=input_scale)
    g = group_size or cfg.group_size
    q, scale, zero = rtn_int4(w, g, cfg.symmetric, **int4_grid(cfg))
    return Int4Linear.from_codes(q, scale, zero, g, b)


def int4_grid(cfg: QuantConfig) -> dict:
    """How int4 group scales are chosen: :func:`slimlm.quantize.schemes.int4_group_params`' keywords."""
    return {"clip_ratios": CLIP_RATIOS if cfg.clip else None, "scale_dtype": getattr(torch, cfg.scale_dtype)}


# --------------------------------------------------------------------------- SmoothQuant


def _smooth_groups(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Linear]]]:
    """(kind, producer, consumers) per layer: RMSNorm -> q/k/v, RMSNorm -> gate/up, up_proj -> down_proj."""
    from slimlm.models import FAMILIES

    family = getattr(model.config, "model_type", "?")
    if family not in FAMILIES:
        raise SlimlmError(f"--smooth knows the layer structure of {', '.join(FAMILIES)}; this model is {family!r}")
    attn_in, mlp_in = SIBLINGS  # the layers that read the attention / MLP norm's output
    groups = []
    for layer in model.get_decoder().layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups.append(("norm", layer.input_layernorm, [getattr(attn, n) for n in attn_in]))
        groups.append(("norm", layer.post_attention_layernorm, [getattr(mlp, n) for n in mlp_in]))
        groups.append(("rows", mlp.up_proj, [mlp.down_proj]))
    return groups


@torch.no_grad()
def apply_smoothing(model: nn.Module, act_absmax: dict[int, torch.Tensor], targets: dict[str, nn.Linear],
                    alpha: float) -> int:
    """Fold SmoothQuant factors into the producers and consumers (by module id); returns groups smoothed.

    Output-preserving: a norm's output channel j (or up_proj's row j) is divided by s_j and every
    consumer's input column j multiplied by s_j."""
    quantized = {id(m) for m in targets.values()}
    n = 0
    for kind, producer, consumers in _smooth_groups(model):
        if not any(id(c) in quantized for c in consumers):
            continue
        act = act_absmax[id(consumers[0])]
        wmax = torch.stack([c.weight.abs().amax(0) for c in consumers]).amax(0)
        s = smoothing_scales(act, wmax, alpha).to(producer.weight.dtype)
        if kind == "norm":
            producer.weight.div_(s)
        else:
            producer.weight.div_(s[:, None])
            if producer.bias is not None:
                producer.bias.div_(s)
        for c in consumers:
            c.weight.mul_(s[None, :])
        n += 1
    return n


# --------------------------------------------------------------------------- main entry


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig,
                   calib_blocks: torch.Tensor | Sequence[Sequence[int]] | None = None, *,
                   batch_size: int = 8, progress: Progress | None = None) -> dict:
    """Quantize ``model`` in place (see the module docstring) and return a report dict.

    ``calib_blocks``: token ids [N, T] (:func:`slimlm.calib.calibration_windows`, or N equal-length lists)."""
    cfg.check()
    if is_quantized(model):
        raise SlimlmError("this model is already quantized; quantize the unquantized model instead")
    n_blocks = 0 if calib_blocks is None else len(calib_blocks)
    if cfg.needs_calibration and not n_blocks:
        what = ("--method quantease" if cfg.quantease else
                {"int4": f"--method {cfg.method}", "int8": "--smooth", "fp8": "--static-activations"}[cfg.scheme])
        raise SlimlmError(f"{what} needs calibration data (--calib text|movielens-ranking|FILE)")
    t0 = time.perf_counter()
    targets = select_targets(model, cfg.ignore)
    report: dict = {"scheme": cfg.scheme, "config": cfg.model_dump(), "quantized_layers": len(targets),
                    "ignored": cfg.ignore, "calibration_blocks": n_blocks if cfg.needs_calibration else 0,
                    "notes": []}
    head = model.get_output_embeddings()
    if head is not None and head in targets.values() and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the LM head gets its own quantized copy; embeddings stay float
        report["notes"].append("lm_head was tied to the input embeddings; it is now a separate quantized layer")
    tick = progress or (lambda *_: None)

    if cfg.scheme == "int4":
        groups = {name: effective_group_size(m.in_features, cfg.group_size) for name, m in targets.items()}
        smaller = sorted({f"{n.rsplit('.', 1)[-1]} (in {targets[n].in_features}) -> g{g}"
                          for n, g in groups.items() if g != cfg.group_size})
        if smaller:
            report["notes"].append(f"group size {cfg.group_size} does not divide in_features of: {'; '.join(smaller)}")
        report["group_sizes"] = {n.rsplit(".", 1)[-1]: g for n, g in groups.items()}
        if cfg.method == "rtn":
            for i, (name, m) in enumerate(targets.items()):
                _swap(model, name, quantize_linear(m, cfg, group_size=groups[name]))
                tick("int4 rtn", i + 1, len(targets))
        else:
            report["notes"] += _calibrated_sequential(model, targets, groups, cfg, calib_blocks, batch_size, tick,
                                                      report)
    else:
        input_scales: dict[str, torch.Tensor] = {}
        if cfg.smooth or cfg.static_activations:
            stats = _activation_stats(model, targets, calib_blocks, batch_size, channel=cfg.smooth, tick=tick)
            if cfg.smooth:
                absmax = {id(targets[n]): s.channel_absmax for n, s in stats.items() if s.channel_absmax is not None}
                report["smoothed_groups"] = apply_smoothing(model, absmax, targets, cfg.smooth_alpha)
            if cfg.static_activations:
                input_scales = {n: fp8_static_scale(s.absmax) for n, s in stats.items()}
        if cfg.quantease:  # int8 weights by QuantEase (on the smoothed model when smooth)
            groups = {name: m.in_features for name, m in targets.items()}
            report["notes"] += _calibrated_sequential(model, targets, groups, cfg, calib_blocks, batch_size, tick,
                                                      report)
        else:
            for i, (name, m) in enumerate(targets.items()):
                _swap(model, name, quantize_linear(m, cfg, input_scale=input_scales.get(name)))
                tick(f"{cfg.scheme} weights", i + 1, len(targets))
        share_input_quantization(model)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _activation_stats(model, targets, blocks, batch_size, *, channel: bool, tick: Progress):
    """Input statistics of every target from one pass over the calibration blocks (LM head: the final hidden states)."""
    head = model.get_output_embeddings()
    head_name = next((n for n, m in targets.items() if m is head), None)
    hooked = {n: m for n, m in targets.items() if n != head_name}
    done = 0
    with record_inputs(hooked, channel_absmax=channel) as stats:
        def step(n):
            nonlocal done
            done += n
            tick("calibration", done, len(blocks))

        if head_name is None:
            run_decoder(model, blocks, batch_size, progress=step)
        else:
            head_stats = InputStats(want_channel_absmax=channel)
            run_decoder(model, blocks, batch_size, progress=step, on_output=head_stats.update)
    stats = dict(stats)
    if head_name is not None:
        stats[head_name] = head_stats
    missing = [n for n, s in stats.items() if s.count == 0]
    if missing:
        raise SlimlmError(f"calibration inputs never reached {missing[0]} (and {len(missing) - 1} more layers)")
    return stats


def solve_layer(linear: nn.Linear, hessian: torch.Tensor, cfg: QuantConfig,
                group_size: int) -> tuple[QuantizedLinear, list[float] | None]:
    """One layer from its calibration Hessian: GPTQ or QuantEase (int4), QuantEase (int8).

    Returns the runtime module and, for QuantEase, its objective per sweep (GPTQ's / RTN's first)."""
    w, b = linear.weight.detach(), linear.bias
    if cfg.scheme == "int8":  # the per-channel grid of round-to-nearest, refined
        q, scale = quantize_int8_per_channel(w)
        q, history = quantease_refine(w, hessian, q, scale, None, group_size=w.shape[1], qmin=-INT8_QMAX,
                                      qmax=INT8_QMAX, damp=cfg.damp, iters=cfg.quantease_iters)
        return Int8Linear(q, scale, b), history
    q, scale, zero = gptq_int4(w, hessian, group_size=group_size, symmetric=cfg.symmetric, damp=cfg.damp,
                               act_order=cfg.act_order, **int4_grid(cfg))
    history = None
    if cfg.method == "quantease":  # from GPTQ's solution, on its grid
        q, history = quantease_refine(w, hessian, q, scale, zero, group_size=group_size, qmin=INT4_QMIN,
                                      qmax=INT4_QMAX, damp=cfg.damp, iters=cfg.quantease_iters)
    new = Int4Linear.from_codes(q, scale, zero, group_size, b)
    if cfg.act_order:  # static groups: the format of plain groups (the label records how the grid was made)
        new.actorder = "weight"
    return new, history


def _calibrated_sequential(model, targets, groups, cfg: QuantConfig, blocks, batch_size, tick: Progress,
                           report: dict) -> list[str]:
    """GPTQ / QuantEase layer by layer: collect each decoder layer's input Hessians on the outputs of the
    already quantized layers before it, quantize its linears, then feed its (quantized) outputs to the next.
    QuantEase's objectives go to ``report["quantease"]``."""
    notes = []
    decoder = model.get_decoder()
    layers = decoder.layers
    layer_names = {id(m): n for n, m in model.named_modules()}
    captured = layer0_inputs(model, batches(blocks, batch_size))
    done: set[str] = set()
    objectives: dict[str, dict] = {}

    def solve_swap(name: str, hessian: torch.Tensor) -> None:
        new, history = solve_layer(targets[name], hessian, cfg, groups[name])
        if history is not None:
            objectives[name] = {"init": float(f"{history[0]:.6g}"), "final": float(f"{min(history):.6g}"),
                                "sweeps": len(history) - 1}
        _swap(model, name, new)
        done.add(name)

    for i, layer in enumerate(layers):
        prefix = layer_names[id(layer)] + "."
        mine = {n: m for n, m in targets.items() if n.startswith(prefix)}
        if mine:
            with record_inputs(mine, hessian=True) as stats:
                for hidden, kwargs in captured:
                    run_layer(layer, hidden, kwargs)
            for name in mine:
                solve_swap(name, stats[name].hessian)
        captured = propagate(layer, captured)
        tick(f"{cfg.method} layers", i + 1, len(layers))
    head = model.get_output_embeddings()
    for name in [n for n in targets if n not in done]:
        if targets[name] is head and getattr(decoder, "norm", None) is not None:
            s = InputStats(want_hessian=True)
            for hidden, _ in captured:
                s.update(decoder.norm(hidden))
            solve_swap(name, s.hessian)
        else:  # a linear outside the decoder layers whose inputs we cannot replay
            _swap(model, name, quantize_linear(targets[name], cfg, group_size=groups[name]))
            notes.append(f"{name}: round-to-nearest (outside the decoder layers)")
    if objectives:
        ratios = sorted(o["final"] / o["init"] for o in objectives.values() if o["init"] > 0)
        init = "round-to-nearest" if cfg.scheme == "int8" else "gptq act-order" if cfg.act_order else "gptq"
        report["quantease"] = {
            "init": init, "max_sweeps": cfg.quantease_iters,
            "objective": "tr((W_hat - W) H (W_hat - W)^T), H damped as GPTQ's; init = before the sweeps",
            "final_over_init": {"median": round(ratios[len(ratios) // 2], 4), "min": round(ratios[0], 4),
                                "max": round(ratios[-1], 4)} if ratios else None,
            "layers": objectives}
    return notes


def quantize_dir(source: str | Path, out_dir: str | Path, cfg: QuantizeConfig, *, progress: Progress | None = None,
                 status: Callable[[str], None] | None = None, placement: Placement | None = None,
                 ranking: bool | None = None) -> dict:
    """Quantize the model in ``source`` (a directory or ``teacher``) and export it to ``out_dir`` in the
    compressed-tensors format (written atomically, report in ``quantize_report.json``); returns the report.
    Calibration, GPTQ and the quantization itself run where ``placement`` says (default:
    :func:`slimlm.placement.choose`); the export is written from host memory in
    ``cfg.dtype``, its config.json naming ``cfg.config_dtype(ranking)`` — ``ranking``: the model scores a
    ranking task (default: it is calibrated on one)."""
    from slimlm.calib import calibration_windows
    from slimlm.loading import load_model, load_tokenizer, resolve_model
    from slimlm.models import param_counts
    from slimlm.placement import choose
    from slimlm.quantize.export import export_quantized, is_compressed_tensors_dir
    from slimlm.tasks import RANKING_TASKS

    path = resolve_model(str(source))
    if is_compressed_tensors_dir(path):
        raise SlimlmError(f"{path} is already quantized (compressed-tensors); quantize the unquantized model instead")
    cfg.check()
    scheme = cfg.scheme_config()
    tokenizer = load_tokenizer(path)
    blocks = None
    if scheme.needs_calibration:
        if status:
            status(f"calibration data: {cfg.samples} x {cfg.seq_len} tokens of {cfg.calib}")
        blocks = calibration_windows(tokenizer, cfg.calib, cfg.samples, cfg.seq_len, data=cfg.calib_data)
    elif cfg.calib is not None and status:
        status("note: this scheme needs no calibration; calib is not used")
    where = placement or choose()
    model = load_model(path, device=where.device, dtype=where.dtype)
    before = param_counts(model)
    report = quantize_model(model, scheme, blocks, batch_size=cfg.batch_size, progress=progress)
    report.update(source=str(path), calibration=cfg.calib if scheme.needs_calibration else None,
                  params=param_counts(model), source_params=before, placement=where.to_dict())
    if status:
        status(f"writing {out_dir}")
    ranking = cfg.calib in RANKING_TASKS if ranking is None else ranking
    config_dtype = cfg.config_dtype(ranking)
    report |= {"storage_dtype": cfg.dtype, "config_dtype": config_dtype,
               "config_dtype_why": (f"run_dtype: {cfg.run_dtype}" if cfg.run_dtype != "auto" else
                                    "auto: a ranking model, run in float32 so its scores keep full resolution"
                                    if ranking else "auto: the storage dtype (a generation model)")}
    export_quantized(model, tokenizer, out_dir, dtype=getattr(torch, cfg.dtype), config_dtype=config_dtype,
                     report=report)
    report["weights_bytes"] = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
    report["source_weights_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return report
