"""A job as server-sent events, fed by the job's Redis pub/sub channel.

An async route: it waits on pub/sub without holding a thread. Blocking reads of the job
record go to the thread pool.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import aclosing
from typing import Any

import redis
from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from easel.producer.api.deps import ApiDep, Caller, OwnedJob
from easel.producer.api.errors import problems
from easel.producer.api.state import ApiState
from easel.shared.quiet import QuietCheck
from easel.shared.schema import JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Pub/sub is fire-and-forget: the record is re-read this often so a lost message cannot
# leave a stream open after its job ended.
RECHECK_S = 5.0
REDIS_AWAY_WAIT_S = 1.0  # between tries while Redis is away


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
    """(event, data) pairs until the job ends or the stream reaches EASEL_API_SSE_MAX_S. A
    Redis that goes away is waited out: the pub/sub connection reconnects (subscribed again)
    and the record is re-read, so a stream outlives a restart or a failover; a connection
    gone silent is dropped (``shared.quiet``) and the next read connects again."""
    try:
        snap = await run_in_threadpool(api.render, job_id)
    except KeyError:  # expired since the ownership check: the stream has started, so it just ends
        return
    if snap.state.terminal:
        yield "done", snap
        return
    yield "status", snap
    now = time.monotonic()
    deadline, last_check, quiet = now + api.s.api_sse_max_s, now, QuietCheck()
    while time.monotonic() < deadline:
        try:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if (todo := quiet.after_read(msg is not None)) == "dead":
                await pubsub.connection.disconnect(nowait=True)  # (a TLS close would wait for an answer)
                raise redis.ConnectionError(f"no word from Redis in {quiet.silence_s():.0f} s")
            if todo == "ping":
                await pubsub.ping()
        except (redis.ConnectionError, redis.TimeoutError):
            await asyncio.sleep(REDIS_AWAY_WAIT_S)  # the next read reconnects; missed events: re-read
            msg, last_check, quiet = None, 0.0, QuietCheck()
        if msg is not None and msg["type"] == "message":
            ev = json.loads(msg["data"])
            if "state" not in ev:  # (the re-read below still runs: steady progress cannot put it off)
                yield "progress", ev
            elif JobState(ev["state"]).terminal:
                if "step" in ev:  # the last step: workers throttle progress, the final state carries it
                    yield "progress", {k: ev[k] for k in ("stage", "step", "total_steps") if k in ev}
                try:
                    yield "done", await run_in_threadpool(api.render, job_id)
                    return
                except redis.RedisError:  # away: the re-read below says it once Redis is back
                    last_check = 0.0
                except KeyError:  # expired meanwhile
                    return
            else:
                yield "state", {k: ev[k] for k in ("state", "segment", "worker", "updated_at", "note") if k in ev}
        if time.monotonic() - last_check > RECHECK_S:
            last_check = time.monotonic()
            try:
                cur = await run_in_threadpool(api.render, job_id)
            except redis.RedisError:  # still away: try again at the next check
                continue
            except KeyError:  # the record expired while followed: nothing more to say
                return
            if cur.state.terminal:
                yield "done", cur
                return


async def stream_slot(p: Caller, api: ApiDep) -> AsyncIterator[None]:
    """Take a stream's slot, or refuse it past EASEL_API_SSE_MAX_STREAMS before the response
    starts: a proper 503 the client can retry, not a stream that breaks off. The last quarter
    of the slots is kept for keys holding less than a quarter, so one key cannot take them
    all (a stream holds its slot up to EASEL_API_SSE_MAX_S). After the key check: no key, a
    401. Checked and taken on the event loop with no await between, so streams opened at
    once cannot all pass the check; given back once the response has ended."""
    limit, held = api.s.api_sse_max_streams, api.sse_by_key[p.name]
    if api.sse_streams >= limit or (api.sse_streams >= limit * 3 / 4 and held >= limit / 4):
        raise HTTPException(503, f"this API process already serves {api.sse_streams} event streams, {held} of "
                                 "them this key's (EASEL_API_SSE_MAX_STREAMS); retry, or poll GET /v1/jobs/{id}",
                            headers={"Retry-After": "5"})
    api.sse_streams += 1
    api.sse_by_key[p.name] += 1
    api.metrics.sse_streams.inc()
    try:
        yield
    finally:
        api.sse_streams -= 1
        api.sse_by_key[p.name] -= 1
        api.metrics.sse_streams.dec()


@router.get("/{job_id}/events", operation_id="job_events", response_class=EventSourceResponse,
            dependencies=[Depends(stream_slot)],
            responses={200: {"description": "the job's events; the stream ends after `done` (or after "
                                            "EASEL_API_SSE_MAX_S: reconnect to go on following)",
                             "content": {"text/event-stream": {"itemSchema": SSE_ITEM_SCHEMA}}},
                       **problems(401, 404, 422, 429, 503)})
async def job_events(job_id: OwnedJob, api: ApiDep) -> AsyncIterable[ServerSentEvent]:
    """Server-sent events: `status` (snapshot) first, then `progress` (denoising steps) and
    `state` (transitions), and finally `done` with the finished job; then the stream ends."""
    pubsub = api.aredis.pubsub()
    try:
        await pubsub.subscribe(api.store.events_channel(job_id))  # before the snapshot: nothing falls between
        async with aclosing(_follow(api, job_id, pubsub)) as events:
            n = 0
            async for name, data in events:
                n += 1
                yield ServerSentEvent(event=name, data=data, id=str(n))
    finally:
        # Closing disconnects, unsubscribed or not, and gives the connection back to the pool
        # even while Redis is away (an unsubscribe first would raise then, and keep it).
        await asyncio.shield(_close(pubsub))


async def _close(pubsub) -> None:
    try:
        await pubsub.aclose()
    except (redis.RedisError, OSError, RuntimeError):
        pass
