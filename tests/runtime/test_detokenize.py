"""Incremental detokenisation and stop strings: pieces rebuild the decoded text, split characters are held
back, and no streamed piece contains part of a stop string."""

from __future__ import annotations

import pytest

from slimlm.runtime.text import Detokenizer, StopText


@pytest.mark.parametrize("text", ["héllo → 日本語 🎉 ok", "Yes No\nThe quick brown fox", "ü" * 7])
def test_detokenizer_pieces_rebuild_the_text(tiny_tok, text):
    ids = tiny_tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 3
    d = Detokenizer(tiny_tok, context=tiny_tok("User: ").input_ids)
    pieces = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 0 or len(ids) == len(text)  # multi-byte characters are held back


def test_stop_text_cuts_at_first_stop_and_never_leaks_part_of_one():
    s = StopText(["END", "\n\n"])
    out = [s.feed(x) for x in ["abc E", "N", "x E", "NDtail"]]
    assert "".join(out) == "abc ENx " and s.stopped and s.text == "abc ENx "
    assert out[0] == "abc " and out[1] == ""  # "E" then "EN" held back: could start "END"
    s = StopText(["\n\n"])
    assert s.feed("a\n") == "a" and s.feed("b") == "\nb" and s.feed("\n") == "" and s.feed("\nz") == ""
    assert s.text == "a\nb" and s.stopped
    s = StopText([])
    assert s.feed("x") == "x" and not s.stopped
