"""Training sequences for every task, batching, and a resumable deterministic batch order.

A :class:`Seq` is ``input_ids`` with ``labels`` (-100 where no loss is taken) and ``prompt_len``
(the tokens before the first target; on-policy distillation samples a new response after them):

* ranking tasks: ``prefix + suffix + [label token]``; the only target is the label token (" Yes"/" No").
  With ``candidates_per_prefix`` k > 1, up to k candidates that share a prefix are packed into one
  sequence ``prefix + (suffix_1 + [label_1]) + ... + (suffix_k + [label_k])`` with per-candidate position
  ids and segment ids (:mod:`slimlm.runtime.packing`): the prefix runs once, each candidate sees the
  prefix and itself only, and the targets are still one label token per candidate;
* completion (and the built-in arithmetic task): chat-template rendering, targets on the response only;
* text: token blocks, every token after the first a target.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimlm import SlimlmError
from slimlm.config import TaskConfig
from slimlm.distill.losses import count_targets
from slimlm.runtime.packing import PAD_SEGMENT, attention_inputs, pack
from slimlm.tasks import load_ranking_task
from slimlm.tasks.completion import IGNORE_INDEX, index_completion_file, read_completions, tokenize_completion
from slimlm.tasks.ranking import TokenizedRanking, index_ranking_file, label_token_ids, tokenize_ranking


@dataclass(frozen=True)
class Seq:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_len: int
    # packed multi-item rows only (None otherwise): position ids and segment ids (0 = the shared prefix,
    # j = candidate j), see slimlm.runtime.packing
    positions: tuple[int, ...] | None = None
    segments: tuple[int, ...] | None = None

    def unpacked(self) -> list[Seq]:
        """A packed row as one ordinary sequence per candidate (``prefix + candidate``), for the code paths
        that need one prompt per row (on-policy sampling); an unpacked row as itself."""
        if self.segments is None:
            return [self]
        p = self.segments.index(1) if 1 in self.segments else len(self.segments)
        out = []
        for j in range(1, max(self.segments) + 1):
            idx = [i for i, g in enumerate(self.segments) if g == j]
            ids = self.input_ids[:p] + tuple(self.input_ids[i] for i in idx)
            labels = (IGNORE_INDEX,) * p + tuple(self.labels[i] for i in idx)
            out.append(Seq(ids, labels, _prompt_len(list(labels))))
        return out


def _truncate_left(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the last ``max_length`` tokens: the targets sit at the end, the prompt's start is cut."""
    if len(ids) <= max_length:
        return ids, labels
    return ids[-max_length:], labels[-max_length:]


def _prompt_len(labels: list[int]) -> int:
    return next((i for i, v in enumerate(labels) if v != IGNORE_INDEX), len(labels))


def _completion_seq(example, tokenizer, max_length: int) -> Seq:
    enc = tokenize_completion(example, tokenizer)
    ids, labels = _truncate_left(enc["input_ids"], enc["labels"], max_length)
    return Seq(tuple(ids), tuple(labels), _prompt_len(labels))


def build_sequences(task: TaskConfig, tokenizer, split: str, limit: int | None, seed: int = 0) -> Sequence[Seq]:
    """Tokenized training sequences of ``split`` (at most ``limit``; deterministic given ``seed``).

    A user file (``completion``, ``ranking``) gives a :class:`FileSequences`: its rows are checked now, in
    one streamed pass, but read and tokenized only when drawn, so memory does not grow with the file. The
    built-in tasks (MovieLens, arithmetic, text) are small and give a list."""
    out: list[Seq] = []
    if task.name in ("ranking", "completion") and task.data is None:
        raise SlimlmError(f"task '{task.name}' needs task.data (a .jsonl or .parquet file)")
    if task.name == "ranking":
        out = ranking_file_sequences(task, tokenizer, split, limit, seed)
    elif task.name == "movielens-ranking":
        examples = load_ranking_task(task.name, task.data, split, limit, seed, task.candidates_per_prefix)
        out = ranking_sequences(tokenize_ranking(examples, tokenizer), label_token_ids(tokenizer),
                                task.candidates_per_prefix, task.max_length)
    elif task.name == "completion":
        out = completion_file_sequences(task, tokenizer, split, limit, seed)
    elif task.name == "arithmetic":  # built-in chain sums: fixed examples per split, trained like completion
        from slimlm.tasks.arithmetic import arithmetic_examples

        out = [_completion_seq(ex, tokenizer, task.max_length) for ex in arithmetic_examples(split, limit, task.data)]
    elif task.name == "text":
        from slimlm.tasks.text import read_texts, split_blocks

        for block in split_blocks(tokenizer, read_texts(task.data), task.max_length, split, limit):
            out.append(Seq(tuple(block), (IGNORE_INDEX, *block[1:]), 1))
    else:
        raise SlimlmError(f"unknown task {task.name!r}")
    if not len(out):
        source = Path(task.data).name if task.data else task.name
        raise SlimlmError(f"{source}: no training sequences for split '{split}'")
    return out


