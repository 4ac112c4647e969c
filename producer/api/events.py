"""A job as server-sent events, fed by the job's Redis pub/sub channel.

The only async route: it waits on pub/sub without holding a thread. Blocking reads of the
job record go to the thread pool.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import aclosing
from typing import Any

import redis
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from easel.producer.api.deps import ApiDep, OwnedJob
from easel.producer.api.errors import problems
from easel.producer.api.state import ApiState
from easel.shared.schema import JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Pub/sub is fire-and-forget: the record is re-read this often so a lost message cannot
# leave a stream open after its job ended.
RECHECK_S = 5.0


def _event_doc(name: str, schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "properties": {
        "event": {"const": name},
        "data": {"contentSchema": {"$ref": f"#/components/schemas/{schema}"}}}}


# Each event of the stream (Open API 3.2 `itemSchema`); `data` is JSON text.
SSE_ITEM_SCHEMA = {
    "type": "object", "required": ["event", "data", "id"],
    "properties": {"event": {"type": "string", "enum": ["status", "progress", "state", "done"]},
                   "data": {"type": "string", "contentMediaType": "application/json"},
                   "id": {"type": "string", "description": "1, 2, 3... within this stream"}},
    "oneOf": [_event_doc("status", "JobResponse", "first: the job as GET /v1/jobs/{id} shows it"),
              _event_doc("progress", "ProgressEvent", "a denoising step"),
              _event_doc("state", "StateEvent", "a transition that does not end the job"),
              _event_doc("done", "JobResponse", "last: the finished job; then the stream ends")],
}


async def _follow(api: ApiState, job_id: str, pubsub) -> AsyncIterator[tuple[str, Any]]:
    """(event, data) pairs until the job ends or the stream reaches EASEL_API_SSE_MAX_S."""
    snap = await run_in_threadpool(api.render, job_id)
    if snap.state.terminal:
        yield "done", snap
        return
    yield "status", snap
    now = time.monotonic()
    deadline, last_check = now + api.s.api_sse_max_s, now
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if msg is not None:
            ev = json.loads(msg["data"])
            if "state" not in ev:
                yield "progress", ev
                continue
            if JobState(ev["state"]).terminal:
                if "step" in ev:  # the last step: workers throttle progress, the final state carries it
                    yield "progress", {k: ev[k] for k in ("stage", "step", "total_steps") if k in ev}
                yield "done", await run_in_threadpool(api.render, job_id)
                return
            yield "state", {k: ev[k] for k in ("state", "segment", "worker", "updated_at") if k in ev}
        if time.monotonic() - last_check > RECHECK_S:
            last_check = time.monotonic()
            cur = await run_in_threadpool(api.render, job_id)
            if cur.state.terminal:
                yield "done", cur
                return


@router.get("/{job_id}/events", operation_id="job_events", response_class=EventSourceResponse,
            responses={200: {"description": "the job's events; the stream ends after `done` (or after "
                                            "EASEL_API_SSE_MAX_S: reconnect to go on following)",
                             "content": {"text/event-stream": {"itemSchema": SSE_ITEM_SCHEMA}}},
                       **problems(401, 404, 422, 429, 503)})
async def job_events(job_id: OwnedJob, api: ApiDep) -> AsyncIterable[ServerSentEvent]:
    """Server-sent events: `status` (snapshot) first, then `progress` (denoising steps) and
    `state` (transitions), and finally `done` with the finished job; then the stream ends."""
    channel = api.store.events_channel(job_id)
    pubsub = api.aredis.pubsub()
    await pubsub.subscribe(channel)  # before the snapshot: nothing falls between the two
    api.metrics.sse_streams.inc()
    try:
        async with aclosing(_follow(api, job_id, pubsub)) as events:
            n = 0
            async for name, data in events:
                n += 1
                yield ServerSentEvent(event=name, data=data, id=str(n))
    finally:
        api.metrics.sse_streams.dec()
        try:
            await pubsub.unsubscribe(channel)
            await pubsub.aclose()
        except (redis.RedisError, asyncio.CancelledError, RuntimeError):
            pass
