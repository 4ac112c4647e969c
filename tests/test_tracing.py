"""OpenTelemetry tracing (the ``tracing`` extra, ``shared/tracing.py``): one trace per job, from
the producer's submit through every worker segment to the finish, and nothing at all when off."""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, WorkerProc, img2img_job

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from easel.shared import tracing  # noqa: E402

PREFIX = "trace"  # a queue prefix of its own: only this module's workers take its jobs


@pytest.fixture
def memory_spans():
    """The test process (the producer) traced into an in-memory exporter; off again after."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.disable()


def _from_memory(s: ReadableSpan) -> dict:
    return {"name": s.name, "trace": f"{s.context.trace_id:032x}", "id": f"{s.context.span_id:016x}",
            "parent": f"{s.parent.span_id:016x}" if s.parent else None, "attrs": dict(s.attributes or {}),
            "service": s.resource.attributes.get("service.name"), "start": s.start_time, "end": s.end_time,
            "links": [f"{link.context.trace_id:032x}" for link in s.links]}


def _from_json(line: str) -> dict:
    """A span as the file exporter (ReadableSpan.to_json) writes it."""
    d = json.loads(line)
    return {"name": d["name"], "trace": d["context"]["trace_id"][2:], "id": d["context"]["span_id"][2:],
            "parent": d["parent_id"][2:] if d["parent_id"] else None, "attrs": d["attributes"],
            "service": d["resource"]["attributes"].get("service.name"), "status": d["status"]["status_code"],
            "start": d["start_time"], "end": d["end_time"]}


def _file_spans(path: Path) -> list[dict]:
    """The spans whole in the file: a worker may be appending the last line as it is read."""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [_from_json(line) for line in lines if line.strip()]


def _wait_for_segments(path: Path, want: dict[str, int], timeout: float = 30.0) -> list[dict]:
    """The worker spans once each job has ``want[job]`` ended segment spans (a finish may end
    just after the job's state is written)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = _file_spans(path)
        ended = {j: sum(1 for s in spans if s["name"] == "easel.segment" and s["attrs"].get("easel.job_id") == j)
                 for j in want}
        if ended == want or time.monotonic() > deadline:
            assert ended == want, ended
            return spans
        time.sleep(0.1)


def _one_tree(spans: list[dict]) -> dict:
    """The spans of one trace form one tree; returns its root."""
    ids = {s["id"] for s in spans}
    roots = [s for s in spans if s["parent"] is None]
    assert len(roots) == 1, [(s["name"], s["parent"]) for s in roots]
    orphans = [s["name"] for s in spans if s["parent"] is not None and s["parent"] not in ids]
    assert not orphans, orphans
    return roots[0]


def _children(spans: list[dict], parent: dict, name: str | None = None) -> list[dict]:
    return [s for s in spans if s["parent"] == parent["id"] and (name is None or s["name"] == name)]


@pytest.fixture(scope="module")
def traced_workers(easel_env, tmp_path_factory):
    """sd15 and kandinsky22 workers that write their spans as JSON lines to one file."""
    tmp = tmp_path_factory.mktemp("tracing")
    path = tmp / "worker-spans.jsonl"
    env = {**easel_env, "EASEL_QUEUE_PREFIX": PREFIX, "EASEL_TRACING": "file", "EASEL_TRACING_FILE": str(path)}
    workers = [WorkerProc(family, env, tmp).start(wait=False) for family in ("sd15", "kandinsky22")]
    for w in workers:
        w.wait_ready()
    yield path, {w.family: w for w in workers}
    for w in workers:
        w.stop()


def test_one_trace_per_job_from_submit_through_hand_off_to_finish(traced_workers, memory_spans, input_png):
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    path, workers = traced_workers
    c = EaselClient(Settings(queue_prefix=PREFIX))
    one = c.submit(img2img_job(str(input_png)))
    chain = c.submit({"input": {"image": str(input_png)},
                      "stages": [{"model": "sd15", "prompt": "astronaut", "steps": 3, "seed": 1},
                                 {"model": "kandinsky-2-2", "prompt": "astronaut", "steps": 3, "seed": 2}]})
    many = c.submit_many([img2img_job(str(input_png), seed=s) for s in (11, 12)])
    for job_id in [one, chain, *many]:
        assert c.wait(job_id, timeout=180).state.value == "succeeded"
    _, plan = c.store.load(chain)
    assert [s.family for s in plan.segments] == ["sd15", "kandinsky22"]

    producer = [_from_memory(s) for s in memory_spans.get_finished_spans()]
    worker = _wait_for_segments(path, {one: 1, chain: 2, many[0]: 1, many[1]: 1})
    assert {s["service"] for s in worker} == {"easel-worker"}
    everything = producer + worker

    def trace_of(job_id: str) -> tuple[dict, list[dict]]:
        """The job's submit span (the root) and every span of its trace."""
        (submit,) = [s for s in producer if s["name"] == "easel.submit" and s["attrs"].get("easel.job_id") == job_id]
        spans = [s for s in everything if s["trace"] == submit["trace"]]
        # Every span that names the job is in its one trace.
        assert {s["trace"] for s in everything if s["attrs"].get("easel.job_id") == job_id} == {submit["trace"]}
        assert _one_tree(spans) is submit
        return submit, spans

    # A one-stage job: submit -> enqueue -> (message) -> queue wait, segment -> claim, inputs, stage, finish.
    submit, spans = trace_of(one)
    assert sorted(s["name"] for s in spans) == sorted([
        "easel.submit", "easel.enqueue", "easel.queue_wait", "easel.segment", "easel.claim", "easel.inputs",
        "easel.stage", "easel.finish"])
    (enqueue,) = _children(spans, submit, "easel.enqueue")
    (segment,) = _children(spans, enqueue, "easel.segment")
    (wait,) = _children(spans, enqueue, "easel.queue_wait")
    assert segment["attrs"]["easel.outcome"] == "succeeded" and segment["attrs"]["easel.segment"] == 0
    assert segment["attrs"]["easel.worker"] == workers["sd15"].hostname
    assert wait["end"] == segment["start"]  # the wait ends as the claim starts
    assert sorted(s["name"] for s in _children(spans, segment)) == [
        "easel.claim", "easel.finish", "easel.inputs", "easel.stage"]
    (stage,) = _children(spans, segment, "easel.stage")
    assert stage["attrs"]["easel.model"] == "sd15" and stage["attrs"]["easel.steps"] == 4
    assert all(s["status"] != "ERROR" for s in spans if "status" in s)

    # A chain over two families: the second segment's message carries the hand-off's context.
    t_one = submit["trace"]
    submit, spans = trace_of(chain)
    t_chain = submit["trace"]
    assert t_chain != t_one
    segments = sorted((s for s in spans if s["name"] == "easel.segment"), key=lambda s: s["attrs"]["easel.segment"])
    assert [s["attrs"]["easel.outcome"] for s in segments] == ["handed-off", "succeeded"]
    assert [s["attrs"]["easel.worker"] for s in segments] == [workers["sd15"].hostname,
                                                               workers["kandinsky22"].hostname]
    (hand_off,) = _children(spans, segments[0], "easel.hand_off")
    assert hand_off["attrs"]["messaging.destination.name"] == f"{PREFIX}.kandinsky22"
    assert _children(spans, hand_off, "easel.segment") == [segments[1]]
    assert len(_children(spans, hand_off, "easel.queue_wait")) == 1
    assert [s["attrs"]["easel.model"] for s in sorted(
        (s for s in spans if s["name"] == "easel.stage"), key=lambda s: s["attrs"]["easel.stage"])] == [
        "sd15", "kandinsky-2-2"]
    assert not _children(spans, segments[0], "easel.finish")
    assert len(_children(spans, segments[1], "easel.finish")) == 1

    # submit_many: a trace per job, each linked to the one submit_many span.
    (call,) = [s for s in producer if s["name"] == "easel.submit_many"]
    traces = [trace_of(job_id) for job_id in many]
    assert len({submit["trace"] for submit, _ in traces} | {call["trace"], t_one, t_chain}) == 5
    for submit, spans in traces:
        assert submit["links"] == [call["trace"]]
        (segment,) = _children(spans, submit, "easel.segment")
        assert segment["attrs"]["easel.outcome"] == "succeeded"


def test_a_retry_carries_its_jobs_trace_and_a_hand_off_its_own_span(memory_spans):
    """Messages sent for a job that runs here carry its trace: a hand-off sent inside its
    span, a retry sent from an error handler (no span of the job current) the segment's."""
    from opentelemetry import propagate, trace

    with tracing.span("easel.submit"):
        carrier = tracing.headers()
    sent_at = carrier[tracing.SENT_AT]
    job = tracing.delivery({**carrier, tracing.SENT_AT: sent_at + 3600}, "j1", 0, "q", "w", tracing.clock())
    job.activate()
    retry = tracing.headers("j1")
    with job.span("easel.hand_off"):
        hand_off = tracing.headers("j1")
        current = trace.get_current_span().get_span_context()
    job.end("handed-off")
    assert "j1" not in tracing._active  # ended: messages sent now carry the current context
    spans = {s.name: s for s in memory_spans.get_finished_spans()}
    segment = spans["easel.segment"]

    def parent_of(c: dict):
        return trace.get_current_span(propagate.extract(c)).get_span_context()

    assert parent_of(retry).trace_id == parent_of(hand_off).trace_id == spans["easel.submit"].context.trace_id
    assert parent_of(retry).span_id == segment.context.span_id
    assert parent_of(hand_off).span_id == current.span_id == spans["easel.hand_off"].context.span_id
    # A sender's clock ahead of the worker's gives an empty wait, never a negative one.
    assert spans["easel.queue_wait"].start_time == spans["easel.queue_wait"].end_time == segment.start_time
    assert segment.attributes["easel.queue_wait_ms"] == 0
    assert segment.attributes["easel.outcome"] == "handed-off"


def test_a_message_without_a_trace_context_is_one_trace_rooted_at_its_segment(memory_spans):
    """A job that kept no context (submitted with tracing off), sent on its behalf by a
    dispatch or a reaper: the message carries the send time but not the sender's span, and
    the delivery is one trace rooted at its segment span, which holds the wait (a queue-wait
    span there would be a trace of its own)."""
    with tracing.span("easel.reaper_pass"):  # the sender's own span: not the job's
        headers = tracing.headers_from(None)
    assert set(headers) == {tracing.SENT_AT}
    start_ns = tracing.clock()
    job = tracing.delivery({tracing.SENT_AT: start_ns / 1e9 - 0.25}, "j2", 0, "q", "w", start_ns)
    with job.span("easel.claim"):
        pass
    job.end("succeeded")
    spans = [s for s in memory_spans.get_finished_spans() if s.name != "easel.reaper_pass"]
    assert sorted(s.name for s in spans) == ["easel.claim", "easel.segment"]
    segment = next(s for s in spans if s.name == "easel.segment")
    assert segment.parent is None
    assert {s.context.trace_id for s in spans} == {segment.context.trace_id}
    assert 249 <= segment.attributes["easel.queue_wait_ms"] <= 251


def test_a_reaper_resends_a_delivery_in_its_jobs_trace(easel_env, memory_spans, input_png):
    """A delivery a reaper sends again (here a queued job whose message was lost) carries the
    trace context its submitter kept in the record, not the reaper's own: the new delivery's
    spans join the job's one trace under its submit span."""
    from opentelemetry import propagate, trace

    from easel.producer.client import EaselClient
    from easel.shared.celery_app import send_segment
    from easel.shared.liveness import Reaper
    from easel.shared.metrics import priority_lists
    from easel.shared.schema import JobState
    from easel.shared.settings import Settings

    c = EaselClient(Settings(queue_prefix="trace-reap"))  # no worker serves this prefix
    spec, plan = c.prepare_and_plan(img2img_job(str(input_png)))  # the input uploaded
    queue = plan.segments[0].queue
    with tracing.span("easel.submit"):
        job_id, _ = c.store.create(spec, plan, trace=tracing.carrier())
    c.store.mark_queued(job_id, queue, spec.priority)  # waiting, its message nowhere
    lists = [name for _, name in priority_lists(queue)]
    reaper = Reaper(c.store, lambda *a, **kw: send_segment(c.celery, *a, **kw), every_s=0.2, ttl_s=0.2,
                    queues=[queue])
    try:
        time.sleep(0.5)
        with tracing.span("easel.reaper_pass"):  # a span of the reaper's own, not the job's
            assert reaper.sweep_lost(queue) == [job_id]
        (raw,) = [m for name in lists for m in c.store.r.lrange(name, 0, -1)]
        headers = json.loads(raw)["headers"]
        assert headers["task"] == "easel.run_segment"
        parent = trace.get_current_span(propagate.extract(headers)).get_span_context()
        spans = {s.name: s for s in memory_spans.get_finished_spans()}
        assert parent.trace_id == spans["easel.submit"].context.trace_id != spans["easel.reaper_pass"].context.trace_id
        assert parent.span_id == spans["easel.submit"].context.span_id
        assert tracing.SENT_AT in headers
    finally:
        c.store.r.delete(*lists)
        c.store.transition(job_id, JobState.cancelled, error="test over")


def test_without_the_extra_tracing_off_costs_nothing_and_on_names_the_extra(easel_env):
    """opentelemetry made unimportable (a base install): off by default, every helper is the
    shared no-op and messages get no headers; turned on, the process refuses naming the extra."""
    code = """
import sys

class NoOtel:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoOtel())
from easel.shared import tracing
from easel.shared.settings import Settings
from easel.producer.client import EaselClient
import easel.worker.engine, easel.worker.tasks
EaselClient()
assert tracing._tracer is None
assert tracing.headers("j") is None
assert tracing.span("x") is tracing.NO_SPAN and tracing.clock() is None
assert tracing.delivery(None, "j", 0, "q", "w", tracing.clock()) is tracing.NO_JOB_TRACE
assert tracing.group([tracing.NO_JOB_TRACE], "x") is tracing.NO_SPAN
try:
    tracing.setup(Settings(tracing="console"))
except RuntimeError as e:
    assert "pip install '.[tracing]' in an easel checkout" in str(e), e
else:
    raise AssertionError("tracing on without opentelemetry")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASEL_TRACING", "OTEL_"))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_otlp_mode_exports_over_http(tmp_path):
    """EASEL_TRACING=otlp sends the spans to OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/HTTP, protobuf)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    bodies: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = """
from easel.shared import tracing
from easel.shared.settings import Settings
assert tracing.setup(Settings(), "easel-producer")
with tracing.span("easel.submit", {"easel.job_id": "abc"}):
    pass
tracing.shutdown()
"""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, "EASEL_TRACING": "otlp",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=120)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p for p, _ in bodies] == ["/v1/traces"]
    req = ExportTraceServiceRequest.FromString(bodies[0][1])
    (rs,) = req.resource_spans
    assert {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"] == "easel-producer"
    (span,) = [s for ss in rs.scope_spans for s in ss.spans]
    assert span.name == "easel.submit"
    assert {a.key: a.value.string_value for a in span.attributes} == {"easel.job_id": "abc"}


def test_a_micro_batch_shows_in_each_jobs_own_trace(easel_env, memory_spans, input_png, tmp_path):
    """Jobs that share a pipeline call keep a trace each (their headers come through
    celery-batches), each with a stage span of the shared call."""
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    c = EaselClient(Settings(queue_prefix=PREFIX))
    ids = c.submit_many([img2img_job(str(input_png), model="sd15-wide", seed=500 + i) for i in range(3)])
    path = tmp_path / "spans.jsonl"
    w = WorkerProc("sd15-wide", {**easel_env, "EASEL_QUEUE_PREFIX": PREFIX, "EASEL_BATCH_SIZE": "3",
                                 "EASEL_BATCH_WAIT_S": "0.5", "EASEL_TRACING": "file",
                                 "EASEL_TRACING_FILE": str(path)}, tmp_path).start()
    try:
        assert all(c.wait(j, timeout=180).state.value == "succeeded" for j in ids)
        worker = _wait_for_segments(path, {j: 1 for j in ids})
    finally:
        w.stop()
    submits = {s.attributes["easel.job_id"]: _from_memory(s) for s in memory_spans.get_finished_spans()
               if s.name == "easel.submit"}
    stages = []
    for j in ids:
        spans = [submits[j]] + [s for s in worker if s["trace"] == submits[j]["trace"]]
        _one_tree(spans)
        (stage,) = [s for s in spans if s["name"] == "easel.stage"]
        (claim,) = [s for s in spans if s["name"] == "easel.claim"]
        assert stage["attrs"]["easel.batch_size"] == 3 and claim["attrs"]["easel.batch_size"] == 3
        stages.append(stage)
    assert len({(s["start"], s["end"]) for s in stages}) == 1  # one call, the same span in three traces