SEQUENCE_FORMAT = 1  # how rows become sequences; bump it when that changes (file-keyed teacher caches then rebuild)


class FileSequences(Sequence[Seq]):
    """The training sequences of a user file, made when drawn.

    Only where the examples are is kept (:class:`slimlm.tasks.files.RowIndex`: 8 bytes a row, 16 for
    ranking); ``self[i]``, slices and :meth:`take` read the rows of the requested sequences from the file
    and tokenize them, so a batch costs its own rows. Length, order and values equal the list the same task
    would give read whole (tested). ``read(idx)`` returns the examples at positions ``idx`` of the example
    order; sequence ``j`` is made by ``make`` from the examples ``packs[j]:packs[j + 1]`` (ranking packs
    of one group) or example ``j`` alone (``packs`` None)."""

    ITER_CHUNK = 256  # sequences read together while iterating

    def __init__(self, read: Callable[[list[int]], list], make: Callable[[list], Seq], n_examples: int,
                 packs: np.ndarray | None, *, path: Path, settings: dict, tokenizer):
        self._read, self._make, self._packs = read, make, packs
        self._n = len(packs) - 1 if packs is not None else n_examples
        self.path, self.settings, self._tokenizer = path, settings, tokenizer

    def __len__(self) -> int:
        return self._n

    def take(self, idx: Sequence[int]) -> list[Seq]:
        """The sequences ``idx`` (repeats allowed), their rows read from the file in one pass."""
        spans = []
        for j in idx:
            j = int(j)
            if not 0 <= j < self._n:
                raise IndexError(f"sequence {j} of {self._n}")
            spans.append(range(int(self._packs[j]), int(self._packs[j + 1])) if self._packs is not None
                         else range(j, j + 1))
        examples = self._read([i for span in spans for i in span])
        out, at = [], 0
        for span in spans:
            out.append(self._make(examples[at:at + len(span)]))
            at += len(span)
        return out

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(*i.indices(self._n)))
        return self.take([i + self._n if i < 0 else i])[0]

    def __iter__(self):
        for c in range(0, self._n, self.ITER_CHUNK):
            yield from self.take(range(c, min(c + self.ITER_CHUNK, self._n)))

    def data_key(self) -> str:
        """sha256 over the file's bytes, the settings that pick and cut its sequences, the tokenizer and
        :data:`SEQUENCE_FORMAT`: equal keys give equal sequences, without making them (a pass over the
        file, not over every token)."""
        from slimlm.io import sha256_file

        return hashlib.sha256(json.dumps({"format": SEQUENCE_FORMAT, "file": sha256_file(self.path),
                                          "settings": self.settings,
                                          "tokenizer": tokenizer_digest(self._tokenizer)},
                                         sort_keys=True).encode()).hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its class, its full spec (a fast tokenizer's JSON, else
    its vocabulary), special tokens and chat template; not its path."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, spec, tokenizer.special_tokens_map,
                                      getattr(tokenizer, "chat_template", None)], sort_keys=True,
                                     default=str).encode()).hexdigest()


def take(seqs: Sequence[Seq], idx: Sequence[int]) -> list[Seq]:
    """``[seqs[i] for i in idx]``; a :class:`FileSequences` reads the batch's rows in one pass."""
    return seqs.take(idx) if isinstance(seqs, FileSequences) else [seqs[i] for i in idx]


def _settings(task: TaskConfig, split: str, limit: int | None, seed: int) -> dict:
    return {"task": task.name, "split": split, "limit": limit, "seed": seed, "max_length": task.max_length,
            "candidates_per_prefix": task.candidates_per_prefix if task.name == "ranking" else 1}


def completion_file_sequences(task: TaskConfig, tokenizer, split: str, limit: int | None, seed: int) -> FileSequences:
    """A completion file's sequences of ``split``: all in file order, or ``limit`` of them in a seeded order."""
    index = index_completion_file(task.data, split)
    # the order the sequences would have in a list (a copy: the slice alone would keep the whole permutation)
    order = np.random.default_rng(seed).permutation(len(index))[:limit].copy() if limit else None

    def read(idx: list[int]) -> list:
        return read_completions(index, [int(order[i]) for i in idx] if order is not None else idx)

    return FileSequences(read, lambda exs: _completion_seq(exs[0], tokenizer, task.max_length),
                         len(order) if order is not None else len(index), None, path=Path(task.data),
                         settings=_settings(task, split, limit, seed), tokenizer=tokenizer)


