"""The offline teacher signal: top-k log-probs (+ tail mass) per target token, precomputed once.

Training with ``teacher_signal: cached`` reads these files and never loads the teacher, so a large
teacher runs once over the data instead of once per epoch, and the student trains alone.

Layout of a cache directory::

    index.json            k, temperature, vocab, counts, shard list, fingerprint of the sequences
    shard-00000.safetensors
        ids       [T, k] int32    the teacher's top-k token ids per target token
        logprobs  [T, k] float16  their log-probabilities (at the cache's temperature)
        tail      [T]    float32  log of the remaining probability mass, log(1 - sum of the top-k)
        offsets   [S + 1] int64   target rows of sequence i are offsets[i]:offsets[i + 1]

Bytes per target token: k·(4 + 2) + 4 (+ 8 per sequence) — 388 for k = 64.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimlm import SlimlmError
from slimlm.distill.data import Seq, collate
from slimlm.io import atomic_dir

FORMAT_VERSION = 1


def fingerprint(seqs: list[Seq]) -> str:
    """sha256 over the sequences' tokens and labels: a cache only serves the exact data it was made for."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(json.dumps([s.input_ids, s.labels]).encode())
    return h.hexdigest()


@torch.no_grad()
def write_teacher_cache(teacher, seqs: list[Seq], out_dir: str | Path, *, k: int = 64, temperature: float = 1.0,
                        vocab_size: int | None = None, batch_size: int = 8, pad_id: int = 0,
                        shard_sequences: int = 4096, progress: Callable[[int], None] | None = None) -> dict:
    """Run ``teacher`` over ``seqs`` and store its top-k log-probs at every target token (atomic)."""
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    vocab = vocab_size or head.weight.shape[0]
    if not 1 <= k <= vocab:
        raise SlimlmError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    base = teacher.get_decoder()
    shards, total = [], 0
    with atomic_dir(Path(out_dir)) as tmp:
        for s0 in range(0, len(seqs), shard_sequences):
            part = seqs[s0:s0 + shard_sequences]
            ids_l, lp_l, tail_l, offsets = [], [], [], [0]
            for b0 in range(0, len(part), batch_size):
                batch = part[b0:b0 + batch_size]
                enc = collate(batch, pad_id, device)
                hidden = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              use_cache=False).last_hidden_state
                labels = enc["labels"][:, 1:]
                h = hidden[:, :-1][labels != -100]  # target rows, sequence by sequence, in order
                logits = h @ head.weight[:vocab].T
                if getattr(head, "bias", None) is not None:
                    logits = logits + head.bias[:vocab]
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                top, idx = logp.topk(k, dim=-1)
                rest = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1) if k < vocab \
                    else torch.full((logp.shape[0],), float("-inf"), device=device)
                ids_l.append(idx.to(torch.int32).cpu())
                lp_l.append(top.to(torch.float16).cpu())
                tail_l.append(rest.float().cpu())
                for n in (labels != -100).sum(1).tolist():
                    offsets.append(offsets[-1] + n)
                if progress:
                    progress(len(batch))
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"ids": torch.cat(ids_l), "logprobs": torch.cat(lp_l), "tail": torch.cat(tail_l),
                       "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(tmp / name))
            shards.append({"file": name, "first_sequence": s0, "sequences": len(part), "targets": offsets[-1]})
            total += offsets[-1]
        index = {"format": FORMAT_VERSION, "k": k, "temperature": temperature, "vocab": vocab,
                 "sequences": len(seqs), "targets": total, "shards": shards, "fingerprint": fingerprint(seqs),
                 "bytes_per_target_token": k * (4 + 2) + 4}
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
    return index


class TeacherCache:
    """Read a cache directory; :meth:`rows` returns the teacher rows of given sequences, concatenated."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SlimlmError(f"{self.path}: not a teacher cache ({e})") from e
        if self.index.get("format") != FORMAT_VERSION:
            raise SlimlmError(f"{self.path}/index.json: unsupported format {self.index.get('format')!r}")
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def check(self, seqs: list[Seq], temperature: float) -> None:
        """Refuse a cache made for other data or another temperature (a clear error before training)."""
        if self.index["sequences"] != len(seqs) or self.index["fingerprint"] != fingerprint(seqs):
            raise SlimlmError(f"{self.path}: this teacher cache was made for other training data "
                              "(rebuild it with `slimlm teacher-cache` for this config)")
        if abs(self.index["temperature"] - temperature) > 1e-12:
            raise SlimlmError(f"{self.path}: cache temperature {self.index['temperature']} != loss temperature "
                              f"{temperature}")

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._shards:
            with safe_open(str(self.path / self.index["shards"][i]["file"]), framework="pt") as f:
                self._shards[i] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        return self._shards[i]

    def rows(self, sequence_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [T, k], logprobs [T, k], tail [T]) for the sequences, in the given order."""
        per = self.index["shards"][0]["sequences"] if self.index["shards"] else 1
        parts = []
        for sid in sequence_ids:
            shard = self._shard(sid // per)
            local = sid - (sid // per) * per
            a, b = int(shard["offsets"][local]), int(shard["offsets"][local + 1])
            parts.append((shard["ids"][a:b], shard["logprobs"][a:b], shard["tail"][a:b]))
        return tuple(torch.cat([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]
