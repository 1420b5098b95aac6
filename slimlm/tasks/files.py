"""Reading user-supplied JSONL / Parquet rows with errors that name the file, line and field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimlm import SlimlmError


class RowError(SlimlmError):
    """A malformed row: ``file:line: field 'x' ...``."""


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` from a ``.jsonl`` or ``.parquet`` file (1-based; Parquet: row number).

    Blank JSONL lines are skipped. Anything that is not a JSON object is a :class:`RowError`.
    """
    path = Path(path)
    if not path.is_file():
        raise SlimlmError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RowError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(row, dict):
                    raise RowError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise SlimlmError(f"{path}: unreadable Parquet file ({e})") from e
        for n, row in enumerate(table.to_pylist(), 1):
            yield n, row
    else:
        raise SlimlmError(f"{path}: unsupported file type {suffix!r} (expected .jsonl or .parquet)")


def field(path: str | Path, line: int, row: dict[str, Any], name: str, kind: type | tuple[type, ...],
          default: Any = ..., check=None, expect: str = "") -> Any:
    """Fetch ``row[name]``, checking its type (and ``check(value)``), or raise a one-line RowError."""
    if name not in row or row[name] is None:
        if default is not ...:
            return default
        raise RowError(f"{path}:{line}: missing field '{name}'")
    value = row[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        ok = False
    else:
        ok = isinstance(value, kind)
    if not ok or (check is not None and not check(value)):
        want = expect or (kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind))
        raise RowError(f"{path}:{line}: field '{name}' must be {want}, got {value!r:.60}")
    return value


SPLITS = ("train", "val", "test")
HOLDOUT = 0.05  # the share of rows each of val and test get in a source without its own splits


def check_split(split: str, *, allow_all: bool = False, source: str = "") -> None:
    """One of :data:`SPLITS` (or ``all`` where a whole source may be read), else a one-line SlimlmError."""
    if split not in SPLITS and not (allow_all and split == "all"):
        also = " (or 'all')" if allow_all else ""
        raise SlimlmError(f"{source + ': ' if source else ''}unknown split {split!r}; expected one of "
                          f"{', '.join(SPLITS)}{also}")


def holdout_indices(n: int, split: str) -> list[int]:
    """Ascending indices of the rows (or text blocks) of ``split`` among ``n`` in a source without its own
    splits: a fixed permutation (seed 0, whatever the training seed) gives 5% to ``test``, the next 5% to
    ``val`` (at least one row each once there are 3 or more) and the rest to ``train``, so a model is
    never validated or tested on rows it trained on. ``all`` is every row (a corpus used only to evaluate)."""
    import numpy as np

    check_split(split, allow_all=True)
    if split == "all":
        return list(range(n))
    k = max(1, round(HOLDOUT * n)) if n >= 3 else 0
    perm = np.random.default_rng(0).permutation(n)
    part = {"test": perm[:k], "val": perm[k:2 * k], "train": perm[2 * k:]}[split]
    return sorted(int(i) for i in part)
