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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimlm import SlimlmError
from slimlm.config import TaskConfig
from slimlm.distill.losses import count_targets
from slimlm.runtime.packing import PAD_SEGMENT, attention_inputs, pack
from slimlm.tasks import load_ranking_task
from slimlm.tasks.completion import IGNORE_INDEX, load_completion_file, tokenize_completion
from slimlm.tasks.ranking import TokenizedRanking, label_token_ids, tokenize_ranking


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


def build_sequences(task: TaskConfig, tokenizer, split: str, limit: int | None, seed: int = 0) -> list[Seq]:
    """Tokenized training sequences of ``split`` (at most ``limit``; deterministic given ``seed``)."""
    out: list[Seq] = []
    if task.name in ("movielens-ranking", "ranking"):
        examples = load_ranking_task(task.name, task.data, split, limit, seed, task.candidates_per_prefix)
        out = ranking_sequences(tokenize_ranking(examples, tokenizer), label_token_ids(tokenizer),
                                task.candidates_per_prefix, task.max_length)
    elif task.name == "completion":
        if task.data is None:
            raise SlimlmError("task 'completion' needs task.data (a .jsonl or .parquet file)")
        examples = load_completion_file(task.data, split)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(examples))[:limit] if limit else range(len(examples))
        for i in order:
            enc = tokenize_completion(examples[int(i)], tokenizer)
            ids, labels = _truncate_left(enc["input_ids"], enc["labels"], task.max_length)
            out.append(Seq(tuple(ids), tuple(labels), _prompt_len(labels)))
    elif task.name == "arithmetic":  # built-in chain sums: fixed examples per split, trained like completion
        from slimlm.tasks.arithmetic import arithmetic_examples

        for ex in arithmetic_examples(split, limit, task.data):
            enc = tokenize_completion(ex, tokenizer)
            ids, labels = _truncate_left(enc["input_ids"], enc["labels"], task.max_length)
            out.append(Seq(tuple(ids), tuple(labels), _prompt_len(labels)))
    elif task.name == "text":
        from slimlm.tasks.text import read_texts, split_blocks

        for block in split_blocks(tokenizer, read_texts(task.data), task.max_length, split, limit):
            out.append(Seq(tuple(block), (IGNORE_INDEX, *block[1:]), 1))
    else:
        raise SlimlmError(f"unknown task {task.name!r}")
    if not out:
        source = Path(task.data).name if task.data else task.name
        raise SlimlmError(f"{source}: no training sequences for split '{split}'")
    return out


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
