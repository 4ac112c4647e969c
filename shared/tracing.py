"""OpenTelemetry tracing of jobs (the optional ``tracing`` extra): one trace per job.

Off by default (``EASEL_TRACING=none``): opentelemetry is then never imported and every
call here is a no-op on a shared object. On, each job is one trace:

- producer: ``easel.submit`` (a child of the caller's current span, if any; ``submit_many``
  gives each job a root span of its own, linked to one ``easel.submit_many`` span) and
  ``easel.enqueue``; the message carries the trace context in its Celery headers
  (W3C ``traceparent``, through the configured propagators) and the time it was sent.
- worker, per delivery of a segment: ``easel.queue_wait`` (from the send to the claim;
  a retry's backoff included; also the segment's ``easel.queue_wait_ms``, the only record
  of the wait where the message carried no trace context), ``easel.segment`` (the whole
  delivery) and under it
  ``easel.claim``, ``easel.inputs``, one ``easel.stage`` per stage, then ``easel.hand_off``
  (whose context the next segment's message carries: the next family's spans join the same
  trace) or ``easel.finish`` (outputs, manifest, final state; on the finisher thread when
  finishes overlap the next job).

A delivery re-sent by a reaper (a dead worker's, or one whose message was lost) carries
the context its submitter kept in the job's record, so it joins the job's trace under the
submit span. A message without a context (from a producer with tracing off) starts a new
trace at the worker: its ``easel.segment`` is the root. ``EASEL_TRACING`` picks the exporter:
``console`` (JSON on stderr), ``file`` (JSON lines appended to ``EASEL_TRACING_FILE``, for
tests and debugging), ``otlp`` (OTLP over HTTP, configured by the standard
``OTEL_EXPORTER_OTLP_*`` variables) or ``global`` (whatever TracerProvider the process
set up: your application's, or ``opentelemetry-instrument``'s: the hook for any other
exporter). ``OTEL_SERVICE_NAME`` overrides the service names (``easel-producer``,
``easel-worker``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator

SENT_AT = "easel_sent_at"  # message header: when the message was sent (epoch seconds)

_UNSET = object()
_tracer: Any = _UNSET  # an opentelemetry Tracer, None (off), or _UNSET (not resolved yet)
_provider: Any = None  # the TracerProvider easel made (flushed by ``shutdown``), if any
_lock = threading.Lock()
_active: dict[str, list["JobTrace"]] = {}  # job id -> its deliveries open in this process, latest last


# -- setup -----------------------------------------------------------------------------
def setup(settings=None, service: str = "easel") -> bool:
    """Resolve tracing from the settings (``EASEL_TRACING``) unless already on; True if on.

    Called by the client and the worker process; anything else resolves lazily on first use
    from ``get_settings()``."""
    global _tracer, _provider
    with _lock:
        if _tracer is not _UNSET and _tracer is not None:
            return True
        if settings is None:
            from easel.shared.settings import get_settings

            settings = get_settings()
        mode = getattr(settings, "tracing", "none")
        if mode == "none":
            if _tracer is _UNSET:
                _tracer = None
            return False
        _tracer, _provider = _make_tracer(mode, settings, service)
        return True


def _make_tracer(mode: str, settings, service: str):
    try:
        from opentelemetry import trace
    except ImportError:
        raise RuntimeError(f"EASEL_TRACING={mode} needs the tracing extra: "
                           "pip install '.[tracing]' in an easel checkout") from None
    if mode == "global":
        return trace.get_tracer("easel"), None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attrs))
    if mode == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif mode == "file":
        if not getattr(settings, "tracing_file", None):
            raise RuntimeError("EASEL_TRACING=file needs EASEL_TRACING_FILE")
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(str(settings.tracing_file))))
    elif mode == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise RuntimeError("EASEL_TRACING=otlp needs opentelemetry-exporter-otlp-proto-http: "
                               "pip install '.[tracing]' in an easel checkout") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise RuntimeError(f"unknown EASEL_TRACING mode {mode!r}")
    return provider.get_tracer("easel"), provider


def install(provider) -> None:
    """Trace with ``provider`` (a TracerProvider) from now on, whatever the settings say:
    for tests and for applications that embed the client with a provider of their own."""
    global _tracer, _provider
    with _lock:
        _tracer, _provider = (provider.get_tracer("easel") if provider is not None else None), None


def disable() -> None:
    """Tracing off in this process (``install(None)``)."""
    install(None)


def shutdown() -> None:
    """Flush and close the provider easel made (a warm worker shutdown; atexit does it too)."""
    if _provider is not None:
        _provider.shutdown()


def _get():
    t = _tracer
    if t is _UNSET:
        setup()
        t = _tracer
    return t


def enabled() -> bool:
    return _get() is not None


# -- producer side ---------------------------------------------------------------------
class _NoSpan:
    """What every helper hands out while tracing is off."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_attribute(self, key, value) -> None:
        pass

    def set_attributes(self, attributes) -> None:
        pass


