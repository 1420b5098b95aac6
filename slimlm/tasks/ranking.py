"""Predictive ranking examples: a shared prefix, a candidate suffix, a binary label.

The score of a candidate is P(pos) / (P(pos) + P(neg)) for the label tokens (default " Yes" / " No")
at the answer position, the last token of ``prefix + suffix``. Candidates with the same ``group``
share the prefix string exactly, so a server can run it once and reuse its KV cache.

User files (JSONL or Parquet), one row per candidate::

    {"prefix": "User profile ...\\n", "suffix": "Candidate: ... Answer:", "label": 1,
     "group": "user-17", "id": "row-1", "split": "test"}

``group``, ``id`` and ``split`` are optional (group defaults to the prefix itself, split to "test").
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimlm import SlimlmError
from slimlm.tasks.files import RowError, RowIndex, field, scan_records

DEFAULT_LABELS = (" Yes", " No")


@dataclass(frozen=True)
class RankingExample:
    id: str
    group: str  # candidates of one group share ``prefix`` exactly
    prefix: str
    suffix: str
    label: int  # 1 = positive label token (" Yes")

    @property
    def prompt(self) -> str:
        return self.prefix + self.suffix


@dataclass(frozen=True)
class TokenizedRanking:
    id: str
    group: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    label: int

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prefix_ids + self.suffix_ids


def label_token_ids(tokenizer, labels: tuple[str, str] = DEFAULT_LABELS) -> tuple[int, int]:
    """Token ids of the (positive, negative) label strings; each must be exactly one token."""
    ids = []
    for text in labels:
        enc = tokenizer(text, add_special_tokens=False).input_ids
        if len(enc) != 1:
            raise SlimlmError(f"label {text!r} is {len(enc)} tokens for this tokenizer; "
                              "ranking labels must be single tokens of the model's tokenizer")
        ids.append(enc[0])
    if ids[0] == ids[1]:
        raise SlimlmError(f"labels {labels!r} map to the same token")
    return ids[0], ids[1]


def tokenize_ranking(examples: list[RankingExample], tokenizer) -> list[TokenizedRanking]:
    """Tokenize prefix (with the tokenizer's special tokens) and suffix (without) separately.

    Each distinct prefix is tokenized once. The task builders put the boundary where byte-level BPE
    does not merge across it (the prefix ends in a newline, the suffix starts with a letter), so
    ``prefix_ids + suffix_ids`` equals the tokenization of the whole prompt (tested).
    """
    prefix_cache: dict[str, tuple[int, ...]] = {}
    uniq_prefixes = list(dict.fromkeys(ex.prefix for ex in examples))
    if uniq_prefixes:
        for p, ids in zip(uniq_prefixes, tokenizer(uniq_prefixes).input_ids, strict=True):
            prefix_cache[p] = tuple(ids)
    suffix_ids = tokenizer([ex.suffix for ex in examples], add_special_tokens=False).input_ids if examples else []
    return [TokenizedRanking(ex.id, ex.group, prefix_cache[ex.prefix], tuple(s), ex.label)
            for ex, s in zip(examples, suffix_ids, strict=True)]


def ranking_example(path: str | Path, line: int, row: dict, split: str | None = None) -> RankingExample | None:
    """The candidate of one row, checked (a RowError names ``file:line: field``); None when ``split`` is
    given and the row belongs to another."""
    prefix = field(path, line, row, "prefix", str)
    suffix = field(path, line, row, "suffix", str, check=bool, expect="a non-empty string")
    label = field(path, line, row, "label", (int, bool), check=lambda v: v in (0, 1), expect="0 or 1")
    row_split = field(path, line, row, "split", str, default="test")
    if split is not None and row_split != split:
        return None
    return RankingExample(
        id=str(field(path, line, row, "id", (str, int), default=f"{Path(path).name}:{line}")),
        group=str(field(path, line, row, "group", (str, int), default=prefix)),
        prefix=prefix, suffix=suffix, label=int(label),
    )


@dataclass(frozen=True, eq=False)
class RankingRows:
    """The candidates of one split of a ranking file, located but not read: ``index`` (file order),
    ``order`` (indices into it in example order; None = file order) and ``packs`` ([S + 1] starts into that
    order of the training sequences, each ≤ k consecutive candidates of one group; None = one candidate each)."""

    index: RowIndex
    order: np.ndarray | None
    packs: np.ndarray | None

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else len(self.index)

    def examples(self, idx) -> list[RankingExample]:
        """The candidates at ``idx`` (positions in example order), read from the file now."""
        rows = [int(self.order[i]) for i in idx] if self.order is not None else idx
        return [ranking_example(self.index.path, line, row) for line, row in self.index.read(rows)]


def whole_groups(group_of: np.ndarray, names: list[str], limit: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """At most ``limit`` items made of whole groups, the groups in a seeded random order (the order of the
    group names sorted, then shuffled), each group's items in their own order: item i is in group
    ``names[group_of[i]]``. Groups that would overflow ``limit`` are skipped. Returns the chosen items'
    indices and the sizes of the chosen groups, in that order."""
    import random

    sizes = np.bincount(group_of, minlength=len(names))
    by_group = np.argsort(group_of, kind="stable")  # each group's items together, in their order
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    shuffled = sorted(range(len(names)), key=names.__getitem__)
    random.Random(seed).shuffle(shuffled)
    parts, chosen, total = [], [], 0
    for g in shuffled:
        if total + sizes[g] <= limit:
            parts.append(by_group[first[g]:first[g] + sizes[g]])
            chosen.append(int(sizes[g]))
            total += int(sizes[g])
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), chosen


def index_ranking_file(path: str | Path, split: str | None = None, limit: int | None = None, seed: int = 0,
                       k: int = 1) -> RankingRows:
    """Where the candidates of ``split`` are, from one streamed pass that checks every row (errors name
    ``file:line: field``) and keeps its position and line (16 bytes a candidate, and 8 a pack when ``k`` > 1;
    with ``limit``, also 4 a candidate and one entry per distinct group while the groups are drawn). The order and packing equal :func:`load_ranking_file`, then
    :func:`whole_groups` (``limit``, ``seed``), then
    :func:`slimlm.distill.data.ranking_sequences` (``k``)."""
    positions, lines = array("q"), array("q")
    starts, run, prev = array("q"), 0, None  # packs of consecutive candidates of one group, file order
    names: dict[str, int] = {}  # group -> id, only to subsample whole groups
    gids = array("i")
    for line, pos, row in scan_records(path):
        ex = ranking_example(path, line, row, split)
        if ex is None:
            continue
        if k > 1 and (not positions or ex.group != prev or run == k):
            starts.append(len(positions))
            run = 0
        run, prev = run + 1, ex.group
        if limit is not None:
            gids.append(names.setdefault(ex.group, len(names)))
        positions.append(pos)
        lines.append(line)
    if not positions:
        raise RowError(f"{path}: no rows" + (f" with split '{split}'" if split else ""))
    index = RowIndex.build(path, positions, lines)
    n = len(index)
    if limit is None or limit >= n:
        starts.append(n)
        return RankingRows(index, None, np.frombuffer(starts, dtype=np.int64) if k > 1 else None)
    order, sizes = whole_groups(np.frombuffer(gids, dtype=np.int32), list(names), limit, seed)
    packs, total = [0], 0
    for size in sizes:
        packs.extend(total + min(j + k, size) for j in range(0, size, k))
        total += size
    return RankingRows(index, order, np.array(packs, dtype=np.int64) if k > 1 else None)


def load_ranking_file(path: str | Path, split: str | None = None) -> list[RankingExample]:
    """Read a user ranking file (schema in the module docstring); keep rows of ``split`` if given."""
    rows = index_ranking_file(path, split)
    return rows.examples(range(len(rows)))
