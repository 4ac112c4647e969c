"""Jobs: create (with idempotency keys, per-key in-flight caps and webhooks), read, cancel."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Header, HTTPException, Response

from easel.producer.api.deps import ApiDep, Caller, OwnedJob, json_content
from easel.producer.api.errors import problems
from easel.producer.api.models import JobRequest, JobResponse
from easel.producer.api.security import Principal
from easel.producer.api.state import ApiState
from easel.producer.client import SubmitError, SubmitUnavailable
from easel.shared.images import InputError, Unresolved, check_public_url
from easel.shared.schema import JobSpec

log = logging.getLogger("easel.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_JOB_LINKS = {
    "GetJob": {"operationId": "get_job", "parameters": {"path.job_id": "$response.body#/id"},
               "description": "the job's state and, once it succeeded, its images"},
    "CancelJob": {"operationId": "cancel_job", "parameters": {"path.job_id": "$response.body#/id"},
                  "description": "cancel the job"},
    "FollowJob": {"operationId": "job_events", "parameters": {"path.job_id": "$response.body#/id"},
                  "description": "follow the job as server-sent events"},
}
_LOCATION = {"Location": {"description": "the job's path, /v1/jobs/{id}", "required": True,
                          "schema": {"type": "string"}}}
_RETRY_SOON = {"Retry-After": "5"}
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=150,
                                              description="same key from the same API key: the same job")]


def _namespaced(spec: JobSpec, header_key: str | None, p: Principal) -> JobSpec:
    """The key's name is the job's fair-share tenant (an admin key may name another), and
    idempotency keys are per API key: one tenant's key never resolves to another's job."""
    if spec.tenant and spec.tenant != p.name and not p.key.admin:
        raise HTTPException(422, "tenant: only an admin key may submit for another tenant; leave it unset")
    update: dict = {"tenant": spec.tenant or p.name}
    key = spec.idempotency_key or header_key
    if key:
        ns = f"{p.name}/{key}"
        if len(ns) > 200:
            ns = f"{p.name}/sha256:{hashlib.sha256(key.encode()).hexdigest()}"
        update["idempotency_key"] = ns
    return spec.model_copy(update=update)


def _replayed(api: ApiState, spec: JobSpec, p: Principal) -> str | None:
    """The job this key's idempotency key created before, if any. Looked up before any check:
    a retry must get its job even while the checks of a new one would fail (a DNS or S3 blip)."""
    job_id = api.store.idempotent_job(spec)
    return job_id if job_id is not None and api.store.owner(job_id) == p.name else None


def _mend(api: ApiState, job_id: str, url: str | None, p: Principal) -> None:
    """What the request that created a replayed job did once the job was queued, done again
    in case its reply was lost (a 503 after the job was queued, then a retry): the job's
    place under the key's in-flight cap, and its webhook. Neither is made twice: a place is
    a set member, and a job with a webhook keeps it as it is."""
    if p.key.over_cap != "hold":
        api.inflight.adopt(p.name, job_id)
    if url and api.secret_for(p.name) and not api.store.webhook_target(job_id)[0] and _mendable(api, url):
        api.dispatcher.register(job_id, url, p.key.webhook_events)


def _mendable(api: ApiState, url: str) -> bool:
    """A replay's webhook URL passes the check a new job's must: one that fails it was not
    the first request's (that one would have been refused), so it is not added. A name that
    does not resolve now is added: each delivery checks its address again."""
    try:
        check_public_url(url, api.s, what="webhook")
    except Unresolved:
        return True
    except InputError as e:  # the URL may carry a token: its host and the reason only
        log.warning("a replayed request's webhook_url (host %s) is not added: %s",
                    (urlsplit(url).hostname or "?")[:100], e)
        return False
    return True


def _check_webhook(api: ApiState, url: str, p: Principal) -> None:
    if not api.secret_for(p.name):
        raise HTTPException(422, "webhook_url: this server has no webhook secret (EASEL_WEBHOOK_SECRET)")
    try:
        check_public_url(url, api.s, what="webhook")
    except Unresolved as e:
        raise HTTPException(503, f"webhook_url: {e}; retry later", headers=_RETRY_SOON) from None
    except InputError as e:
        raise HTTPException(422, f"webhook_url: {e}") from None


def _refused(api: ApiState, e: SubmitError) -> HTTPException:
    """422 for a refused job; 503 + Retry-After when it was refused for now (a host name that
    did not resolve may resolve in a moment)."""
    if isinstance(e, SubmitUnavailable):
        return HTTPException(503, f"{e}; retry later", headers=_RETRY_SOON)
    api.metrics.refused.labels("invalid_job").inc()
    return HTTPException(422, str(e))


def _submit(api: ApiState, spec: JobSpec, p: Principal) -> tuple[str, bool, str | None]:
    """Queue the job within the key's in-flight cap: (job id, created, reservation token). A
    key that holds jobs back over its cap (over_cap: hold) is capped at dispatch instead (no
    token). created is False for a job this key's idempotency key created before."""
    if p.key.over_cap == "hold":
        try:
            return *api.client.submit_as(spec, p.name), None
        except SubmitError as e:
            raise _refused(api, e) from None
    token, n = api.inflight.reserve(p)
    if token is None:
        replay = _replayed(api, spec, p)  # created since create_job looked: already counted
        if replay is not None:
            return replay, False, None
        api.metrics.refused.labels("in_flight_cap").inc()
        raise HTTPException(429, f"key {p.name!r} already has {n} jobs queued or running, its cap is "
                                 f"{p.max_in_flight}; wait for some to finish or cancel some",
                            headers={"Retry-After": "10"})
    try:
        return *api.client.submit_as(spec, p.name), token
    except SubmitError as e:
        api.inflight.release(p.name, token)
        raise _refused(api, e) from None
    except BaseException:
        api.inflight.release(p.name, token)
        raise


