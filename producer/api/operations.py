"""Operations: queue depths, liveness and readiness probes, Prometheus metrics."""
from __future__ import annotations

import logging

import botocore.exceptions
import redis
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from easel.producer.api.deps import ApiDep, Caller
from easel.producer.api.errors import problems
from easel.producer.api.models import Health, QueueOut
from easel.producer.api.state import ApiState
from easel.shared.celery_app import queue_name
from easel.shared.metrics import queue_depths
from easel.shared.storage import bucket_lookup_answered

log = logging.getLogger("easel.api")
router = APIRouter(tags=["operations"])


@router.get("/v1/queues", operation_id="list_queues", responses=problems(401, 429, 503))
def queues(p: Caller, api: ApiDep) -> list[QueueOut]:
    """What waits per family (broker messages per priority, and jobs pending their tenant's
    turn) and its live workers."""
    prefix = api.s.queue_prefix
    depths = queue_depths(api.r, api.families, prefix)
    live = api.store.live_instances(list(depths))
    return [QueueOut(family=f, queue=queue_name(f, prefix), waiting=d.messages + d.pending, messages=d.messages,
                     pending=d.pending, by_priority={str(k): v for k, v in d.by_priority.items()},
                     workers=live.get(f, 0))
            for f, d in depths.items()]


# Async, answered on the event loop: a sync route waits for a thread of the pool, which
# requests stalled on Redis can all hold, and the probe would then fail all the same.
@router.get("/healthz", operation_id="healthz")
async def healthz() -> Health:
    """Liveness: the process answers. Never checks dependencies (a Redis blip must not restart pods)."""
    return Health(status="ok")


def _check_redis(api: ApiState) -> str:
    try:
        api.probe_redis.ping()
        return "ok"
    except redis.RedisError as e:
        return _failed("redis", e)


def _check_s3(api: ApiState) -> str:
    try:
        try:
            api.probe_s3.head_bucket(Bucket=api.s.s3_bucket)
        except botocore.exceptions.ClientError as e:
            if not bucket_lookup_answered(e):
                raise
            api.client.storage.ensure_bucket()  # S3 answered: a bucket ours to create, or not ours to look up
        return "ok"
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        return _failed("s3", e)


def _failed(check: str, e: Exception) -> str:
    """The check's answer names the kind of error only: /readyz is unauthenticated, and the
    error's text names internal hosts and ports. The log has it whole."""
    log.warning("readiness: %s check failed: %s", check, e)
    return f"error: {type(e).__name__}"


@router.get("/readyz", operation_id="readyz", response_model=Health,
            responses={503: {"model": Health, "description": "a dependency is unreachable; `checks` says which"}})
def readyz(api: ApiDep) -> JSONResponse:
    """Readiness: Redis answers PING and the bucket is reachable."""
    checks = {"redis": _check_redis(api), "s3": _check_s3(api)}
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(api: ApiDep) -> Response:
    return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)
