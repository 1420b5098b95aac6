"""The HTTP API's request models and error responses (OpenAI's shapes and names).

Request bodies are pydantic models with ``extra="forbid"``: unknown fields are a 422, not silently
ignored; value ranges (``temperature`` in [0, 2], ``top_p`` in (0, 1], ``n`` >= 1, ...) are checked
here, limits that depend on the served model (context, vocabulary, the server's caps) in the app.
Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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


def json_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------- request models


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Req):
    include_usage: bool = False


StopField = str | list[str] | None


class SamplingRequest(_Req):
    """Fields shared by completions and chat completions (OpenAI's names and defaults)."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: StopField = None
    seed: int | None = None
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


class ScoreRequest(_Req):
    model: str | None = None
    prefix: str | list[int]
    candidates: list[str] | list[list[int]] = Field(min_length=1)
    labels: list[str] | None = None  # label strings, each one token; default [" Yes", " No"]
    label_token_ids: list[int] | None = None  # or the label token ids directly
