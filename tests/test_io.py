"""Atomic writes: an interrupted write leaves the previous file/directory whole and no temp files behind;
a directory replacement killed at any instant is recovered to the newest complete version."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import Killed, Killer, hidden

from slimlm.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    recover_dir,
    remove_temporaries,
    sha256_file,
)


def _tree(d):
    """relative path -> bytes, for every file under ``d``."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_atomic_dir_replaces_whole_directory(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        assert tmp != final and tmp.parent == final.parent
        assert not (tmp / "old.txt").exists()  # a fresh directory, not a copy of the old one
        (tmp / "new.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.bin").write_bytes(b"\x00\x01")
    assert _tree(final) == {"new.txt": b"new", "sub/x.bin": b"\x00\x01"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old directories left


def test_atomic_dir_keeps_old_directory_when_body_raises(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("a")
    (final / "b.json").write_text("{}")
    before = _tree(final)
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("boom")
    assert _tree(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_creates_nothing_when_body_raises(tmp_path):
    final = tmp_path / "deep" / "out"
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("a")
        raise KeyboardInterrupt  # BaseException too: Ctrl-C must not leave a half directory
    assert not final.exists()
    assert list(final.parent.iterdir()) == []


def test_atomic_write_variants_write_complete_files(tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB, several write chunks
    atomic_write_bytes(tmp_path / "new" / "a.bin", data)  # parent is created
    atomic_write_text(tmp_path / "b.txt", "héllo\nwörld")
    obj = {"x": [1, 2.5, None], "y": "z"}
    atomic_write_json(tmp_path / "c.json", obj)
    assert (tmp_path / "new" / "a.bin").read_bytes() == data
    assert (tmp_path / "b.txt").read_bytes() == "héllo\nwörld".encode()
    assert json.loads((tmp_path / "c.json").read_text()) == obj
    assert (tmp_path / "c.json").read_text().endswith("\n")
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert names == ["b.txt", "c.json", "new", "new/a.bin"]  # no .tmp files


def test_atomic_write_overwrites_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old contents that are longer than the new ones")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"  # replaced, not overwritten in place (no stale tail)

    # The rename onto a non-empty directory fails: the directory stays, the temp file goes.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "keep").write_text("k")
    with pytest.raises(OSError):
        atomic_write_bytes(blocker, b"data")
    assert (blocker / "keep").read_text() == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "blocker"]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    data = b"slimlm" * 1000 + b"tail"
    p = tmp_path / "f"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == want
    assert sha256_file(p, chunk=7) == want  # chunk boundaries must not matter


def _write(final, version: str) -> None:
    with atomic_dir(final) as tmp:
        (tmp / "v.txt").write_text(version)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text(version * 3)


@pytest.mark.parametrize("replacing", [False, True])
def test_atomic_dir_killed_at_any_instant_recovers_the_newest_complete_version(tmp_path, monkeypatch, replacing):
    """A kill before/after each rename and removal of the replacement: ``recover_dir`` then gives the old
    version if the kill came before the new one was marked complete, the new one from then on, and
    nothing else beside it."""
    killer = Killer(monkeypatch, tmp_path)
    _write(tmp_path / "plain" / "out", "old")
    killer.arm(None)
    _write(tmp_path / "plain" / "out", "new")  # unarmed: the events of one replacement
    names = [name for name, _ in killer.events]
    assert names == ["replace"] * 3 + ["rmtree"]  # tmp -> .new, out -> .old, .new -> out; remove .old
    events = len(names) - (0 if replacing else 1)  # a first write has no out -> .old rename
    new, old = {"v.txt": b"new", "sub/x.txt": b"newnewnew"}, {"v.txt": b"old", "sub/x.txt": b"oldoldold"}
    for at in range(events):
        for when in ("before", "after"):
            root = tmp_path / f"{at}-{when}"
            if replacing:
                _write(root / "out", "old")
            killer.arm(at, when)
            with pytest.raises(Killed):
                _write(root / "out", "new")
            killer.arm(None)
            left = hidden(root)
            done = recover_dir(root / "out")
            committed = at > 0 or when == "after"  # the first rename marks the new version complete
            if committed or replacing:
                assert _tree(root / "out") == (new if committed else old), (at, when)
                assert sorted(p.name for p in root.iterdir()) == ["out"], (at, when)
            else:
                assert list(root.iterdir()) == [], (at, when)
            said = " ".join(done)
            assert all(name in said for name in left) and bool(done) == bool(left), (at, when, left, done)
            assert recover_dir(root / "out") == []  # nothing left to do


def test_recover_dir_restores_the_aside_and_removes_only_slimlms_leftovers(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    out.rename(tmp_path / ".out.old.4242")  # killed between the two renames of an earlier slimlm
    (tmp_path / ".out.k3j_9x0a.tmp").mkdir()  # a killed body's temp directory
    (tmp_path / ".out.k3j_9x0a.tmp" / "half.bin").write_bytes(b"\x00")
    (tmp_path / ".out.qq8dj2ma.tmp").write_bytes(b"")  # a killed atomic_write_bytes of a file `out`
    keep = [".out.notes", ".other.k3j_9x0a.tmp", ".out.k3j_9x0a.tmp.bak", "out.txt", ".out.old.x"]
    for name in keep:
        (tmp_path / name).write_text("not slimlm's")
    done = recover_dir(out)
    assert _tree(out) == {"v.txt": b"old", "sub/x.txt": b"oldoldold"}
    assert done[0] == f"{out}: restored from .out.old.4242" and len(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *keep])
    assert remove_temporaries(tmp_path / "out.txt") == [] and recover_dir(tmp_path / "none" / "x") == []


def test_atomic_dir_leaves_every_file_readable_by_the_group(tmp_path):
    """A model directory is shared like any other: safetensors' own writer creates its files 0600, and a
    directory made 0700 inside the write must not lock the group out either."""
    import stat

    import torch
    from safetensors.torch import save_file

    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "private").mkdir(mode=0o700)
        (tmp / "private" / "notes.txt").write_text("x")
        (tmp / "private" / "notes.txt").chmod(0o600)
    for path in [final, *final.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        need = 0o055 if path.is_dir() else 0o044
        assert mode & need == need, f"{path.relative_to(tmp_path)} is {oct(mode)}"
