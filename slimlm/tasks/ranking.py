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

from dataclasses import dataclass
from pathlib import Path

from slimlm import SlimlmError
from slimlm.tasks.files import RowError, field, iter_records

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


def load_ranking_file(path: str | Path, split: str | None = None) -> list[RankingExample]:
    """Read a user ranking file (schema in the module docstring); keep rows of ``split`` if given."""
    out = []
    for line, row in iter_records(path):
        prefix = field(path, line, row, "prefix", str)
        suffix = field(path, line, row, "suffix", str, check=bool, expect="a non-empty string")
        label = field(path, line, row, "label", (int, bool), check=lambda v: v in (0, 1), expect="0 or 1")
        row_split = field(path, line, row, "split", str, default="test")
        if split is not None and row_split != split:
            continue
        out.append(RankingExample(
            id=str(field(path, line, row, "id", (str, int), default=f"{Path(path).name}:{line}")),
            group=str(field(path, line, row, "group", (str, int), default=prefix)),
            prefix=prefix, suffix=suffix, label=int(label),
        ))
    if not out:
        raise RowError(f"{path}: no rows" + (f" with split '{split}'" if split else ""))
    return out
