"""FastAPI dependencies: the shared state, the caller (bearer key, then its rate limit), owned
jobs and the request media types routes accept."""
from __future__ import annotations

import email.message
import math
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from easel.producer.api.security import INVALID_KEY, MISSING_KEY, Principal
from easel.producer.api.state import ApiState

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="job id (32 hex characters)")]


def get_api(request: Request) -> ApiState:
    return request.app.state.api


ApiDep = Annotated[ApiState, Depends(get_api)]

bearer = HTTPBearer(auto_error=False, description="An API key; the server stores only its sha256.")


def authenticate(request: Request, api: ApiDep,
                 creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Principal:
    """The caller named by the bearer key; 401 without a known key."""
    if creds is None:
        api.metrics.refused.labels("unauthenticated").inc()
        raise HTTPException(401, MISSING_KEY[0], headers=MISSING_KEY[1])
    p = api.keys.lookup(creds.credentials)
    if p is None:
        api.metrics.refused.labels("invalid_key").inc()
        raise HTTPException(401, INVALID_KEY[0], headers=INVALID_KEY[1])
    request.state.principal = p
    return p


# Set in the request's scope state by the body limit, which spends the request's token
# before its body is read (``limits.BodyLimit``): the route's dependency must not spend another.
RATE_CHECKED = "easel_rate_checked"


def over_rate(api: ApiState, p: Principal) -> HTTPException | None:
    """The 429 for a request its key's token bucket (shared by every replica, in Redis) does
    not allow; None when it does (a token spent)."""
    d = api.limiter.hit(p)
    if d.allowed:
        return None
    api.metrics.refused.labels("rate_limited").inc()
    wait = max(1, math.ceil(d.retry_after_s))
    return HTTPException(429, f"rate limit exceeded for key {p.name!r}: {p.rate_per_min:g} requests/minute "
                              f"(burst {p.burst}); retry in {wait}s",
                         headers={"Retry-After": str(wait), "X-RateLimit-Limit": f"{p.rate_per_min:g}/min",
                                  "X-RateLimit-Remaining": "0"})


def rate_limited(request: Request, api: ApiDep, p: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """The caller, once its token bucket allowed this request (before its body, if it has one)."""
    if getattr(request.state, RATE_CHECKED, None) == p.name:
        return p
    refusal = over_rate(api, p)
    if refusal is not None:
        raise refusal
    return p


Caller = Annotated[Principal, Depends(rate_limited)]


def owned_job(job_id: JobId, p: Caller, api: ApiDep) -> str:
    """A job the caller may see (its own; any, for an admin key); 404 otherwise, so ids of other
    tenants' jobs cannot be probed."""
    api.owned(job_id, p)
    return job_id


OwnedJob = Annotated[str, Depends(owned_job)]


def _media_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    if not value:
        return None
    msg = email.message.Message()
    msg["content-type"] = value
    return msg.get_content_type()


async def json_content(request: Request) -> None:
    """415 for a body that is not JSON. FastAPI would read such a body as a string and answer
    422; the media type is the client's real mistake."""
    if not await request.body():
        return  # no body at all: a validation error (422 naming the missing body)
    mt = _media_type(request)
    if mt is None or not (mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))):
        raise HTTPException(415, f"send the body as JSON with 'Content-Type: application/json' (got {mt or 'none'})")


def multipart_content(request: Request) -> None:
    """415 for anything but a multipart form (FastAPI would otherwise report the file missing)."""
    mt = _media_type(request)
    if mt != "multipart/form-data":
        raise HTTPException(415, "send the image as a multipart/form-data field named 'file' "
                                 f"(got Content-Type {mt or 'none'})")
