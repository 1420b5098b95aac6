"""The built-in generative task ``arithmetic``: chain sums from reasoning-gym's offline generator.

Each example is ``a ± b ± ...`` (reasoning-gym ``chain_sum``: every term has the same number of digits,
operators ``+``/``-``) as a one-turn chat::

    user:      Compute 55 + 98 - 93. Answer with the number only.
    assistant: 60

so training reuses the completion path (chat template, loss on the response only) and quality is
exact match of the greedy answer (:func:`slimlm.evaluate.evaluate_generation`, rule ``number``).

Splits are deterministic and disjoint:

* each split draws from its own fixed seed stream (:data:`SPLIT_SEEDS`), so its examples do not depend
  on the run's seed, on ``limit`` (the first ``limit`` examples of a split are always the same) or on
  other splits;
* a question belongs to exactly one split, chosen by a stable hash of its expression
  (:func:`split_of`: 80 % train, 10 % val, 10 % test of the question space), and a split keeps only
  its own questions, without repeats. Two splits can therefore never share a question, whatever the
  seeds, sizes or difficulty.

Difficulty: ``data`` (``task.data`` in a config, ``--data`` on the CLI) is ``None`` for the default
(2-4 terms of 1-2 digits) or a spec such as ``"terms=2-3,digits=1"`` or ``"terms=3,digits=1-3"``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

from slimlm import SlimlmError
from slimlm.tasks.completion import CompletionExample
from slimlm.tasks.files import SPLITS, check_split  # noqa: F401  (SPLITS: the splits this task has)

SPLIT_SEEDS = {"train": 11_000_000, "val": 22_000_000, "test": 33_000_000}
DEFAULT_SIZES = {"train": 4096, "val": 256, "test": 500}
# percent of the question space per split, by hash bucket (out of 100)
SPLIT_BUCKETS = {"test": range(0, 10), "val": range(10, 20), "train": range(20, 100)}
INSTRUCTION = "Answer with the number only."
MAX_DRAWS = 200  # draws per wanted example before a split is declared too small for its difficulty


@dataclass(frozen=True)
class ArithmeticSpec:
    """Difficulty of the chain sums: a term count and a digit count are drawn uniformly per question."""

    min_terms: int = 2
    max_terms: int = 4
    min_digits: int = 1
    max_digits: int = 2

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms <= 20:
            raise SlimlmError(f"arithmetic: terms must satisfy 2 <= min <= max <= 20, got "
                              f"{self.min_terms}-{self.max_terms}")
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise SlimlmError(f"arithmetic: digits must satisfy 1 <= min <= max <= 9, got "
                              f"{self.min_digits}-{self.max_digits}")

    def __str__(self) -> str:
        return f"terms={self.min_terms}-{self.max_terms},digits={self.min_digits}-{self.max_digits}"


def parse_spec(data: str | None) -> ArithmeticSpec:
    """``None`` -> the default spec; ``"terms=A[-B],digits=C[-D]"`` (either key optional) -> that spec."""
    if data is None or str(data).strip() in ("", "chain_sum"):
        return ArithmeticSpec()
    fields: dict[str, int] = {}
    for part in str(data).split(","):
        m = re.fullmatch(r"\s*(terms|digits)\s*=\s*(\d+)(?:\s*-\s*(\d+))?\s*", part)
        if not m:
            raise SlimlmError(f"arithmetic data {str(data)!r}: expected a spec like 'terms=2-4,digits=1-2' "
                              f"(bad part {part.strip()!r})")
        lo, hi = int(m[2]), int(m[3] or m[2])
        fields[f"min_{m[1]}"], fields[f"max_{m[1]}"] = lo, hi
    return ArithmeticSpec(**fields)


def split_of(expression: str) -> str:
    """The split a question belongs to: sha256 of the expression, bucketed (stable across runs/machines)."""
    bucket = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big") % 100
    return next(s for s, r in SPLIT_BUCKETS.items() if bucket in r)


def prompt_text(expression: str) -> str:
    return f"Compute {expression}. {INSTRUCTION}"


@lru_cache(maxsize=16)
def _problems(split: str, n: int, spec: ArithmeticSpec) -> tuple[tuple[str, str], ...]:
    """The first ``n`` distinct (expression, answer) pairs of ``split``'s seed stream that hash to it."""
    from reasoning_gym.arithmetic.chain_sum import ChainSumConfig, ChainSumDataset

    budget = MAX_DRAWS * n
    gen = ChainSumDataset(ChainSumConfig(min_terms=spec.min_terms, max_terms=spec.max_terms,
                                         min_digits=spec.min_digits, max_digits=spec.max_digits,
                                         allow_negation=False, seed=SPLIT_SEEDS[split], size=budget))
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for idx in range(budget):  # item idx is drawn from random.Random(seed + idx): no shared state
        item = gen[idx]
        expr = item["metadata"]["expression"]
        if expr in seen or split_of(expr) != split:
            continue
        seen.add(expr)
        out.append((expr, item["answer"]))
        if len(out) == n:
            return tuple(out)
    raise SlimlmError(f"arithmetic: split '{split}' has fewer than {n} distinct questions at difficulty "
                      f"{spec}; ask for fewer examples or a harder spec")


def arithmetic_examples(split: str, limit: int | None = None, data: str | None = None) -> list[CompletionExample]:
    """The first ``limit`` examples of ``split`` (default :data:`DEFAULT_SIZES`) as one-turn chats."""
    check_split(split, source="arithmetic")
    if limit is not None and limit < 1:
        raise SlimlmError(f"arithmetic: limit must be >= 1, got {limit}")
    spec = parse_spec(data)
    n = limit if limit is not None else DEFAULT_SIZES[split]
    return [CompletionExample(({"role": "user", "content": prompt_text(expr)},
                               {"role": "assistant", "content": answer}))
            for expr, answer in _problems(split, n, spec)]