NO_SPAN = _NoSpan()


def span(name: str, attributes: dict | None = None, *, root: bool = False, producer: bool = False,
         links: Iterable = ()):
    """A span made current for a ``with`` block; ``root`` starts a new trace (links kept)."""
    t = _get()
    if t is None:
        return NO_SPAN
    from opentelemetry import context as otel_context, trace

    kind = trace.SpanKind.PRODUCER if producer else trace.SpanKind.INTERNAL
    links = [trace.Link(s.get_span_context()) for s in links if s is not NO_SPAN]
    return t.start_as_current_span(name, context=otel_context.Context() if root else None, kind=kind,
                                   attributes=_clean(attributes), links=links)


def headers(job_id: str | None = None) -> dict | None:
    """The Celery headers that carry the trace to the message's worker; None when off.

    The context is the current span's, unless a delivery of ``job_id`` runs in this
    process and the current span is not part of its trace (a retry sent from an error
    handler): then that delivery's segment span's."""
    if _get() is None:
        return None
    from opentelemetry import propagate, trace

    ctx = None
    with _lock:
        open_ = _active.get(job_id) if job_id else None
        job = open_[-1] if open_ else None
    if job is not None:
        current = trace.get_current_span().get_span_context()
        if current.trace_id != job.segment.get_span_context().trace_id:
            ctx = trace.set_span_in_context(job.segment)
    carrier: dict[str, Any] = {}
    propagate.inject(carrier, context=ctx)
    carrier[SENT_AT] = time.time()
    return carrier


def carrier() -> dict | None:
    """The current trace context as a carrier to keep with the job (its record), for a message
    another process sends later (fair-share dispatch); None when off."""
    if _get() is None:
        return None
    from opentelemetry import propagate

    out: dict[str, Any] = {}
    propagate.inject(out)
    return out or None


def headers_from(kept: dict | None) -> dict | None:
    """Message headers that continue a trace kept with the job (``carrier``), or only the send
    time where the job kept none (its delivery then starts a trace of its own); None when off."""
    if _get() is None:
        return None
    return {**(kept or {}), SENT_AT: time.time()}


# -- worker side -----------------------------------------------------------------------
class _NoJobTrace:
    """A delivery's trace while tracing is off: every method does nothing."""

    def activate(self) -> None:
        pass

    def record(self, name: str, start_ns: int, end_ns: int, attributes: dict | None = None) -> None:
        pass

    def span(self, name: str, attributes: dict | None = None):
        return NO_SPAN

    def end(self, outcome: str) -> None:
        pass


NO_JOB_TRACE = _NoJobTrace()


