"""One error body (``Problem``) for every error, and the OpenAPI entries that document it.

Routes list the statuses they can answer with ``problems(...)``; the handlers here make
FastAPI's and Starlette's own errors (request validation, unparseable bodies, 405s),
unreachable dependencies (503) and failing ones (500) send that same body.
"""
from __future__ import annotations

import logging
from typing import Any

import botocore.exceptions
import kombu.exceptions
import redis
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # FastAPI before routers kept their routes nested: the app's list is flat
    def iter_route_contexts(routes):
        return iter(routes)
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException

from easel.producer.api.models import FieldError, Problem
from easel.shared.jobstore import refusing_for_now

log = logging.getLogger("easel.api")

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_RETRY_AFTER = {"description": "seconds to wait before retrying", "required": True,
                "schema": {"type": "integer", "minimum": 1}}
_WHY = {
    400: ("the body could not be parsed (malformed JSON or multipart)", {}),
    401: ("missing or invalid API key", {"WWW-Authenticate": {
        "description": "the Bearer scheme", "required": True, "schema": {"type": "string"}}}),
    404: ("no such job, or not one this key may see", {}),
    409: ("the idempotency key is in use by a job this API key did not submit", {}),
    413: ("the body is over EASEL_API_MAX_BODY_BYTES (the rest of it is not read)", {}),
    415: ("the body's Content-Type is not one this operation accepts", {}),
    422: ("the request is well formed but refused; `detail` says why, `errors` lists field errors", {}),
    429: ("the key's rate limit (or, when creating jobs, its in-flight cap) is reached", {
        "Retry-After": _RETRY_AFTER,
        "X-RateLimit-Limit": {"description": "the key's rate (rate limit only)", "schema": {"type": "string"}},
        "X-RateLimit-Remaining": {"description": "0 (rate limit only)", "schema": {"type": "string"}}}),
    503: ("Redis, the message broker or object storage is unreachable or failing", {"Retry-After": _RETRY_AFTER}),
}


def problems(*codes: int, **why: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for ``codes``, all with the Problem body as application/json.

    The content is spelled out rather than given as ``model``: FastAPI would document a model
    under the route's own media type, which for the SSE route is text/event-stream. ``why``
    overrides a description, keyed ``_<code>`` (``_422="job refused"``)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        description, headers = _WHY[code]
        entry: dict[str, Any] = {"description": why.get(f"_{code}", description),
                                 "content": {"application/json": {"schema": PROBLEM_REF}}}
        if headers:
            entry["headers"] = headers
        out[code] = entry
    return out


def _where(loc: list[str | int]) -> str:
    if loc and loc[0] == "body":
        return ".".join(map(str, loc[1:])) or "request body"
    return " ".join(map(str, loc)) or "request"


# A body can hold any number of mistakes (one per unknown key of a megabyte object): the
# response lists the first ones and counts the rest, so refusing it costs no more than reading it.
LISTED_ERRORS = 20


def _readable(errors: list[FieldError], total: int, json_error: str | None) -> str:
    if json_error is not None:
        return f"request body is not valid JSON: {json_error}"
    lines = [f"{_where(e.loc)}: {e.msg}" for e in errors[:5]]
    more = f" (and {total - 5} more)" if total > 5 else ""
    return "; ".join(lines) + more


async def invalid_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON at all, 422 for one that does not fit the schema. Inputs
    are not echoed: they can be megabytes of data: URI."""
    raw = exc.errors()
    errors = [FieldError(loc=list(e.get("loc", ())), msg=str(e.get("msg", "")), type=str(e.get("type", "")))
              for e in raw[:LISTED_ERRORS]]
    json_error = next((str((e.get("ctx") or {}).get("error", e.get("msg"))) for e in raw
                       if e.get("type") == "json_invalid"), None)
    body = Problem(detail=_readable(errors, len(raw), json_error), errors=errors)
    return JSONResponse(body.model_dump(mode="json"), status_code=400 if json_error is not None else 422)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    path = get_route_path(request.scope)
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.router.routes):
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and route_methods and regex.match(path):
            methods |= set(route_methods)
    return sorted(methods)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return await http_exception_handler(request, StarletteHTTPException(exc.status_code, str(exc.detail), headers))


def redis_transient(exc: redis.RedisError) -> bool:
    """Redis away, slow, or refusing commands for now: the same request may work in a while."""
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError) or refusing_for_now(exc)


async def redis_failed(_req: Request, exc: redis.RedisError) -> JSONResponse:
    """503 + Retry-After for a transient failure; 500 for anything else (a wrong-type key, a
    script error), which no retry mends. Bodies name no host, port or command: the log does."""
    if redis_transient(exc):
        log.warning("Redis unavailable: %s", exc)
        return JSONResponse({"detail": "Redis unavailable; retry later"}, status_code=503,
                            headers={"Retry-After": "5"})
    log.error("Redis refused a command", exc_info=exc)
    return JSONResponse({"detail": "the job store refused the server's command; its operator must check the "
                                   "server's log"}, status_code=500)


async def s3_down(_req: Request, exc: Exception) -> JSONResponse:
    log.warning("object storage unavailable: %s", exc)
    return JSONResponse({"detail": "object storage unavailable; retry later"}, status_code=503,
                        headers={"Retry-After": "5"})


async def s3_refused(_req: Request, exc: botocore.exceptions.ClientError) -> JSONResponse:
    """S3 answered with an error. References a client gives are checked before they reach S3,
    so this is the store's side: throttling or a 5xx is worth a retry (503); anything else
    (credentials, a bucket refused) is the server's configuration (500, details in its log)."""
    code = str(exc.response.get("Error", {}).get("Code", "?"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if status >= 500 or status == 429:  # S3 throttles with 503 SlowDown
        return JSONResponse({"detail": f"object storage failed: {code}"}, status_code=503,
                            headers={"Retry-After": "5"})
    log.error("object storage refused a request: %s", exc)
    return JSONResponse({"detail": f"object storage refused the server's request ({code}); "
                                   "its operator must check the storage settings"}, status_code=500)


async def broker_down(_req: Request, exc: kombu.exceptions.OperationalError) -> JSONResponse:
    """A message could not be published once kombu's retries gave up; the job it belonged
    to has ended failed ("could not enqueue") and let go of its idempotency key, so a retry
    queues the job anew."""
    log.warning("message broker unavailable: %s", exc)
    return JSONResponse({"detail": "message broker unavailable; retry later"}, status_code=503,
                        headers={"Retry-After": "5"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(redis.RedisError, redis_failed)
    app.add_exception_handler(botocore.exceptions.BotoCoreError, s3_down)
    app.add_exception_handler(botocore.exceptions.ClientError, s3_refused)
    app.add_exception_handler(kombu.exceptions.OperationalError, broker_down)
