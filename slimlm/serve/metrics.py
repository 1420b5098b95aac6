"""Request metrics in the Prometheus text format, and the ASGI middleware that guards every request.

:class:`Metrics` keeps counters and per-endpoint latency histograms in memory; :class:`Guard` checks the
API key and the body-size limit on ``/v1/`` routes before the app sees a request, and records every
request's status and duration in a :class:`Metrics`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from bisect import bisect_left
from collections import defaultdict

from starlette.exceptions import HTTPException

from slimlm.serve.schemas import error_body, json_response

log = logging.getLogger("slimlm.serve")


class Metrics:
    """Counters and histograms in memory, rendered in the Prometheus text format (version 0.0.4)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(self.BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "scored_candidates": 0}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1
            self.latency[endpoint][bisect_left(self.BUCKETS, seconds)] += 1
            self.latency_sum[endpoint] += seconds

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self.counters[name] += n

    def render(self, gauges: dict[str, tuple[str, float]],
               counters: dict[str, tuple[str, float]] | None = None) -> str:
        """The text format: request counts and latencies, this object's counters, then ``counters`` and
        ``gauges`` kept elsewhere (name -> (help, value))."""
        lines = []

        def head(name, kind, help_):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])

        with self._lock:
            head("slimlm_requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'slimlm_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            head("slimlm_request_duration_seconds", "histogram", "Time from request to the end of the response.")
            for ep, counts in sorted(self.latency.items()):
                cum = 0
                for le, c in zip([*map(str, self.BUCKETS), "+Inf"], counts, strict=True):
                    cum += c
                    lines.append(f'slimlm_request_duration_seconds_bucket{{endpoint="{ep}",le="{le}"}} {cum}')
                lines.append(f'slimlm_request_duration_seconds_sum{{endpoint="{ep}"}} {self.latency_sum[ep]:.6f}')
                lines.append(f'slimlm_request_duration_seconds_count{{endpoint="{ep}"}} {cum}')
            for name, help_ in (("prompt_tokens", "Prompt tokens of accepted generation and score requests."),
                                ("generation_tokens", "Tokens generated."),
                                ("scored_candidates", "Candidates scored by /v1/score.")):
                head(f"slimlm_{name}_total", "counter", help_)
                lines.append(f"slimlm_{name}_total {self.counters[name]}")
        for name, (help_, value) in (counters or {}).items():
            head(name, "counter", help_)
            lines.append(f"{name} {value}")
        for name, (help_, value) in gauges.items():
            head(name, "gauge", help_)
            lines.append(f"{name} {value}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- ASGI guards


class Guard:
    """ASGI middleware: API key and body-size limit on /v1/ routes, request metrics on every route, and
the last word on errors: an exception no handler took becomes a complete 500 JSON response.

    The key is checked before any of the body is read, so an unauthenticated client cannot make the
    server buffer a large body; a body over the limit is refused by its Content-Length, or (chunked) as
    soon as the bytes received pass the limit.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics: Metrics, routes: set[str]):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.metrics, self.routes = metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: list[int | None] = [None]  # set when the response starts

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope["path"]
        try:
            refused = self._refuse(scope)
            if refused is not None:
                await refused(scope, receive, send_tracked)
                return
            try:
                await self.app(scope, self._limited(receive), send_tracked)
            except Exception as e:
                if status[0] is not None:  # mid-response: only closing the connection can tell the client
                    raise
                # Answered here, completely, and not re-raised: an exception that reaches the server
                # makes it close the connection, and a keep-alive client's next request is reset.
                log.exception("internal error")
                await json_response(500, error_body(f"internal error: {type(e).__name__}", "server_error"))(
                    scope, receive, send_tracked)
        finally:
            status[0] = 500 if status[0] is None else status[0]
            self.metrics.observe(path if path in self.routes else "other", status[0], time.perf_counter() - start)

    def _refuse(self, scope):
        if not scope["path"].startswith("/v1/"):
            return None
        headers = dict(scope["headers"])
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                return json_response(401, error_body("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                                      "authentication_error", "invalid_api_key"),
                                      {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return json_response(413, error_body(f"request body over the limit of {self.max_body_bytes} bytes",
                                                  "request_too_large", "body_too_large"))
        return None

    def _limited(self, receive):
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # FastAPI passes HTTPException through body parsing
                    raise HTTPException(413, f"request body over the limit of {self.max_body_bytes} bytes")
            return message

        return limited
