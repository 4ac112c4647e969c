"""Request body caps, enforced before anything reads a body.

FastAPI reads a whole body (a multipart one spooled to disk) before a route's dependencies
run, the API key check among them, so a cap checked in a route comes too late. This
middleware answers 413 from a declared Content-Length before the app sees the request, and
counts the bytes of a body sent without one (chunked) as the app reads them.
"""
from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easel.producer.api.models import Problem
from easel.producer.api.security import INVALID_KEY, MISSING_KEY, KeyRing
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


def _counting(receive: Receive, cap: int, detail: str) -> Receive:
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise BodyTooLarge(detail)
        return message

    return counted


def _refusal(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = Problem(detail=detail).model_dump(mode="json", exclude_defaults=True)
    return JSONResponse(body, status_code=status, headers={"Connection": "close", **(headers or {})})


class BodyLimit:
    """Pure ASGI, so the refusal comes before routing, and streamed responses pass untouched.
    A body without a known API key is refused before it is read too (every route that takes
    one needs a key, and FastAPI would read it before the key check). A refusal closes the
    connection (``Connection: close``): the rest of the body is never read."""

    def __init__(self, app: ASGIApp, settings: Settings, keys: KeyRing):
        self.app, self.settings, self.keys = app, settings, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap, detail = body_cap(self.settings, scope)
        headers = Headers(scope=scope)
        declared = _declared_length(scope)
        if declared is not None and declared > cap:
            return await _refusal(413, detail)(scope, receive, send)
        has_body = bool(declared) or "chunked" in headers.get("transfer-encoding", "").lower()
        unknown = self._key_problem(headers) if has_body else None
        if unknown is not None:
            return await _refusal(401, *unknown)(scope, receive, send)
        await self.app(scope, _counting(receive, cap, detail), send)

    def _key_problem(self, headers: Headers) -> tuple[str, dict[str, str]] | None:
        """What the key check (``deps.authenticate``) would answer, None for a known key."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MISSING_KEY
        if self.keys.lookup(token.strip()) is None:
            return INVALID_KEY
        return None