class JobTrace:
    """One delivery's spans: ``easel.queue_wait`` and ``easel.segment`` (open until ``end``),
    with children under the segment span."""

    def __init__(self, tracer, carrier: dict | None, job_id: str, segment: int, queue: str | None,
                 worker: str | None, start_ns: int):
        from opentelemetry import propagate, trace

        self._trace = trace
        self.job_id = job_id
        parent = propagate.extract(carrier or {})
        attrs = _clean({"easel.job_id": job_id, "easel.segment": segment, "messaging.destination.name": queue,
                        "easel.worker": worker})
        sent_at = _float((carrier or {}).get(SENT_AT))
        if sent_at is not None:
            wait_start = min(int(sent_at * 1e9), start_ns)  # clocks of two hosts may disagree
            # A span only inside the job's trace: without a parent it would be a trace of its own.
            if trace.get_current_span(parent).get_span_context().is_valid:
                tracer.start_span("easel.queue_wait", context=parent, attributes=attrs,
                                  start_time=wait_start).end(end_time=start_ns)
            attrs = {**attrs, "easel.queue_wait_ms": (start_ns - wait_start) / 1e6}
        self.tracer = tracer
        self.segment = tracer.start_span("easel.segment", context=parent, kind=trace.SpanKind.CONSUMER,
                                         attributes=attrs, start_time=start_ns)
        self._ctx = trace.set_span_in_context(self.segment)
        self._open: list = []

    def activate(self) -> None:
        """The job runs here now: messages sent for it carry this trace (``headers``)."""
        with _lock:
            _active.setdefault(self.job_id, []).append(self)

    def record(self, name: str, start_ns: int, end_ns: int, attributes: dict | None = None) -> None:
        """A child span that already happened (a claim shared by a micro-batch's jobs)."""
        self.tracer.start_span(name, context=self._ctx, attributes=_clean(attributes),
                               start_time=start_ns).end(end_time=end_ns)

    def start_child(self, name: str, attributes: dict | None = None, start_ns: int | None = None):
        sp = self.tracer.start_span(name, context=self._ctx, attributes=_clean(attributes), start_time=start_ns)
        self._open.append(sp)
        return sp

    @contextlib.contextmanager
    def span(self, name: str, attributes: dict | None = None) -> Iterator[Any]:
        """A child span, current for the block (messages sent inside carry it)."""
        sp = self.start_child(name, attributes)
        try:
            with self._trace.use_span(sp, end_on_exit=False):
                yield sp
        finally:
            _end(sp)

    def end(self, outcome: str) -> None:
        """The delivery ended: ``outcome`` as in ``worker.engine`` (succeeded, handed-off,
        retrying, failed, ...)."""
        with _lock:
            open_ = _active.get(self.job_id)
            if open_ and self in open_:
                open_.remove(self)
                if not open_:
                    del _active[self.job_id]
        for sp in self._open:  # children first: a span never outlives its parent
            _end(sp)
        self._open.clear()
        if not self.segment.is_recording():
            return
        self.segment.set_attribute("easel.outcome", outcome)
        if outcome in ("failed", "error", "poison"):
            from opentelemetry.trace import Status, StatusCode

            self.segment.set_status(Status(StatusCode.ERROR, outcome))
        self.segment.end()


def delivery(carrier: dict | None, job_id: str, segment: int, queue: str | None, worker: str | None,
             start_ns: int | None):
    """The trace of one delivery that started (its claim) at ``start_ns``."""
    t = _get()
    if t is None:
        return NO_JOB_TRACE
    return JobTrace(t, carrier, job_id, segment, queue, worker, start_ns or time.time_ns())


def clock() -> int | None:
    """Now in epoch nanoseconds when tracing is on, else None (what ``delivery`` and
    ``JobTrace.record`` take)."""
    return None if _get() is None else time.time_ns()


@contextlib.contextmanager
def _group(traces: list, name: str, attributes: dict | None) -> Iterator[None]:
    t0 = time.time_ns()  # one call: the same times in every job's trace
    spans = [tr.start_child(name, attributes, t0) for tr in traces]
    token = None
    try:
        if len(spans) == 1:  # one job: its span is current (libraries' spans nest under it)
            from opentelemetry import context as otel_context, trace

            token = otel_context.attach(trace.set_span_in_context(spans[0]))
        yield
    except BaseException as exc:
        from opentelemetry.trace import Status, StatusCode

        for sp in spans:
            if sp.is_recording():
                sp.record_exception(exc)
                sp.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:300]))
        raise
    finally:
        if token is not None:
            from opentelemetry import context as otel_context

            otel_context.detach(token)
        t1 = time.time_ns()
        for sp in spans:
            _end(sp, t1)


def group(traces: Iterable, name: str, attributes: dict | None = None):
    """One child span ``name`` in each job's trace for a ``with`` block: the jobs of one
    micro-batch share a pipeline call, and each job's trace shows it."""
    real = [tr for tr in traces if tr is not NO_JOB_TRACE]
    if not real:
        return NO_SPAN
    return _group(real, name, attributes)


# -- exporters and helpers -------------------------------------------------------------
def _end(sp, end_ns: int | None = None) -> None:
    if sp.is_recording():
        sp.end(end_time=end_ns)


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _clean(attributes: dict | None) -> dict | None:
    """Attributes without the None values OpenTelemetry refuses."""
    return {k: v for k, v in attributes.items() if v is not None} if attributes else None


def _json_lines_exporter_class():
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class _JsonLinesExporter(SpanExporter):
        """Finished spans as JSON lines appended to a file, one write per export, so several
        processes can share the file."""

        def __init__(self, path: str):
            self.path = path

        def export(self, spans) -> SpanExportResult:
            data = "".join(s.to_json(indent=None) + "\n" for s in spans).encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    return _JsonLinesExporter


def JsonLinesExporter(path: str):  # noqa: N802 - a class, made on first use (opentelemetry is optional)
    return _json_lines_exporter_class()(path)
