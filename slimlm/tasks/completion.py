"""Prompt/response data for generative SFT and distillation, with loss on the response only.

User files (JSONL or Parquet), one conversation per row, either::

    {"prompt": "What is 17 + 25?", "response": "42"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

With ``messages`` the last message must be the assistant's: it is the response; everything before it is
the prompt. Text is rendered with the tokenizer's chat template (plain ``prompt + response + EOS`` when
the tokenizer has none). Prompt and response are tokenized separately, so the prompt tokens are exactly
those the model sees at generation time; ``labels`` is -100 on prompt tokens.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimlm.tasks.files import (
    HOLDOUT,
    SPLITS,
    RowError,
    RowIndex,
    check_split,
    field,
    holdout_positions,
    scan_records,
)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class CompletionExample:
    messages: tuple[dict[str, str], ...]  # the last one is the assistant's response

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return list(self.messages[:-1])

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


SPLIT_CODES = {None: 0, "train": 1, "val": 2, "test": 3}  # a row's own split field, 1 byte a row while indexing


def completion_example(path: str | Path, line: int, row: dict) -> CompletionExample:
    """The conversation of one row (``prompt``/``response`` or ``messages``), checked: a RowError names
    ``file:line: field``."""
    if "messages" in row:
        msgs = field(path, line, row, "messages", list, check=bool, expect="a non-empty list")
        clean = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise RowError(f"{path}:{line}: field 'messages[{k}]' must be "
                               f"{{\"role\": one of {'/'.join(ROLES)}, \"content\": string}}")
            clean.append({"role": m["role"], "content": m["content"]})
        if clean[-1]["role"] != "assistant":
            raise RowError(f"{path}:{line}: field 'messages' must end with an assistant message")
        return CompletionExample(tuple(clean))
    prompt = field(path, line, row, "prompt", str)
    response = field(path, line, row, "response", str)
    return CompletionExample(({"role": "user", "content": prompt}, {"role": "assistant", "content": response}))


def index_completion_file(path: str | Path, split: str | None = None) -> RowIndex:
    """Where the rows of ``split`` are (all rows without one), in file order, from one streamed pass that
    checks every row (errors name ``file:line: field``) and keeps only its position; read the examples with
    :func:`read_completions`. The split is a row's optional ``split`` field (``train`` / ``val`` / ``test``;
    a row without one is ``train``) when any row has it, else the fixed 90/5/5 hold-out of
    :func:`slimlm.tasks.files.holdout_positions`."""
    if split is not None:
        check_split(split, allow_all=True)
    positions, codes = array("q"), array("B")
    for line, pos, row in scan_records(path):
        codes.append(SPLIT_CODES[field(path, line, row, "split", str, default=None, check=lambda v: v in SPLITS,
                                       expect=" or ".join(SPLITS))])
        completion_example(path, line, row)  # checked now; read again when drawn
        positions.append(pos)
    if not positions:
        raise RowError(f"{path}: no rows")
    index = RowIndex.build(path, positions)
    if split is None or split == "all":
        return index
    marks = np.frombuffer(codes, dtype=np.uint8)
    if marks.any():
        keep = marks == SPLIT_CODES[split]
        kept = np.flatnonzero((keep | (marks == 0)) if split == "train" else keep)
    else:
        kept = holdout_positions(len(index), split)
    if not len(kept):
        raise RowError(f"{path}: no rows with split '{split}' (give rows a \"split\" field, or add rows: "
                       f"without one, {100 * HOLDOUT:.0f}% each are held out for val and test)")
    return index.take(kept)


def read_completions(index: RowIndex, idx) -> list[CompletionExample]:
    """The examples at ``idx`` (indices into ``index``), read from the file now."""
    return [completion_example(index.path, line, row) for line, row in index.read(idx)]


def load_completion_file(path: str | Path, split: str | None = None) -> list[CompletionExample]:
    """Every example of ``split`` (all rows without one) in a list; see :func:`index_completion_file`, which
    the training data uses to read examples only when drawn."""
    index = index_completion_file(path, split)
    return read_completions(index, range(len(index)))


def render(example: CompletionExample, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) such that prompt + response is the whole rendered conversation."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(example.prompt_messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(example.messages), tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    prompt = "\n".join(m["content"] for m in example.prompt_messages) + "\n"
    return prompt, example.response + (tokenizer.eos_token or "")


def tokenize_completion(example: CompletionExample, tokenizer, max_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (prompt masked with -100), truncated to ``max_length`` tokens."""
    prompt, response = render(example, tokenizer)
    p = tokenizer(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
    r = tokenizer(response, add_special_tokens=False).input_ids
    ids, labels = p + r, [IGNORE_INDEX] * len(p) + r
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}
