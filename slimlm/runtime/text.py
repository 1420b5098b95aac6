"""Text from token ids as they are generated: incremental detokenisation and stop strings.

:class:`Detokenizer` turns a growing token list into text pieces whose concatenation is the decoded
text of the new tokens; :class:`StopText` cuts that text at the first stop string and holds back any
tail that could still become one, so a streamed piece never contains part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """Incremental text of a growing token list.

    Text is decoded over a short sliding window ``ids[prefix_offset:]`` (seeded with the last prompt tokens,
    so tokenizers that drop a leading space when decoding a lone token still see the context) and a new
    piece is released only when it does not end in U+FFFD, i.e. a UTF-8 character split across tokens is
    held back until its last byte arrives. Concatenating the pieces gives ``decode(new tokens)``.
    """

    CONTEXT = 5

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _pending(self) -> tuple[str, str]:
        return self._decode(self.ids[self.prefix_offset:self.read_offset]), self._decode(self.ids[self.prefix_offset:])

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token)
        before, full = self._pending()
        if len(full) > len(before) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before, full = self._pending()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(before):]


class StopText:
    """Accumulates text, cuts it at the first stop string, and releases only text that cannot turn into one.

    A tail of the text that is a proper prefix of some stop string is held back until the next piece
    shows whether the stop string completes; so streamed pieces never contain any part of a stop string.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the newly releasable text. Sets ``stopped`` when a stop string appears."""
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self.release()
        hold = 0
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                hold = k
                break
        return self.release(len(self.text) - hold)

    def release(self, upto: int | None = None) -> str:
        upto = len(self.text) if upto is None else upto
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out
