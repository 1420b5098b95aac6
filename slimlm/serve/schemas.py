"""The HTTP API's request models and error responses (OpenAI's shapes and names).

Request bodies are pydantic models with ``extra="forbid"``: unknown fields are a 422, not silently
ignored; value ranges (``temperature`` in [0, 2], ``top_p`` in (0, 1], ``n`` >= 1, ``seed`` a signed
64-bit integer, ...) and text that is not valid Unicode (a lone UTF-16 surrogate: valid JSON, but no
tokenizer takes it) are refused here, before a request reaches the model; limits that depend on the
served model (context, vocabulary, the server's caps) are checked in the app. Errors have OpenAI's body
``{"error": {"message", "type", "param", "code"}}``, serialised ASCII-only so that no echoed value can
break the response.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """A request the server refuses: answered with HTTP ``status`` and an :func:`error_body`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "request_too_large", 422: "invalid_request_error",
                503: "server_overloaded"}


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message that quotes a client's string (even one
    holding a lone surrogate) always encodes, so every error path sends a complete response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def json_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return _AsciiJSON(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------- request models


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside a parsed request (dict keys included), with its path: ``messages[0].content``."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _strings(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k, f"{path} key")
            yield from _strings(v, f"{path}[{k!r}]")


INVALID_UNICODE = "invalid_unicode"


class _Body(_Req):
    """A request body: every string in it must be valid Unicode (checked once, on the whole body)."""

    @model_validator(mode="after")
    def _valid_unicode(self):
        for path, text in _strings(self, ""):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise PydanticCustomError(
                    INVALID_UNICODE, "{param}: not valid Unicode (a lone surrogate {char} at character {at})",
                    {"param": path, "char": f"U+{ord(text[e.start]):04X}", "at": e.start}) from None
        return self


class StreamOptions(_Req):
    include_usage: bool = False


StopField = str | list[str] | None


class SamplingRequest(_Body):
    """Fields shared by completions and chat completions (OpenAI's names and defaults)."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: StopField = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a signed 64-bit integer, as OpenAI's
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted with their neutral values only (anything else is a clear 400, not silently ignored)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # not OpenAI's; as in vLLM, for benchmarks that need a fixed length


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name", "refusal": not used by chat templates here

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class ScoreRequest(_Body):
    model: str | None = None
    prefix: str | list[int]
    candidates: list[str] | list[list[int]] = Field(min_length=1)
    labels: list[str] | None = None  # label strings, each one token; default [" Yes", " No"]
    label_token_ids: list[int] | None = None  # or the label token ids directly
