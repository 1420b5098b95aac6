"""Atomic file and directory writes, and hashing.

Every output slimlm writes (checkpoints, converted models, results) goes through these helpers, so
an interrupted run never leaves a half-written file or directory where a finished one is expected,
and a killed directory replacement is finished (or undone) by :func:`recover_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _ready(final: Path) -> Path:
    """Where a finished replacement of ``final`` waits to be renamed in (its name says: complete)."""
    return final.parent / f".{final.name}.new"


def _aside(final: Path) -> Path:
    """Where the replaced ``final`` waits to be removed."""
    return final.parent / f".{final.name}.old"


def _temporaries(final: Path) -> list[Path]:
    """Temp files / directories that :func:`atomic_dir` and :func:`atomic_write_bytes` make for ``final``
    (``.NAME.XXXXXXXX.tmp``, tempfile's eight random characters); a killed write leaves one behind."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.([a-z0-9_]{{8}}|shared)\.tmp")
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if pattern.fullmatch(p.name))


def remove_temporaries(final: Path) -> list[str]:
    """Remove what killed atomic writes of the file or directory ``final`` left beside it (only
    slimlm's own temp names for ``final``); one line per removed path. Only while nothing writes ``final``."""
    final = Path(final)
    done = []
    for path in _temporaries(final):
        _remove(path)
        done.append(f"{final.parent}: removed {path.name}")
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _commit(final: Path) -> None:
    """Rename the finished replacement in: ``final`` -> aside, ready -> ``final``, remove the aside.

    At every instant ``final`` or the ready directory is complete, so :func:`recover_dir` can finish."""
    ready, aside = _ready(final), _aside(final)
    if final.exists():
        if aside.exists():  # a removal of an earlier aside was cut short
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(ready, final)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(final: Path) -> list[str]:
    """Bring ``final`` to the newest complete version a killed :func:`atomic_dir` left, and remove the rest.

    * a ready directory (``.NAME.new``: its writer finished) is renamed in, ``final`` or not;
    * else, if ``final`` is missing, the aside copy (``.NAME.old``, or ``.NAME.old.PID`` as earlier
      versions named it) is renamed back;
    * asides and temp directories/files of ``final`` (``.NAME.XXXXXXXX.tmp``: writes cut short) are removed.

    Returns one line per thing done (empty when there was nothing to do). Run it before reading ``final``
    in a process that may follow a killed one; :func:`atomic_dir` runs it before each write."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    done, ready, aside = [], _ready(final), _aside(final)
    legacy = f".{final.name}.old."
    asides = [aside, *sorted(p for p in final.parent.iterdir()
                             if p.name.startswith(legacy) and p.name[len(legacy):].isdigit())]
    if ready.is_dir():
        stale = aside.exists()  # _commit removes it
        _commit(final)
        done.append(f"{final}: renamed in {ready.name}, the complete replacement a killed save left")
        done += [f"{final.parent}: removed {aside.name}"] if stale else []
    elif not final.exists():
        for old in asides:
            if old.is_dir():
                os.replace(old, final)
                done.append(f"{final}: restored from {old.name}")
                break
    for path in asides:
        if path.exists():
            _remove(path)
            done.append(f"{final.parent}: removed {path.name}")
    return done + remove_temporaries(final)


def readable_by_all(root: Path) -> None:
    """Make every file and directory under ``root`` readable (directories also listable) by the group and
    others, as a model directory is: some writers (safetensors' ``save_file``, 0.8 at least) create files 0600."""
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o7777
        wanted = mode | (0o555 if path.is_dir() else 0o444)
        if wanted != mode:
            os.chmod(path, wanted)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``final``; on success it replaces ``final`` whole.

    On any exception the temp directory is removed and ``final`` (if it existed) is untouched. The
    replacement is three renames, ``tmp`` -> ``.NAME.new`` (complete), ``final`` -> ``.NAME.old``,
    ``.NAME.new`` -> ``final``, then the aside is removed: a process killed at any instant leaves a
    complete ``final`` or ``.NAME.new``, and :func:`recover_dir` (run here first) takes the newer.
    One writer per ``final`` at a time.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        readable_by_all(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, _ready(final))
    _commit(final)


@contextlib.contextmanager
def shared_atomic_dir(final: Path, main: bool, sync: Callable[[], None]) -> Iterator[Path]:
    """:func:`atomic_dir` written by several processes together (the ranks of a distributed run, on a
    filesystem they share): every process calls it with ``sync`` a barrier over all of them; ``main`` (one
    process) prepares the temp directory ``.NAME.shared.tmp`` and, once every process left the block,
    renames it in as :func:`atomic_dir` does. A failure in any process leaves ``final`` as it was (the temp
    directory is removed by the next write or :func:`recover_dir`); the others then wait at ``sync``
    until the launcher stops them."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.shared.tmp"
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(final)  # also removes a shared temp directory a killed write left
        tmp.mkdir(mode=0o755)
        os.chmod(tmp, 0o755)
    sync()
    yield tmp
    sync()  # every process's files are in
    if main:
        readable_by_all(tmp)
        os.replace(tmp, _ready(final))
        _commit(final)
    sync()  # nobody reads ``final`` before it is complete


def read_json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a report of a partial run)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL log; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
