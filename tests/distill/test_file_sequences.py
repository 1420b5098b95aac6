"""Streamed user files: the lazy sequences of a completion or ranking file equal the ones the whole file read
into memory gives (JSONL and Parquet, every split, limits, packing), row errors still name file:line:field
and come before any model is loaded, a file changed after indexing is refused, and the teacher-cache key
of a file does not tokenize it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slimlm import SlimlmError
from slimlm.config import TaskConfig
from slimlm.distill.data import FileSequences, Seq, build_sequences, ranking_sequences, take
from slimlm.distill.teacher import fingerprint
from slimlm.tasks import load_ranking_task
from slimlm.tasks.completion import completion_example, index_completion_file, tokenize_completion
from slimlm.tasks.files import RowError, holdout_indices, holdout_positions
from slimlm.tasks.movielens import subsample
from slimlm.tasks.ranking import label_token_ids, ranking_example, tokenize_ranking

pytestmark = pytest.mark.one_thread  # tiny work: see tests/conftest.py

WORDS = "the quick brown fox jumps over a lazy dog hello world small test movie rated".split()


def _text(rng, lo, hi) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def completion_rows(n: int, seed: int = 0, marked: bool = False, messages: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if messages and i % 3 == 0:
            row = {"messages": [{"role": "system", "content": _text(rng, 1, 4)},
                                {"role": "user", "content": _text(rng, 2, 30)},
                                {"role": "assistant", "content": _text(rng, 1, 12)}]}
        else:
            row = {"prompt": f"q{i} " + _text(rng, 2, 30), "response": _text(rng, 1, 12)}
        if marked and i % 4:
            row["split"] = ("train", "val", "test")[i % 3]
        rows.append(row)
    return rows


def ranking_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows, g = [], 0
    while len(rows) < n:
        g += 1
        prefix = f"User {g}: " + _text(rng, 2, 20) + "\n"
        for _ in range(int(rng.integers(1, 6))):
            i = len(rows)
            rows.append({"prefix": prefix, "suffix": "Candidate: " + _text(rng, 1, 8) + ". Answer:",
                         "label": int(rng.integers(0, 2)), "group": None if g % 3 == 0 else f"g{g}",
                         "id": None if i % 5 == 0 else f"r{i}", "split": ("train", "val", "test", None)[i % 4]})
            if i % 7 == 3:  # a group split by another group's row: packs follow file order
                rows.append({**rows[-1], "prefix": "Other\n", "group": "other", "id": f"o{i}"})
    return rows


def write(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)  # reads cross row groups
    else:
        lines = [json.dumps({k: v for k, v in r.items() if v is not None}) for r in rows]
        lines.insert(5, "")  # a blank line: line numbers and byte offsets no longer agree with row numbers
        path.write_text("\n".join(lines) + "\n")
    return path


def rows_whole(path) -> list[tuple[int, dict]]:
    """(line, row) of every row, the file read whole (as slimlm read user files before streaming)."""
    if path.suffix == ".parquet":
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    return [(n, json.loads(ln)) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]


def eager_completion(path, tok, split, limit, seed, max_length) -> list[Seq]:
    rows = rows_whole(path)
    examples = [completion_example(path, n, r) for n, r in rows]
    marks = [r.get("split") for _, r in rows]
    if any(marks):
        examples = [e for e, m in zip(examples, marks, strict=True) if (m or "train") == split]
    else:
        examples = [examples[i] for i in holdout_indices(len(examples), split)]
    order = np.random.default_rng(seed).permutation(len(examples))[:limit] if limit else range(len(examples))
    out = []
    for i in order:
        enc = tokenize_completion(examples[int(i)], tok)
        ids, labels = enc["input_ids"][-max_length:], enc["labels"][-max_length:]
        out.append(Seq(tuple(ids), tuple(labels), next((j for j, v in enumerate(labels) if v != -100), len(labels))))
    return out


def eager_ranking(path, tok, split, limit, seed, k, max_length) -> list[Seq]:
    examples = [ex for n, r in rows_whole(path) if (ex := ranking_example(path, n, r, split)) is not None]
    examples = subsample(examples, limit, seed)
    return ranking_sequences(tokenize_ranking(examples, tok), label_token_ids(tok), k, max_length)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("marked", [False, True])
def test_completion_file_sequences_equal_the_whole_file_read(tmp_path, tiny_tok, fmt, marked):
    path = write(tmp_path / f"c.{fmt}", completion_rows(90, marked=marked, messages=fmt == "jsonl"))
    for split in ("train", "val", "test"):
        for limit, seed in ((None, 0), (5, 3), (1000, 1)):
            task = TaskConfig(name="completion", data=str(path), max_length=24)
            got = build_sequences(task, tiny_tok, split, limit, seed)
            assert isinstance(got, FileSequences)
            want = eager_completion(path, tiny_tok, split, limit, seed, 24)
            assert len(got) == len(want) > 0, (split, limit)
            assert list(got) == want, (split, limit)
            picked = [3, 0, 3, len(want) - 1]  # a batch may repeat an item across an epoch boundary
            assert take(got, picked) == [want[i] for i in picked] == got.take(picked)
            assert got[-1] == want[-1] and got[1:4] == want[1:4]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ranking_file_sequences_equal_the_whole_file_read(tmp_path, tiny_tok, fmt):
    path = write(tmp_path / f"r.{fmt}", ranking_rows(80))
    for split in ("train", "val", "test"):
        for k in (1, 3):
            for limit, seed in ((None, 0), (9, 2), (10_000, 0)):
                task = TaskConfig(name="ranking", data=str(path), max_length=40, candidates_per_prefix=k)
                got = build_sequences(task, tiny_tok, split, limit, seed)
                want = eager_ranking(path, tiny_tok, split, limit, seed, k, 40)
                assert len(got) == len(want) > 0, (split, k, limit)
                assert list(got) == want, (split, k, limit)
            examples = [ex for n, r in rows_whole(path) if (ex := ranking_example(path, n, r, split)) is not None]
            assert load_ranking_task("ranking", path, split, 9, 2) == subsample(examples, 9, 2)


def test_the_index_keeps_positions_only(tmp_path):
    path = write(tmp_path / "c.jsonl", completion_rows(40))
    index = index_completion_file(path, "train")
    assert index.positions.dtype == np.int64 and index.positions.nbytes == 8 * len(index)
    assert index.lines is None
    assert len(index) == len(holdout_indices(40, "train"))
    for n in (0, 1, 2, 3, 40, 1001):  # the uint32 permutation is numpy's int64 one
        perm = np.random.default_rng(0).permutation(n)
        k = max(1, round(0.05 * n)) if n >= 3 else 0
        assert holdout_positions(n, "test").tolist() == sorted(perm[:k].tolist())
        assert holdout_positions(n, "train").tolist() == sorted(perm[2 * k:].tolist())


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_bad_row_names_file_line_and_field_before_training(tmp_path, tiny_tok, fmt, monkeypatch):
    from slimlm.config import DistillConfig
    from slimlm.distill.trainer import train

    rows = completion_rows(60, messages=False)
    rows[41] = {"prompt": "fine", "response": None}  # Parquet: a null in the response column
    path = write(tmp_path / f"bad.{fmt}", rows)
    line = 43 if fmt == "jsonl" else 42  # the blank line written at index 5
    task = TaskConfig(name="completion", data=str(path))
    with pytest.raises(RowError, match=rf"bad\.{fmt}:{line}: missing field 'response'"):
        build_sequences(task, tiny_tok, "train", None)
    import slimlm.distill.trainer
    from slimlm.testing import save_tiny_model

    save_tiny_model("llama", tmp_path / "student")
    cfg = DistillConfig.model_validate({"student": str(tmp_path / "student"), "out": str(tmp_path / "run"),
                                        "mode": "sft", "task": {"name": "completion", "data": str(path)}})
    monkeypatch.setattr(slimlm.distill.trainer, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(RowError, match=rf"bad\.{fmt}:{line}: missing field 'response'"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bad_split_marks_and_empty_splits(tmp_path, tiny_tok):
    rows = completion_rows(10, messages=False)
    rows[7]["split"] = "dev"
    with pytest.raises(RowError, match=r"s\.jsonl:9: field 'split' must be train or val or test"):
        build_sequences(TaskConfig(name="completion", data=str(write(tmp_path / "s.jsonl", rows))), tiny_tok,
                        "train", None)
    only_val = [{**r, "split": "val"} for r in completion_rows(6, messages=False)]
    with pytest.raises(RowError, match="no rows with split 'test'"):
        build_sequences(TaskConfig(name="completion", data=str(write(tmp_path / "v.jsonl", only_val))), tiny_tok,
                        "test", None)


def test_a_file_changed_after_indexing_is_refused(tmp_path, tiny_tok):
    path = write(tmp_path / "c.jsonl", completion_rows(30))
    seqs = build_sequences(TaskConfig(name="completion", data=str(path)), tiny_tok, "train", None)
    seqs[0]
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "late", "response": "row"}) + "\n")
    with pytest.raises(SlimlmError, match=r"c\.jsonl: the file changed after it was read"):
        seqs[1]


def test_the_cache_key_of_a_file_reads_bytes_not_tokens(tmp_path, tiny_tok, monkeypatch):
    path = write(tmp_path / "c.jsonl", completion_rows(30))
    task = TaskConfig(name="completion", data=str(path))
    seqs = build_sequences(task, tiny_tok, "train", None)
    base = dict(k=4, temperature=1.0, vocab=384)
    fp = fingerprint(seqs, **base)
    monkeypatch.setattr(seqs, "_make", lambda exs: pytest.fail("the fingerprint tokenized a row"))
    assert fingerprint(build_sequences(task, tiny_tok, "train", None), **base) == fingerprint(seqs, **base) == fp
    assert fingerprint(list(build_sequences(task, tiny_tok, "train", None)), **base) != fp  # a list: its tokens
    others = {fingerprint(build_sequences(task, tiny_tok, "val", None), **base),
              fingerprint(build_sequences(task, tiny_tok, "train", 5), **base),
              fingerprint(build_sequences(TaskConfig(name="completion", data=str(path), max_length=16), tiny_tok,
                                          "train", None), **base),
              fingerprint(seqs, **{**base, "k": 5})}
    tok2 = tiny_tok.__class__(tokenizer_object=tiny_tok.backend_tokenizer, eos_token="<|endoftext|>")
    others.add(fingerprint(build_sequences(task, tok2, "train", None), **base))
    assert fp not in others and len(others) == 5
    path.write_text(path.read_text().replace("fox", "cat"))
    assert fingerprint(build_sequences(task, tiny_tok, "train", None), **base) != fp
