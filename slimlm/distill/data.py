"""Training sequences for every task, batching, and a resumable deterministic batch order.

A :class:`Seq` is ``input_ids`` with ``labels`` (-100 where no loss is taken) and ``prompt_len``
(the tokens before the first target; on-policy distillation samples a new response after them):

* ranking tasks: ``prefix + suffix + [label token]``; the only target is the label token (" Yes"/" No");
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
from slimlm.tasks import load_ranking_task
from slimlm.tasks.completion import IGNORE_INDEX, load_completion_file, tokenize_completion
from slimlm.tasks.ranking import label_token_ids, tokenize_ranking


@dataclass(frozen=True)
class Seq:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt_len: int


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
        pos, neg = label_token_ids(tokenizer)
        for t in tokenize_ranking(load_ranking_task(task.name, task.data, split, limit, seed), tokenizer):
            prompt = list(t.input_ids)
            ids, labels = _truncate_left(prompt + [pos if t.label else neg],
                                         [IGNORE_INDEX] * len(prompt) + [pos if t.label else neg], task.max_length)
            out.append(Seq(tuple(ids), tuple(labels), len(ids) - 1))
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


def collate(seqs: list[Seq], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``, ``attention_mask`` and ``labels`` ([B, T]; labels -100 on padding).

    ``labels`` are aligned with ``input_ids`` (not shifted): the loss at position t predicts token t
    from positions < t, so callers pair hidden[:, :-1] with labels[:, 1:].
    """
    from slimlm.runtime.scoring import right_pad

    ids, mask = right_pad([s.input_ids for s in seqs], pad_id, device)
    labels, _ = right_pad([s.labels for s in seqs], IGNORE_INDEX, device)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
