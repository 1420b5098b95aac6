"""The offline teacher signal: top-k log-probs (+ tail mass) per target token, precomputed once.

Training with ``teacher_signal: cached`` reads these files and never loads the teacher, so a large
teacher runs once over the data instead of once per epoch, and the student trains alone.

Layout of a cache directory::

    index.json            k, temperature, vocab, counts, shard list, fingerprint of the data + settings
    shard-00000.safetensors
        ids       [T, k] int32    the teacher's top-k token ids per target token
        logprobs  [T, k] float16  their log-probabilities (at the cache's temperature)
        tail      [T]    float32  log of the remaining probability mass, log(1 - sum of the top-k)
        offsets   [S + 1] int64   target rows of sequence i are offsets[i]:offsets[i + 1]

Bytes per target token: k·(4 + 2) + 4 (+ 8 per sequence) — 388 for k = 64.

Memory is bounded by design on both sides: writing never forms a [tokens, V] tensor (the LM head is
applied a vocabulary chunk at a time, :func:`chunked_top_k`), and reading keeps at most a few shards
open (memory-mapped; only the requested rows are copied out).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimlm import SlimlmError
from slimlm.distill.data import FileSequences, Seq, collate, model_kwargs
from slimlm.io import atomic_dir, shared_atomic_dir

FORMAT_VERSION = 1
FINGERPRINT_SCHEME = 2  # 1 (slimlm <= 0.1): sha256 of JSON-dumped sequences, without the settings


def fingerprint(seqs: Sequence[Seq], *, k: int, temperature: float, vocab: int) -> str:
    """sha256 over the cache's settings and the sequences. A cache only serves the exact data and settings
    it was made for.

    The sequences of a user file (:class:`~slimlm.distill.data.FileSequences`) are keyed by
    :meth:`~slimlm.distill.data.FileSequences.data_key`: the file's bytes, the settings that make its
    sequences and the tokenizer, so checking a cache costs a read of the file, not a tokenization of every
    row. Other sequences (built-in tasks, lists) are hashed themselves, streamed: per sequence its length
    and the bytes of ``input_ids`` and ``labels`` as little-endian int64 arrays (memory: one sequence).
    """
    h = hashlib.sha256(json.dumps({"scheme": FINGERPRINT_SCHEME, "k": int(k), "temperature": float(temperature),
                                   "vocab": int(vocab)}, sort_keys=True).encode())
    if isinstance(seqs, FileSequences):
        h.update(b"file:" + seqs.data_key().encode())
        return h.hexdigest()
    for s in seqs:
        h.update(np.int64(len(s.input_ids)).astype("<i8").tobytes())
        h.update(np.asarray(s.input_ids, dtype="<i8").tobytes())
        h.update(np.asarray(s.labels, dtype="<i8").tobytes())
        if s.segments is not None:  # a packed row: its candidates' boundaries are part of the data
            h.update(b"packed" + np.asarray(s.segments, dtype="<i8").tobytes())
    return h.hexdigest()


@torch.no_grad()
def teacher_hidden(teacher, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's final hidden states ``[B, T, H]`` for a batch from :func:`~slimlm.distill.data.collate`,
    packed multi-item rows included (their block mask and positions, as the student sees them in training).
    """
    decoder = teacher.get_decoder()
    return decoder(**model_kwargs(decoder, batch), use_cache=False).last_hidden_state


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """``log Σ_j exp z[:, j]`` [N] for ``z`` [N, C] with a finite entry in every row; overwrites ``z``."""
    m = z.amax(dim=-1, keepdim=True)
    return m.squeeze(-1) + z.sub_(m).exp_().sum(dim=-1).log()


