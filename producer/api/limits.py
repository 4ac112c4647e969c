"""Request body caps, enforced before anything reads a body.

FastAPI reads a whole body (a multipart one spooled to disk) before a route's dependencies
run, the API key check among them, so a cap checked in a route comes too late. This
middleware answers 413 from a declared Content-Length before the app sees the request, and
counts the bytes of a body sent without one (chunked) as the app reads them; it also checks
the key, its rate limit and the process's budget of bytes being read before a body is read.
"""
from __future__ import annotations

import anyio
import redis
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easel.producer.api.deps import RATE_CHECKED, over_rate
from easel.producer.api.errors import redis_failed
from easel.producer.api.models import Problem
from easel.producer.api.security import INVALID_KEY, MISSING_KEY
from easel.producer.api.state import ApiState
from easel.shared.settings import Settings

UPLOAD_PATH = "/v1/uploads"
# A form's boundaries and part headers around the file: a few hundred bytes in practice.
MULTIPART_FRAMING = 64 * 1024


class BodyTooLarge(HTTPException):
    """FastAPI's HTTPException: FastAPI passes it on from its body reading (anything else it
    turns into a 400), and the app's handler answers it with a Problem."""

    def __init__(self, detail: str):
        super().__init__(413, detail, headers={"Connection": "close"})


def body_cap(settings: Settings, scope: Scope) -> tuple[int, str]:
    """The request's cap in bytes, and what a 413 says about it."""
    if scope["method"] == "POST" and get_route_path(scope) == UPLOAD_PATH:
        limit = settings.max_input_bytes
        return limit + MULTIPART_FRAMING, f"upload is over the {limit}-byte limit (EASEL_MAX_INPUT_BYTES)"
    cap = settings.api_max_body_bytes
    return cap, (f"request body is over the {cap}-byte limit (EASEL_API_MAX_BODY_BYTES); upload large "
                 "images with POST /v1/uploads and name them in the job instead of inlining them")


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    return int(value) if value and value.isdigit() else None


BUSY = ("the server is reading as many request bytes as it holds at once "
        "(EASEL_API_MAX_BODIES_IN_FLIGHT_BYTES); retry in a moment")


class BodiesBusy(HTTPException):
    """A body that would take the process past its budget of bytes being read."""

    def __init__(self):
        super().__init__(503, BUSY, headers={"Connection": "close", "Retry-After": "1"})


class _Budget:
    """Bytes of request bodies this process has read and still holds. Counted as they arrive,
    so a client that declares a large body and sends nothing holds nothing. Other requests'
    bytes only count against a request: a lone body under the caps is always read whole."""

    def __init__(self, limit: int):
        self.limit, self.reading = limit, 0

    def room_for(self, n: int, own: int = 0) -> bool:
        others = self.reading - own
        return not others or self.reading + n <= self.limit

    def take(self, n: int, own: int) -> bool:
        if not self.room_for(n, own):
            return False
        self.reading += n
        return True


def _counting(receive: Receive, cap: int, detail: str, budget: _Budget, taken: list[int]) -> Receive:
    """``receive`` with the body counted as it arrives against its cap (a body sent without
    a length) and the process's budget (``taken[0]``: the bytes this request holds of it)."""

    async def counted() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            n = len(message.get("body", b""))
            if taken[0] + n > cap:
                raise BodyTooLarge(detail)
            if n and not budget.take(n, taken[0]):
                raise BodiesBusy()
            taken[0] += n
        return message

    return counted


def _refusal(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = Problem(detail=detail).model_dump(mode="json", exclude_defaults=True)
    return JSONResponse(body, status_code=status, headers={"Connection": "close", **(headers or {})})


class BodyLimit:
    """Pure ASGI, so the refusal comes before routing, and streamed responses pass untouched.
    Before a body is read (FastAPI reads it before any route dependency runs), its request must
    have a known API key, a token from that key's rate limit (spent here, not again by the
    route) and room in this process's budget of body bytes held at once
    (``api_max_bodies_in_flight_bytes``, counted as bytes arrive): a key over its rate, or many
    large bodies at once, would otherwise hold the process's memory before being refused. A
    refusal closes the connection (``Connection: close``): the rest of the body is never read."""

    def __init__(self, app: ASGIApp, api: ApiState):
        self.app, self.api, self.settings = app, api, api.s
        self.budget = _Budget(api.s.api_max_bodies_in_flight_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap, detail = body_cap(self.settings, scope)
        headers = Headers(scope=scope)
        declared = _declared_length(scope)
        if declared is not None and declared > cap:
            return await _refusal(413, detail)(scope, receive, send)
        if declared or "chunked" in headers.get("transfer-encoding", "").lower():
            refusal = await self._admit(headers, scope, declared or 1)
            if refusal is not None:
                return await refusal(scope, receive, send)
        taken = [0]
        try:
            await self.app(scope, _counting(receive, cap, detail, self.budget, taken), send)
        finally:
            self.budget.reading -= taken[0]

    async def _admit(self, headers: Headers, scope: Scope, size: int) -> JSONResponse | None:
        """The refusal for a request with a body (``size`` bytes declared; 1 when chunked)
        before the body is read, None to read it: 401 without a known key, 503 while other
        bodies hold the budget or Redis is away, 429 over the key's rate."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _refusal(401, *MISSING_KEY)
        p = self.api.keys.lookup(token.strip())
        if p is None:
            return _refusal(401, *INVALID_KEY)
        if not self.budget.room_for(size):  # others hold the budget: refused before a token is spent
            return _refusal(503, BUSY, {"Retry-After": "1"})
        try:
            over = await anyio.to_thread.run_sync(over_rate, self.api, p)
        except redis.RedisError as e:
            response = await redis_failed(None, e)
            response.headers["Connection"] = "close"
            return response
        if over is not None:
            return _refusal(over.status_code, over.detail, over.headers)
        scope.setdefault("state", {})[RATE_CHECKED] = p.name
        return None
