"""Reading user-supplied JSONL / Parquet rows with errors that name the file, line and field.

Files are read as a stream (JSONL line by line, Parquet a record batch at a time), so memory does not grow
with the file. A :class:`RowIndex` remembers where rows are (8 bytes a row) so that a task can validate
every row in one pass, keep nothing else, and read the rows it needs again when it needs them.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimlm import SlimlmError

PARQUET_BATCH = 4096  # rows decoded at a time when a Parquet file is streamed


class RowError(SlimlmError):
    """A malformed row: ``file:line: field 'x' ...``."""


def _kind(path: Path) -> str:
    if not path.is_file():
        raise SlimlmError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise SlimlmError(f"{path}: unsupported file type {suffix!r} (expected .jsonl or .parquet)")


def _json_row(path: Path, n: int, raw: bytes) -> dict[str, Any]:
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RowError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1})") from e
    except json.JSONDecodeError as e:
        raise RowError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(row, dict):
        raise RowError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    return row


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise SlimlmError(f"{path}: unreadable Parquet file ({e})") from e


def scan_records(path: str | Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield ``(line, position, row)`` from a ``.jsonl`` or ``.parquet`` file, streamed: ``line`` is 1-based
    (Parquet: the row number), ``position`` where :class:`RowIndex` finds the row again (JSONL: its byte
    offset; Parquet: its 0-based row number).

    Blank JSONL lines are skipped. Anything that is not a JSON object is a :class:`RowError`.
    """
    path = Path(path)
    if _kind(path) == "jsonl":
        with open(path, "rb") as f:
            offset = 0
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    yield n, offset, _json_row(path, n, raw)
                offset += len(raw)
        return
    pf, n = _parquet(path), 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
            for row in batch.to_pylist():
                n += 1
                yield n, n - 1, row
    except SlimlmError:
        raise
    except Exception as e:  # a corrupt page surfaces while reading, not at open
        raise SlimlmError(f"{path}: unreadable Parquet file after row {n} ({e})") from e


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` from a ``.jsonl`` or ``.parquet`` file (see :func:`scan_records`)."""
    for line, _, row in scan_records(path):
        yield line, row


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise SlimlmError(f"{path}: cannot read it any more ({e.strerror})") from e
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True, eq=False)
class RowIndex:
    """Where some rows of a file are, to read them again on demand: ``positions`` [n] int64 from
    :func:`scan_records` (JSONL byte offsets, Parquet row numbers) — 8 bytes a row — and, where a task
    needs them, ``lines`` [n] int64 (JSONL line numbers; Parquet's are ``positions + 1``).

    The file's size and modification time at indexing are kept: a file changed since is refused on read
    rather than read at stale offsets."""

    path: Path
    positions: np.ndarray
    lines: np.ndarray | None = None
    stamp: tuple[int, int] = (0, 0)

    @classmethod
    def build(cls, path: str | Path, positions: array, lines: array | None = None) -> RowIndex:
        """From the positions (and lines) collected while scanning ``path``, as ``array('q')`` (no copy)."""
        path = Path(path)
        return cls(path, np.frombuffer(positions, dtype=np.int64),
                   None if lines is None else np.frombuffer(lines, dtype=np.int64), _stamp(path))

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, idx: np.ndarray) -> RowIndex:
        """The rows ``idx`` (an index array into this one), in that order."""
        return RowIndex(self.path, self.positions[idx], None if self.lines is None else self.lines[idx], self.stamp)

    def line(self, i: int) -> int:
        """Row ``i``'s line (Parquet: row number), 0 where the index keeps none (the row was checked when indexed)."""
        if self.path.suffix.lower() == ".parquet":
            return int(self.positions[i]) + 1
        return int(self.lines[i]) if self.lines is not None else 0

    def read(self, idx: Sequence[int]) -> list[tuple[int, dict[str, Any]]]:
        """``(line, row)`` of rows ``idx`` (indices into this index), in that order; the file is opened once
        and read in file order (Parquet: a row group at a time, so reads cost a row group each)."""
        if _stamp(self.path) != self.stamp:
            raise SlimlmError(f"{self.path}: the file changed after it was read; start again to read it afresh")
        idx = [int(i) for i in idx]
        wanted = sorted(set(idx), key=lambda i: self.positions[i])
        got: dict[int, dict[str, Any]] = {}
        if _kind(self.path) == "jsonl":
            with open(self.path, "rb") as f:
                for i in wanted:
                    f.seek(int(self.positions[i]))
                    got[i] = _json_row(self.path, self.line(i), f.readline())
        else:
            pf = _parquet(self.path)
            ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            groups: dict[int, list[int]] = {}
            for i in wanted:
                groups.setdefault(int(np.searchsorted(ends, self.positions[i], side="right")), []).append(i)
            for g, members in groups.items():
                first = int(ends[g - 1]) if g else 0
                table = pf.read_row_group(g).take([int(self.positions[i]) - first for i in members])
                got.update(zip(members, table.to_pylist(), strict=True))
        return [(self.line(i), got[i]) for i in idx]


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
    return holdout_positions(n, split).tolist()


def holdout_positions(n: int, split: str) -> np.ndarray:
    """:func:`holdout_indices` as an int64 array. The permutation is drawn over uint32 (the same one
    ``Generator.permutation`` gives, at half the memory) where ``n`` allows."""
    check_split(split, allow_all=True)
    if split == "all":
        return np.arange(n, dtype=np.int64)
    k = max(1, round(HOLDOUT * n)) if n >= 3 else 0
    perm = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
    np.random.default_rng(0).shuffle(perm)
    part = {"test": perm[:k], "val": perm[k:2 * k], "train": perm[2 * k:]}[split]
    return np.sort(part).astype(np.int64)
