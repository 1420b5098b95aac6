"""The text and completion tasks: blocks, response-only labels, and row errors."""

from __future__ import annotations

import json

import pytest

from slimlm.models import tiny_tokenizer
from slimlm.tasks.completion import IGNORE_INDEX, CompletionExample, load_completion_file, tokenize_completion
from slimlm.tasks.files import RowError
from slimlm.tasks.text import read_texts, text_blocks


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