def ranking_file_sequences(task: TaskConfig, tokenizer, split: str, limit: int | None, seed: int) -> FileSequences:
    """A ranking file's sequences of ``split``: candidates of one group packed ``candidates_per_prefix`` at a
    time, as :func:`ranking_sequences` packs them (whole groups, seeded, with ``limit``)."""
    k = task.candidates_per_prefix
    rows = index_ranking_file(task.data, split, limit, seed, k)
    label_ids = label_token_ids(tokenizer)

    def make(examples: list) -> Seq:
        (seq,) = ranking_sequences(tokenize_ranking(examples, tokenizer), label_ids, k, task.max_length)
        return seq

    return FileSequences(rows.examples, make, len(rows), rows.packs, path=Path(task.data),
                         settings=_settings(task, split, limit, seed), tokenizer=tokenizer)


def ranking_sequences(examples: list[TokenizedRanking], label_ids: tuple[int, int], k: int,
                      max_length: int) -> list[Seq]:
    """Ranking examples as training sequences: consecutive examples of one group (same prefix) packed k
    at a time; a group of one (or k = 1) is the plain ``prefix + suffix + [label]`` sequence.

    ``max_length`` bounds every candidate's own sequence (prefix + suffix + label), as for unpacked rows:
    the prefix is cut from the left to fit the longest candidate of the pack."""
    pos, neg = label_ids
    out: list[Seq] = []
    i = 0
    while i < len(examples):
        j = i + 1
        while j < len(examples) and j - i < k and examples[j].group == examples[i].group:
            j += 1
        chunk = examples[i:j]
        i = j
        cands = [t.suffix_ids + ((pos if t.label else neg),) for t in chunk]
        prefix = list(chunk[0].prefix_ids)
        if len(chunk) == 1:
            prompt = prefix + list(chunk[0].suffix_ids)
            ids, labels = _truncate_left(prompt + [cands[0][-1]], [IGNORE_INDEX] * len(prompt) + [cands[0][-1]],
                                         max_length)
            out.append(Seq(tuple(ids), tuple(labels), len(ids) - 1))
            continue
        prefix = prefix[max(0, len(prefix) + max(len(c) for c in cands) - max_length):]
        ids, positions, segments = pack(prefix, cands)
        labels = [IGNORE_INDEX] * len(ids)
        end = len(prefix)
        for c in cands:
            end += len(c)
            labels[end - 1] = c[-1]  # each candidate's label token is its only target
        out.append(Seq(tuple(ids), tuple(labels), len(prefix), tuple(positions), tuple(segments)))
    return out


def collate(seqs: list[Seq], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``, ``attention_mask`` and ``labels`` ([B, T]; labels -100 on padding),
    plus ``position_ids`` and ``segments`` ([B, T]) when any row is packed (unpacked rows get 0..T−1 and
    segment 0; padding gets segment −1). Pass the batch to a model through :func:`model_kwargs`.

    ``labels`` are aligned with ``input_ids`` (not shifted): the loss at position t predicts token t
    from positions < t, so callers pair hidden[:, :-1] with labels[:, 1:].
    """
    from slimlm.runtime.scoring import right_pad

    ids, mask = right_pad([s.input_ids for s in seqs], pad_id, device)
    labels, _ = right_pad([s.labels for s in seqs], IGNORE_INDEX, device)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(s.segments is not None for s in seqs):
        batch["position_ids"], _ = right_pad([s.positions or tuple(range(len(s.input_ids))) for s in seqs], 0, device)
        batch["segments"], _ = right_pad([s.segments or (0,) * len(s.input_ids) for s in seqs], PAD_SEGMENT, device)
    return batch


def model_kwargs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input_ids`` and the attention inputs of a collated batch, in the form ``model`` takes them."""
    return {"input_ids": batch["input_ids"],
            **attention_inputs(model, batch["attention_mask"], batch.get("position_ids"), batch.get("segments"))}


def window_targets(batches: list[dict[str, torch.Tensor]]) -> int:
    """Target tokens of a gradient-accumulation window (shifted labels, as the loss sees them)."""
    return count_targets([b["labels"][:, 1:] for b in batches])


class BatchOrder:
    """Epoch-wise seeded permutations of ``n`` items cut into batches; the position is resumable.

    ``rank``/``world`` shard each global batch of ``batch_size * world`` items across processes, so
    every process sees distinct examples and the union equals the single-process order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, cursor: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor, self.rank, self.world = epoch, cursor, rank, world
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self) -> list[int]:
        """The next batch for this rank (epochs roll over; a short tail is completed from the next epoch)."""
        span = self.batch_size * self.world
        picked: list[int] = []
        while len(picked) < span:
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(span - len(picked), self.n - self.cursor)
            picked.extend(int(i) for i in self._perm[self.cursor:self.cursor + take])
            self.cursor += take
        return picked[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}
