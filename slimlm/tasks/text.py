"""Plain text for language modelling, perplexity and calibration.

Sources: a ``.txt`` file (one document), ``.jsonl`` / ``.parquet`` rows with a ``text`` field, or the
built-in held-out corpus ``lcet10`` (public-domain prose; see :data:`slimlm.assets.TEXT_LCET10`).
Documents are tokenized, joined with the EOS token and cut into non-overlapping blocks.
"""

from __future__ import annotations

from pathlib import Path

from slimlm import SlimlmError
from slimlm.tasks.files import HOLDOUT, field, holdout_indices, iter_records

BUILTIN = ("lcet10",)


def builtin_text(name: str = "lcet10") -> str:
    """The prose body of a built-in corpus (front matter and appendices cut off, CRLF -> LF)."""
    from slimlm.assets import TEXT_BODY_MARKERS, text_corpus

    if name not in BUILTIN:
        raise SlimlmError(f"unknown built-in text {name!r}; expected one of {', '.join(BUILTIN)}")
    raw = text_corpus().read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    start, end = TEXT_BODY_MARKERS
    lines = raw.split("\n")
    i = next(n for n, ln in enumerate(lines) if ln.strip() == start)
    j = next(n for n, ln in enumerate(lines) if ln.strip() == end)
    return "\n".join(lines[i:j]).strip() + "\n"


def read_texts(source: str | Path | None = None) -> list[str]:
    """Documents from ``source``: a built-in name, a .txt file, or .jsonl/.parquet rows with ``text``."""
    if source is None or str(source) in BUILTIN:
        return [builtin_text(str(source or "lcet10"))]
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise SlimlmError(f"{path}: no such file")
        return [path.read_text(encoding="utf-8")]
    texts = [field(path, line, row, "text", str) for line, row in iter_records(path)]
    if not texts:
        raise SlimlmError(f"{path}: no rows")
    return texts


def text_blocks(tokenizer, texts: list[str], block_size: int = 512, max_blocks: int | None = None) -> list[list[int]]:
    """Tokenize, join documents with EOS, and cut into blocks of ``block_size`` tokens (last may be shorter)."""
    if block_size < 2:
        raise SlimlmError("block_size must be at least 2")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False).input_ids:
        stream.extend(ids)
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    blocks = [b for b in blocks if len(b) >= 2]
    return blocks[:max_blocks] if max_blocks else blocks


def split_blocks(tokenizer, texts: list[str], block_size: int, split: str, limit: int | None = None) -> list[list[int]]:
    """The blocks of ``split`` (the fixed hold-out of :func:`slimlm.tasks.files.holdout_indices` over all
    blocks; ``all`` = every block), in text order, at most ``limit``."""
    blocks = text_blocks(tokenizer, texts, block_size)
    chosen = [blocks[i] for i in holdout_indices(len(blocks), split)][:limit or None]
    if not chosen:
        raise SlimlmError(f"the text has {len(blocks)} blocks of {block_size} tokens: none for split '{split}' "
                          f"({100 * HOLDOUT:.0f}% each are held out for val and test once there are 3 or more; "
                          f"split 'all' takes every block)")
    return chosen