@torch.no_grad()
def chunked_top_k(h: torch.Tensor, weight: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                  temperature: float = 1.0, vocab_size: int | None = None,
                  chunk_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs and tail mass of ``softmax((h Wᵀ + b) / τ)``, one vocabulary chunk at a time.

    ``h`` [N, H], ``weight`` [≥V, H], ``bias`` [≥V] or None; the first ``vocab_size`` (V) rows of the
    head are the vocabulary. With ``z = (h Wᵀ + b) / τ`` and ``lse = log Σ_v exp z_v``, returns

        logprobs [N, k] float32   the k largest ``z_v − lse`` per row, descending
        ids      [N, k] int64     their columns v
        tail     [N]    float32   ``log Σ_{v ∉ top-k} exp(z_v − lse) = log(1 − Σ exp(logprobs))``

    For each chunk ``C`` of ≤ ``chunk_size`` columns the logits ``h W_Cᵀ`` are formed in the input dtype
    (as the full-vocab product would be) and taken to float32 before ``/ τ``; the chunk's top-k is merged
    with the running top-k, and the mass of every column that is not (or no longer) in the running
    top-k is added to a running ``rest = log Σ exp z`` with logaddexp. At the end
    ``lse = logaddexp(logsumexp(top), rest)`` and ``tail = rest − lse``: the tail is a sum of the
    left-out terms, never ``1 − Σ top`` (which cancels catastrophically when the top-k holds nearly all
    the mass), and ``tail = −inf`` when k = V. The chunks share one ``[N, chunk_size]`` float32 tile
    (plus one in the input dtype when that is not float32), worked on in place, and the merge needs
    ``[N, 2k]``; nothing has a V-sized dimension.
    """
    vocab = vocab_size or weight.shape[0]
    if not 1 <= k <= vocab:
        raise SlimlmError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    if chunk_size < 1:
        raise SlimlmError(f"the vocabulary chunk must be at least 1 column, got {chunk_size}")
    n, ninf, width = h.shape[0], float("-inf"), min(chunk_size, vocab)
    # One logits tile for every chunk, worked on in place: a fresh [N, C] tensor per chunk (and per
    # temporary) would leave the CPU allocator's heap fragmented, so the process would still grow with V.
    tile = h.new_empty(n * width)
    tile32 = tile if h.dtype == torch.float32 else torch.empty(n * width, dtype=torch.float32, device=h.device)
    top = torch.empty(n, 0, dtype=torch.float32, device=h.device)  # running top-k of z, unsorted
    ids = torch.empty(n, 0, dtype=torch.long, device=h.device)
    rest = torch.full((n,), ninf, dtype=torch.float32, device=h.device)  # log Σ exp z over the evicted columns
    for c0 in range(0, vocab, chunk_size):
        c1 = min(c0 + chunk_size, vocab)
        logits = torch.matmul(h, weight[c0:c1].T, out=tile[:n * (c1 - c0)].view(n, c1 - c0))
        if bias is not None:
            logits.add_(bias[c0:c1])
        z = logits if tile32 is tile else tile32[:n * (c1 - c0)].view(n, c1 - c0).copy_(logits)
        z.div_(temperature)
        zt, zi = z.topk(min(k, c1 - c0), dim=-1, sorted=False)
        if zt.shape[1] < c1 - c0:  # the chunk's other columns: their mass goes to the rest
            rest = torch.logaddexp(rest, _logsumexp_(z.scatter_(-1, zi, ninf)))
        top, ids = torch.cat([top, zt], dim=-1), torch.cat([ids, zi + c0], dim=-1)
        if top.shape[1] > k:  # columns pushed out of the running top-k: their mass goes to the rest
            kept, pos = top.topk(k, dim=-1, sorted=False)
            rest = torch.logaddexp(rest, torch.logsumexp(top.scatter_(-1, pos, ninf), dim=-1))
            top, ids = kept, ids.gather(-1, pos)
    top, order = top.sort(dim=-1, descending=True)
    ids = ids.gather(-1, order)
    lse = torch.logaddexp(torch.logsumexp(top, dim=-1), rest)
    return top - lse[:, None], ids, rest - lse


@torch.no_grad()
def write_teacher_cache(teacher, seqs: Sequence[Seq], out_dir: str | Path, *, k: int = 64, temperature: float = 1.0,
                        vocab_size: int | None = None, batch_size: int = 8, pad_id: int = 0,
                        shard_sequences: int = 4096, vocab_chunk: int = 8192, row_block: int = 4096,
                        progress: Callable[[int], None] | None = None, rank: int = 0, world: int = 1,
                        sync: Callable[[], None] | None = None) -> dict:
    """Run ``teacher`` over ``seqs`` and store its top-k log-probs at every target token (atomic); return
    the index.

    Per batch: :func:`teacher_hidden`, the hidden states at the target rows (position t predicts
    label t + 1), then :func:`chunked_top_k` over blocks of ≤ ``row_block`` rows and ``vocab_chunk``
    columns, so the largest temporary is ``[row_block, vocab_chunk]`` float32 whatever the vocabulary.

    Distributed (``world`` > 1, every rank calls this with ``sync`` a barrier over them, on a filesystem
    they share): rank r writes shards r, r + W, r + 2W, ... of the same layout, then rank 0 writes the
    index. The ranks do equal shares, so nobody waits long at the barriers (a cache built by rank 0
    alone would hold every other rank at a barrier for the whole build)."""
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    vocab = vocab_size or head.weight.shape[0]
    if not 1 <= k <= vocab:
        raise SlimlmError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    if row_block < 1 or shard_sequences < 1 or batch_size < 1:
        raise SlimlmError("row_block, shard_sequences and batch_size must be at least 1")
    bias = getattr(head, "bias", None)
    out_dir = Path(out_dir)
    starts = range(0, len(seqs), shard_sequences)
    with atomic_dir(out_dir) if world == 1 else shared_atomic_dir(out_dir, rank == 0, sync) as tmp:
        for i, s0 in enumerate(starts):
            if i % world != rank:
                continue
            part = seqs[s0:s0 + shard_sequences]
            ids_l, lp_l, tail_l, offsets = [], [], [], [0]
            for b0 in range(0, len(part), batch_size):
                batch = part[b0:b0 + batch_size]
                enc = collate(batch, pad_id, device)
                hidden = teacher_hidden(teacher, enc)
                labels = enc["labels"][:, 1:]
                h = hidden[:, :-1][labels != -100]  # target rows, sequence by sequence, in order
                del hidden
                for r0 in range(0, h.shape[0], row_block):
                    lp, idx, tail = chunked_top_k(h[r0:r0 + row_block], head.weight, k, bias=bias,
                                                  temperature=temperature, vocab_size=vocab, chunk_size=vocab_chunk)
                    ids_l.append(idx.to(torch.int32).cpu())
                    lp_l.append(lp.to(torch.float16).cpu())
                    tail_l.append(tail.cpu())
                for n in (labels != -100).sum(1).tolist():
                    offsets.append(offsets[-1] + n)
                if progress:
                    progress(len(batch))
            empty = (torch.empty(0, k, dtype=torch.int32), torch.empty(0, k, dtype=torch.float16), torch.empty(0))
            save_file({"ids": torch.cat(ids_l or [empty[0]]), "logprobs": torch.cat(lp_l or [empty[1]]),
                       "tail": torch.cat(tail_l or [empty[2]]),
                       "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(tmp / _shard_name(i)))
        if world > 1:
            sync()  # every shard is written
        if rank == 0:
            shards = []
            for i, s0 in enumerate(starts):  # each shard's target count is the last of its offsets
                with safe_open(str(tmp / _shard_name(i)), framework="pt") as f:
                    targets = int(f.get_slice("offsets")[-1:][0])
                shards.append({"file": _shard_name(i), "first_sequence": s0,
                               "sequences": min(shard_sequences, len(seqs) - s0), "targets": targets})
            index = {"format": FORMAT_VERSION, "k": k, "temperature": temperature, "vocab": vocab,
                     "sequences": len(seqs), "targets": sum(sh["targets"] for sh in shards), "shards": shards,
                     "fingerprint_scheme": FINGERPRINT_SCHEME,
                     "fingerprint": fingerprint(seqs, k=k, temperature=temperature, vocab=vocab),
                     "bytes_per_target_token": k * (4 + 2) + 4}
            (tmp / "index.json").write_text(json.dumps(index, indent=2))
    return json.loads((out_dir / "index.json").read_text())


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class TeacherCache:
    """Read a cache directory; :meth:`rows` returns the teacher rows of given sequences, concatenated.

    At most ``max_open_shards`` shard files are open at a time (least recently used closed first). An
    open shard is a memory map plus its ``offsets``; :meth:`rows` copies out only the requested rows, so
    memory stays bounded by the batch, not by the cache's size, even when batches sample sequences from
    every shard.
    """

    def __init__(self, path: str | Path, *, max_open_shards: int = 4):
        self.path = Path(path)
        if max_open_shards < 1:
            raise SlimlmError(f"max_open_shards must be at least 1, got {max_open_shards}")
        try:
            self.index = json.loads((self.path / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SlimlmError(f"{self.path}: not a teacher cache ({e})") from e
        if self.index.get("format") != FORMAT_VERSION:
            raise SlimlmError(f"{self.path}/index.json: unsupported format {self.index.get('format')!r}")
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, tuple[object, torch.Tensor]] = OrderedDict()

    def check(self, seqs: Sequence[Seq], temperature: float) -> None:
        """Refuse a cache made for other data, other settings or another temperature (before training)."""
        if abs(self.index["temperature"] - temperature) > 1e-12:
            raise SlimlmError(f"{self.path}: cache temperature {self.index['temperature']} != loss temperature "
                              f"{temperature}")
        ix = self.index
        if ix["sequences"] != len(seqs) or ix.get("fingerprint_scheme") != FINGERPRINT_SCHEME or \
                ix["fingerprint"] != fingerprint(seqs, k=ix["k"], temperature=ix["temperature"], vocab=ix["vocab"]):
            raise SlimlmError(f"{self.path}: this teacher cache was made for other training data or by an older "
                              "slimlm: rebuild it (`slimlm teacher-cache` with this config, or delete the directory)")

    @property
    def open_shards(self) -> list[int]:
        """Indices of the shards open now, least recently used first."""
        return list(self._open)

    def _shard(self, i: int) -> tuple[object, torch.Tensor]:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        f = safe_open(str(self.path / self.index["shards"][i]["file"]), framework="pt")
        self._open[i] = (f, f.get_tensor("offsets"))
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)  # dropping the handle unmaps the file
        return self._open[i]

    def rows(self, sequence_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [T, k], logprobs [T, k], tail [T]) for the sequences, in the given order."""
        n = self.index["sequences"]
        per = self.index["shards"][0]["sequences"] if self.index["shards"] else 1
        parts = []
        for sid in sequence_ids:
            if not 0 <= sid < n:
                raise SlimlmError(f"{self.path}: sequence {sid} is not in this cache of {n} sequences")
            f, offsets = self._shard(sid // per)
            local = sid % per
            a, b = int(offsets[local]), int(offsets[local + 1])
            parts.append(tuple(f.get_slice(name)[a:b] for name in ("ids", "logprobs", "tail")))
        if not parts:
            k = self.index["k"]
            return torch.empty(0, k, dtype=torch.int32), torch.empty(0, k, dtype=torch.float16), torch.empty(0)
        return tuple(torch.cat([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]


def load_teacher(cfg, device, load=None, autocast: torch.dtype | None = None) -> torch.nn.Module:
    """The frozen teacher of a distill config on ``device`` (``load``: :func:`slimlm.loading.load_model`, or
    :func:`slimlm.distill.sharded.meta_model` under FSDP2), in ``teacher_dtype``; by default in ``autocast``'s
    dtype when training autocasts (no per-step casts of its weights), else the device's dtype."""
    from slimlm.loading import load_model
    from slimlm.placement import DTYPES

    t_dtype = DTYPES[cfg.teacher_dtype] if cfg.teacher_dtype else autocast
    teacher = (load or load_model)(cfg.teacher, device=device, dtype=t_dtype, trust_remote_code=cfg.trust_remote_code)
    return teacher.requires_grad_(False)


def teacher_precision(path, teacher: torch.nn.Module) -> str:
    """How the frozen teacher runs, for the stage's metrics: its float dtype, and the quantization scheme
    when ``path`` is a quantized export (e.g. an INT8 W8A8 teacher on a CPU, where bf16 is slow)."""
    from slimlm.io import read_json_or_none
    from slimlm.loading import resolve_model
    from slimlm.quantize.export import is_compressed_tensors_dir

    dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    path = resolve_model(path)
    if not is_compressed_tensors_dir(path):
        return dtype
    scheme = (read_json_or_none(path / "slimlm_quantize.json") or {}).get("scheme", "compressed-tensors")
    return f"{scheme} (slimlm's quantized runtime; {dtype} elsewhere)"


def build_teacher_cache(cfg, progress: Callable[[int], None] | None = None, dist=None, device=None) -> dict:
    """Write the top-k teacher cache for a distill config's training sequences into ``cfg.teacher_cache``.

    Distributed, every rank runs a whole teacher on its device over its share of the shards
    (:func:`write_teacher_cache`): the trainer passes its ``dist`` and ``device``; launched under torchrun
    without them (``torchrun ... -m slimlm teacher-cache``), this joins the process group itself."""
    import os

    from slimlm.distill.data import build_sequences
    from slimlm.distill.dist import barrier, init_distributed, shutdown
    from slimlm.distill.losses import check_vocab
    from slimlm.loading import load_tokenizer
    from slimlm.placement import choose

    if cfg.teacher is None or cfg.teacher_cache is None:
        raise SlimlmError("building a teacher cache needs `teacher` and `teacher_cache`")
    own = dist is None
    if own:  # a device this machine lacks, or more local ranks than GPUs, fails here, before any work
        where = choose(cfg.device, world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        dist, device = init_distributed("ddp", str(where.device))
    try:
        tokenizer = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
        seqs = build_sequences(cfg.task, tokenizer, cfg.task.split, cfg.task.limit, cfg.seed)
        teacher = load_teacher(cfg, device)
        vocab = check_vocab(teacher.get_output_embeddings().weight.shape[0], None, len(tokenizer))
        return write_teacher_cache(teacher, seqs, cfg.teacher_cache, k=min(cfg.cache_top_k, vocab),
                                   temperature=cfg.loss.temperature, vocab_size=vocab, batch_size=cfg.batch_size,
                                   pad_id=tokenizer.pad_token_id, progress=progress if dist.main else None,
                                   rank=dist.rank, world=dist.world, sync=lambda: barrier(dist))
    finally:
        if own:
            shutdown(dist)
