"""The text and completion tasks: blocks, response-only labels, and row errors."""

from __future__ import annotations

import json

import pytest

from slimlm import SlimlmError
from slimlm.tasks.completion import IGNORE_INDEX, CompletionExample, load_completion_file, tokenize_completion
from slimlm.tasks.files import HOLDOUT, RowError, holdout_indices
from slimlm.tasks.text import read_texts, split_blocks, text_blocks
from slimlm.testing import tiny_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_blocks_join_documents_with_eos(tiny_tok):
    docs = ["Hello world, this is a small test.", "The quick brown fox."]
    ids = [tiny_tok(d, add_special_tokens=False).input_ids for d in docs]
    stream = ids[0] + [tiny_tok.eos_token_id] + ids[1] + [tiny_tok.eos_token_id]
    blocks = text_blocks(tiny_tok, docs, block_size=5)
    assert sum(blocks, []) == stream[: sum(len(b) for b in blocks)]
    assert all(len(b) == 5 for b in blocks[:-1]) and 2 <= len(blocks[-1]) <= 5
    assert text_blocks(tiny_tok, docs, block_size=5, max_blocks=2) == blocks[:2]


def test_read_texts_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nline two\n")
    assert read_texts(tmp_path / "a.txt") == ["plain text\nline two\n"]
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    assert read_texts(f) == ["one", "two"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "one"}, {"txt": "two"}])
    with pytest.raises(RowError, match=r"bad\.jsonl:2: missing field 'text'"):
        read_texts(bad)


@pytest.mark.slow
def test_builtin_text_is_the_prose_body():
    (text,) = read_texts("lcet10")
    assert text.startswith("INTRODUCTION\n") and "\r" not in text
    assert "Appendix I:  PROGRAM" not in text and "Project Gutenberg" not in text
    assert len(text) > 300_000


def test_completion_rows_and_errors(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "What is 2+2?", "response": "4"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
    ])
    a, b = load_completion_file(f)
    assert a.response == "4" and a.prompt_messages == [{"role": "user", "content": "What is 2+2?"}]
    assert b.response == "Hello" and len(b.prompt_messages) == 2
    cases = [
        ({"prompt": "x"}, r":1: missing field 'response'"),
        ({"messages": [{"role": "user", "content": "x"}]}, r":1: field 'messages' must end with an assistant"),
        ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
         r":1: field 'messages\[0\]'"),
        ({"messages": []}, r":1: field 'messages' must be a non-empty list"),
        ("{not json", r":1: invalid JSON"),
    ]
    for row, msg in cases:
        with pytest.raises(RowError, match=msg):
            load_completion_file(write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_completion_labels_cover_only_the_response(tiny_tok):
    ex = CompletionExample(({"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Yes"}))
    enc = tokenize_completion(ex, tiny_tok)
    ids, labels = enc["input_ids"], enc["labels"]
    n_prompt = labels.count(IGNORE_INDEX)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in labels[n_prompt:]
    assert tiny_tok.decode(ids[:n_prompt]) == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tok.decode(labels[n_prompt:]) == "Yes<|im_end|>\n"
    assert tokenize_completion(ex, tiny_tok, max_length=4)["input_ids"] == ids[:4]


def test_completion_without_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    ex = CompletionExample(({"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"}))
    enc = tokenize_completion(ex, tok)
    n_prompt = enc["labels"].count(IGNORE_INDEX)
    assert tok.decode(enc["input_ids"][:n_prompt]) == "Hello\n"
    assert tok.decode(enc["labels"][n_prompt:]) == "world<|im_end|>"


@pytest.mark.parametrize("n", [0, 2, 3, 40, 1001])
def test_holdout_partitions_rows_the_same_way_every_time(n):
    parts = {s: holdout_indices(n, s) for s in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == list(range(n))  # disjoint and complete
    assert all(p == sorted(p) for p in parts.values())
    k = max(1, round(HOLDOUT * n)) if n >= 3 else 0
    assert len(parts["val"]) == len(parts["test"]) == k
    assert parts == {s: holdout_indices(n, s) for s in parts}  # fixed, whatever the training seed
    assert holdout_indices(n, "all") == list(range(n))
    with pytest.raises(SlimlmError, match="unknown split 'dev'"):
        holdout_indices(n, "dev")


def test_completion_splits_by_field_or_holdout(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    got = {s: [ex.prompt_messages[0]["content"] for ex in load_completion_file(f, s)] for s in ("train", "val", "test")}
    assert sorted(sum(got.values(), []), key=lambda q: int(q[1:])) == [f"q{i}" for i in range(40)]
    assert len(got["val"]) == len(got["test"]) == 2
    assert got["test"] == [f"q{i}" for i in holdout_indices(40, "test")]
    # a split field wins; rows without one are train
    marked = write_jsonl(tmp_path / "m.jsonl", [{**rows[0], "split": "val"}, rows[1], {**rows[2], "split": "test"}])
    assert [ex.response for ex in load_completion_file(marked, "val")] == ["a0"]
    assert [ex.response for ex in load_completion_file(marked, "train")] == ["a1"]
    assert len(load_completion_file(marked)) == 3
    bad = write_jsonl(tmp_path / "b.jsonl", [{**rows[0], "split": "dev"}])
    with pytest.raises(RowError, match=r"b\.jsonl:1: field 'split' must be train or val or test"):
        load_completion_file(bad, "train")
    with pytest.raises(RowError, match="no rows with split 'test'"):
        load_completion_file(write_jsonl(tmp_path / "two.jsonl", rows[:2]), "test")


def test_text_split_blocks_are_disjoint(tiny_tok):
    text = " ".join(f"word{i}" for i in range(3000))
    blocks = text_blocks(tiny_tok, [text], 16)
    parts = {s: split_blocks(tiny_tok, [text], 16, s) for s in ("train", "val", "test")}
    assert sorted(map(tuple, sum(parts.values(), []))) == sorted(map(tuple, blocks))
    assert parts["val"] == [blocks[i] for i in holdout_indices(len(blocks), "val")]
    assert split_blocks(tiny_tok, [text], 16, "train", limit=3) == parts["train"][:3]
    assert split_blocks(tiny_tok, [text], 16, "all") == blocks


@pytest.mark.parametrize("name", ["text", "completion"])
def test_training_and_held_out_sequences_never_overlap(name, tiny_tok, tmp_path):
    """What the trainer trains on (split train) and validates on (eval_split val) are disjoint."""
    from slimlm.config import TaskConfig
    from slimlm.distill.data import build_sequences

    if name == "text":
        (tmp_path / "d.txt").write_text(" ".join(f"word{i}" for i in range(3000)))
        task = TaskConfig(name="text", data=str(tmp_path / "d.txt"), max_length=16)
    else:
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(60)])
        task = TaskConfig(name="completion", data=str(tmp_path / "d.jsonl"), max_length=64)
    train = {s.input_ids for s in build_sequences(task, tiny_tok, "train", None)}
    val = {s.input_ids for s in build_sequences(task, tiny_tok, "val", None)}
    assert val and train and not train & val