@router.post("", status_code=201, operation_id="create_job", dependencies=[Depends(json_content)],
             responses={201: {"description": "the job was queued", "headers": _LOCATION, "links": _JOB_LINKS},
                        200: {"model": JobResponse, "headers": _LOCATION, "links": _JOB_LINKS,
                              "description": "idempotent replay: the job this idempotency key created before"},
                        **problems(400, 401, 409, 413, 415, 422, 429, 503, _422="job refused; `detail` says why",
                                   _503="Redis, the message broker or object storage is unreachable or failing, "
                                        "or an image or webhook URL's host name does not resolve now")})
def create_job(body: JobRequest, response: Response, p: Caller, api: ApiDep,
               idempotency_key: IdempotencyKey = None) -> JobResponse:
    """Queue a job. Same idempotency key (body or header) from the same API key: the same job."""
    spec = _namespaced(body.spec(), idempotency_key, p)
    url = str(body.webhook_url) if body.webhook_url else None
    replay = _replayed(api, spec, p)
    if replay is not None:
        _mend(api, replay, url, p)
        response.status_code = 200
        response.headers["Location"] = f"/v1/jobs/{replay}"
        return api.render(replay)
    api.check_refs(spec, p)
    if url:
        _check_webhook(api, url, p)
    job_id, created, token = _submit(api, spec, p)
    if created:
        if token:
            api.inflight.commit(p.name, token, job_id)
        if url:
            api.dispatcher.register(job_id, url, p.key.webhook_events)
        api.metrics.submitted.labels(p.name).inc()
    else:  # a concurrent request with this idempotency key created it, or a job of another owner holds it
        if token:
            api.inflight.release(p.name, token)
        if api.store.owner(job_id) != p.name:
            raise HTTPException(409, "idempotency key: a job not submitted with this API key already uses it; "
                                     "choose another key")
        _mend(api, job_id, url, p)
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return api.render(job_id)


@contextmanager
def _while_it_exists(api: ApiState, job_id: str) -> Iterator[None]:
    """A record that expires (or is deleted) after the ownership check makes the store raise
    KeyError: that job is gone, a 404 as a moment later. A KeyError while the record is still
    there is a fault of the server's, and stays one."""
    try:
        yield
    except KeyError:
        if api.store.exists(job_id):
            raise
        raise HTTPException(404, f"no job {job_id}") from None


@router.get("/{job_id}", operation_id="get_job", responses=problems(401, 404, 422, 429, 503))
def get_job(job_id: OwnedJob, api: ApiDep) -> JobResponse:
    """A job's state and progress; when it succeeded, presigned URLs for its images and manifest."""
    with _while_it_exists(api, job_id):
        return api.render(job_id)


@router.delete("/{job_id}", operation_id="cancel_job", responses=problems(401, 404, 422, 429, 503))
def cancel_job(job_id: OwnedJob, api: ApiDep) -> JobResponse:
    """Cancel: a queued job ends at once, a running one within one denoising step. The job stays
    readable (state `cancelled`) until it expires, like any finished job."""
    with _while_it_exists(api, job_id):
        api.client.cancel(job_id)
        return api.render(job_id)
