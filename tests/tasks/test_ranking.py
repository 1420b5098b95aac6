"""Ranking examples: label tokens, prefix/suffix tokenization, user files (JSONL / Parquet) and their errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slimlm import SlimlmError
from slimlm.tasks.files import RowError
from slimlm.tasks.movielens import SPLITS, build_rows, load_movielens, to_examples
from slimlm.tasks.ranking import RankingExample, label_token_ids, load_ranking_file, tokenize_ranking

ROWS = [
    {"prefix": "User profile A.\n", "suffix": "Candidate: one. Answer:", "label": 1, "group": "a", "id": "r1",
     "split": "test"},
    {"prefix": "User profile A.\n", "suffix": "Candidate: two. Answer:", "label": 0, "group": "a", "id": "r2",
     "split": "test"},
    {"prefix": "User profile B.\n", "suffix": "Candidate: three. Answer:", "label": True, "group": None,
     "id": 7, "split": "val"},
    {"prefix": "User profile C.\n", "suffix": "Candidate: four. Answer:", "label": 0, "group": None, "id": None,
     "split": None},
]


# --------------------------------------------------------------------------- label tokens


def test_label_token_ids(tiny_tok):
    pos, neg = label_token_ids(tiny_tok)
    assert pos != neg
    assert tiny_tok.decode([pos]) == " Yes" and tiny_tok.decode([neg]) == " No"
    assert (pos, neg) == (tiny_tok.convert_tokens_to_ids("ĠYes"), tiny_tok.convert_tokens_to_ids("ĠNo"))
    assert label_token_ids(tiny_tok, (" No", " Yes")) == (neg, pos)


def test_label_token_ids_rejects_multi_token_and_equal_labels(tiny_tok):
    assert len(tiny_tok(" Xylophone", add_special_tokens=False).input_ids) > 1
    with pytest.raises(SlimlmError, match="' Xylophone' is [0-9]+ tokens"):
        label_token_ids(tiny_tok, (" Yes", " Xylophone"))
    with pytest.raises(SlimlmError, match="same token"):
        label_token_ids(tiny_tok, (" Yes", " Yes"))


# --------------------------------------------------------------------------- tokenization


def test_tokenize_ranking_boundary_equals_whole_prompt(ml_synth, tiny_tok):
    ml = load_movielens(ml_synth.dir)
    rows = build_rows(ml)
    examples = [e for s in SPLITS for e in to_examples(rows[s], ml.items)]
    tokenized = tokenize_ranking(examples, tiny_tok)
    assert [t.id for t in tokenized] == [e.id for e in examples]
    for e, t in zip(examples, tokenized, strict=True):
        assert list(t.input_ids) == tiny_tok(e.prompt).input_ids, e.id
        assert list(t.prefix_ids) == tiny_tok(e.prefix).input_ids
        assert len(t.suffix_ids) > 0 and (t.group, t.label) == (e.group, e.label)
    # Candidates of one held-out group carry identical prefix ids (what the engine's reuse keys on).
    test = [t for t in tokenized if t.group == "u1-test"]
    assert len(test) == 2 and test[0].prefix_ids == test[1].prefix_ids
    assert tokenize_ranking([], tiny_tok) == []


def test_boundary_check_can_fail(tiny_tok):
    # A boundary inside a word: BPE merges across it, so separate tokenization differs from the whole.
    ex = RankingExample("x", "g", prefix="Will the user like it? Ans", suffix="wer:", label=1)
    (t,) = tokenize_ranking([ex], tiny_tok)
    assert list(t.input_ids) != tiny_tok(ex.prompt).input_ids


# --------------------------------------------------------------------------- user files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" if not isinstance(r, str) else r for r in rows))
    return path


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_load_ranking_file(tmp_path, fmt):
    path = tmp_path / f"rank.{fmt}"
    if fmt == "jsonl":
        # Optional fields may also be absent, and blank lines are skipped.
        rows = [dict(ROWS[0]), dict(ROWS[1]), dict(ROWS[2]), {k: v for k, v in ROWS[3].items() if v is not None}]
        _write_jsonl(path, [json.dumps(rows[0]) + "\n", "\n", *rows[1:]])
        lines = [1, 3, 4, 5]
    else:
        # Parquet keeps one schema: ids as strings, labels as ints, absent values as nulls.
        _write_parquet(path, [{**r, "id": None if r["id"] is None else str(r["id"]), "label": int(r["label"])}
                              for r in ROWS])
        lines = [1, 2, 3, 4]
    got = load_ranking_file(path)
    assert got == [
        RankingExample("r1", "a", "User profile A.\n", "Candidate: one. Answer:", 1),
        RankingExample("r2", "a", "User profile A.\n", "Candidate: two. Answer:", 0),
        RankingExample("7", "User profile B.\n", "User profile B.\n", "Candidate: three. Answer:", 1),
        RankingExample(f"rank.{fmt}:{lines[3]}", "User profile C.\n", "User profile C.\n",
                       "Candidate: four. Answer:", 0),
    ]
    assert [e.id for e in load_ranking_file(path, split="test")] == ["r1", "r2", f"rank.{fmt}:{lines[3]}"]
    assert [e.id for e in load_ranking_file(path, split="val")] == ["7"]
    with pytest.raises(RowError, match="no rows with split 'train'"):
        load_ranking_file(path, split="train")


GOOD = {"prefix": "P\n", "suffix": "S", "label": 1}


@pytest.mark.parametrize(("bad", "field"), [
    ({"prefix": "P\n", "label": 1}, "suffix"),
    ({**GOOD, "suffix": ""}, "suffix"),
    ({**GOOD, "label": 2}, "label"),
    ({**GOOD, "label": "yes"}, "label"),
    ({**GOOD, "label": 1.0}, "label"),
    ({"suffix": "S", "label": 0}, "prefix"),
    ({**GOOD, "prefix": 3}, "prefix"),
    ({**GOOD, "split": 1}, "split"),
])
def test_jsonl_bad_rows_name_file_line_and_field(tmp_path, bad, field):
    path = _write_jsonl(tmp_path / "rows.jsonl", [GOOD, "\n", GOOD, bad, GOOD])  # bad row on line 4
    with pytest.raises(RowError) as e:
        load_ranking_file(path)
    msg = str(e.value)
    assert f"{path}:4:" in msg and f"'{field}'" in msg and "\n" not in msg


@pytest.mark.parametrize("line", ["{not json", "[1, 2]", '"a string"'])
def test_jsonl_unparseable_rows(tmp_path, line):
    path = _write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, line + "\n"])
    with pytest.raises(RowError, match=f"{path}:3: "):
        load_ranking_file(path)


@pytest.mark.parametrize(("column", "values", "field"), [
    ("label", [1, 0, 2], "label"),
    ("label", ["1", "0", "yes"], "label"),
    ("suffix", ["S", "S", None], "suffix"),
])
def test_parquet_bad_rows_name_file_row_and_field(tmp_path, column, values, field):
    rows = [dict(GOOD) for _ in range(3)]
    for r, v in zip(rows, values, strict=True):
        r[column] = v
    path = _write_parquet(tmp_path / "rows.parquet", rows)
    with pytest.raises(RowError) as e:
        load_ranking_file(path)
    msg = str(e.value)
    # Strings "1"/"0" are rejected too (row 1 fails first): labels must be integers.
    want_row = 1 if values[0] == "1" else 3
    assert f"{path}:{want_row}:" in msg and f"'{field}'" in msg


def test_unreadable_or_unsupported_files(tmp_path):
    with pytest.raises(SlimlmError, match="no such file"):
        load_ranking_file(tmp_path / "missing.jsonl")
    (tmp_path / "rows.csv").write_text("prefix,suffix,label\n")
    with pytest.raises(SlimlmError, match="unsupported file type '.csv'"):
        load_ranking_file(tmp_path / "rows.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SlimlmError, match="unreadable Parquet"):
        load_ranking_file(tmp_path / "bad.parquet")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RowError, match="no rows"):
        load_ranking_file(tmp_path / "empty.jsonl")
