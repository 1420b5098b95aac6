"""FSDP2 without a whole model on any rank: meta-device construction, per-rank shard loading, rank-local
checkpoints.

FSDP2 (``fully_shard``) splits every parameter along dim 0 the way ``torch.chunk`` does: of ``n`` rows,
rank ``r`` of ``W`` holds rows ``[r·c, min((r+1)·c, n))`` with ``c = ⌈n / W⌉`` (possibly none) —
:func:`row_range`. So

- a model is built on the meta device (shapes only, no memory), sharded, given empty storage for this
  rank's rows only (``to_empty``), and each rank copies its own rows out of the safetensors files
  (``get_slice`` reads only those bytes): no rank ever holds, or reads, a whole model (:func:`meta_model`,
  :func:`materialize`);
- a checkpoint is one safetensors file per rank holding that rank's rows of the weights and of the
  optimizer state, written by every rank at once, and read back by any number of ranks: each new rank
  reads the rows it now owns from whichever old files hold them (:class:`RowFiles`).

Non-persistent buffers (the rotary tables) are not in any file: their modules are rebuilt from the config
(``type(module)(config)``, how transformers' rotary modules are made) on the rank's device.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from slimlm import SlimlmError


def row_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[a, b)`` of an ``n``-row tensor that rank ``rank`` of ``world`` holds under FSDP2's dim-0 split."""
    c = -(-n // world)
    a = min(rank * c, n)
    return a, min(a + c, n)


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's tensor, first row, end row) of a parameter or state tensor: a DTensor sharded on dim 0
    over a 1-D mesh gives its local rows; a plain tensor is whole (``0, n``; a 0-dim tensor ``0, 0``)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t, 0, (t.shape[0] if t.dim() else 0)
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise SlimlmError(f"only dim-0 sharding over one mesh dimension is supported, got {t.placements}")
    local = t.to_local()
    a, b = row_range(t.shape[0], t.device_mesh.get_local_rank(), t.device_mesh.size())
    if local.shape[0] != b - a:  # FSDP2 changed its split: refuse rather than load the wrong rows
        raise SlimlmError(f"a shard of {local.shape[0]} rows where the dim-0 split gives {b - a}")
    return local, a, b


class RowFiles:
    """Read rows of named tensors from safetensors files that each hold some rows of them.

    ``parts`` maps each tensor name to ``[(file, first row, end row), ...]``; :meth:`rows` copies ``[a, b)``
    out of the files that overlap it (memory-mapped: only those rows are read). Files stay open (a handle
    per file) for the object's lifetime."""

    def __init__(self, parts: Mapping[str, list[tuple[Path, int, int]]]):
        self.parts = dict(parts)
        self._open: dict[Path, object] = {}

    @classmethod
    def whole_files(cls, files: list[Path]) -> RowFiles:
        """Every tensor of every file, each whole in one file (a model directory's weights)."""
        out = cls({})
        for f in files:  # the handle opened to read the names stays open for the reads
            h = out._handle(f)
            for name in h.keys():
                shape = h.get_slice(name).get_shape()
                out.parts[name] = [(f, 0, shape[0] if shape else 0)]
        return out

    @classmethod
    def rank_files(cls, files: list[Path], shapes: Mapping[str, tuple[int, ...]]) -> RowFiles:
        """Files written by ranks ``0..W-1`` in order (``W = len(files)``), each holding its
        :func:`row_range` of every tensor named in ``shapes`` (0-dim tensors: whole, in every file)."""
        world = len(files)
        return cls({name: [(f, *row_range(shape[0], r, world)) if shape else (f, 0, 0) for r, f in enumerate(files)]
                    for name, shape in shapes.items()})

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def _handle(self, f: Path):
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f]

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of tensor ``name`` (a 0-dim tensor whole, from its first file)."""
        pieces = []
        for f, r0, r1 in self.parts[name]:
            try:
                part = self._handle(f).get_slice(name)
                if not part.get_shape():
                    return self._handle(f).get_tensor(name)
                lo, hi = max(a, r0), min(b, r1)
                if lo < hi or (a == b and not pieces):  # an empty range: an empty tensor of the right shape
                    pieces.append(part[lo - r0:max(lo, hi) - r0] if lo < hi else part[0:0])
            except SafetensorError as e:
                raise SlimlmError(f"{f}: cannot read {name} ({e})") from None
        got = sum(p.shape[0] for p in pieces)
        if not pieces or got != b - a:
            raise SlimlmError(f"{name}: rows {a}:{b} are not all in the files ({got} of {b - a} found)")
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def model_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (those its ``model.safetensors.index.json`` names, if any)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise SlimlmError(f"{index}: unreadable index ({e})") from None
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def meta_model(path: str | Path, *, device=None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of a Hugging Face directory built on the meta device: its parameters have shapes and
    dtypes and no storage (``device`` picks the default dtype, as :func:`slimlm.loading.load_model` does).
    Shard it, then :func:`materialize` it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.loading import check_model_dir, resolve_model
    from slimlm.placement import default_dtype
    from slimlm.quantize.export import is_compressed_tensors_dir

    path = resolve_model(path)
    check_model_dir(path)
    if is_compressed_tensors_dir(path):
        raise SlimlmError(f"{path} is a quantized export: FSDP2 shards plain Hugging Face models (run a quantized "
                          "teacher with parallel=ddp, or use a teacher cache)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or default_dtype(device or "cpu"),
                                                 trust_remote_code=trust_remote_code)
    return model.eval()


def _non_persistent(module: torch.nn.Module) -> list[str]:
    return [n for n in module._buffers if n in module._non_persistent_buffers_set]


def _rebuild_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers (which no file holds) by building their modules anew."""
    for name, m in model.named_modules():
        names = _non_persistent(m)
        if not names:
            continue
        try:
            with torch.device(device):
                fresh = type(m)(m.config)
        except Exception as e:  # noqa: BLE001 - any failure means we cannot rebuild this module generically
            raise SlimlmError(f"{name or type(m).__name__}: cannot rebuild its buffers {names} from the config "
                              f"({type(e).__name__}: {e}); use parallel=ddp for this model") from None
        for n in names:
            m._buffers[n] = fresh._buffers[n].to(device)


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters (each shared one once, under its first name) and persistent buffers."""
    yield from model.named_parameters()
    for name, b in model.named_buffers():
        owner, _, short = name.rpartition(".")
        if short not in model.get_submodule(owner)._non_persistent_buffers_set:
            yield name, b


@torch.no_grad()
def materialize(root: torch.nn.Module, device: torch.device, sources: list[tuple[torch.nn.Module, Path]]) -> None:
    """Give the sharded meta-device ``root`` storage on ``device`` (this rank's rows only) and fill each
    ``(model, directory)`` of ``sources`` (submodules of ``root`` built by :func:`meta_model` from that
    directory) with its rows from the directory's files. Every parameter and persistent buffer must be
    in the files (a tied head is one parameter, read under the embedding's name)."""
    root.to_empty(device=device)
    for model, path in sources:
        _rebuild_buffers(model, device)
        copy_rows(dict(named_tensors(model)), RowFiles.whole_files(model_files(Path(path))), path)


@torch.no_grad()
def copy_rows(tensors: Mapping[str, torch.Tensor], files: RowFiles, where: str | Path) -> None:
    """Copy into each tensor (sharded or whole) the rows it holds of the same-named tensor in ``files``."""
    for name, t in tensors.items():
        if name not in files:
            raise SlimlmError(f"{where}: no tensor {name} in its safetensors files")
        local, a, b = local_part(t)
        local.copy_(files.rows(name, a, b))
