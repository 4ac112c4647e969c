"""Process-wide logging shared by the CLI, the API and the workers.

``EASEL_LOG_FORMAT`` picks the format of what goes to stderr: ``json`` (one object a line,
what a log pipeline ingests), ``text`` (for a person at a terminal), or ``auto``, the
default: text when stderr is a terminal, json otherwise (a container, a service, a file).

Every record carries what it is about as fields of its own: ``job_id`` and ``segment``
while a worker runs a task (a contextvar set by Celery's task_prerun and cleared by its
task_postrun signal; a micro-batch of several deliveries gives lists), and the process's
``worker`` (its Celery hostname) and ``family``. Messages keep naming their jobs as well.
Threads a task starts do not inherit its job fields (a context variable stays with its
context): their records have the process's fields only.
"""
from __future__ import annotations

import contextvars
import logging
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

FORMATS = ("auto", "text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(easel_context)s: %(message)s"

_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("easel_log_job", default=None)
_process: dict[str, Any] = {}


def quiet_libraries() -> None:
    """Library chatter (progress bars, torchvision notices) drowns easel's own output."""
    for k, v in {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


# -- context ---------------------------------------------------------------------------------
def set_process_fields(**fields: Any) -> None:
    """Fields every record of this process carries (``worker``, ``family``); None removes one."""
    for k, v in fields.items():
        if v is None:
            _process.pop(k, None)
        else:
            _process[k] = v


def bind_job(job_id: Any, segment: Any = None) -> contextvars.Token:
    """Records logged in this context from now on carry ``job_id`` (and ``segment``)."""
    return _job.set({"job_id": job_id, "segment": segment})


def unbind_job(token: contextvars.Token | None = None) -> None:
    if token is not None:
        _job.reset(token)
    else:
        _job.set(None)


@contextmanager
def job_context(job_id: Any, segment: Any = None) -> Iterator[None]:
    token = bind_job(job_id, segment)
    try:
        yield
    finally:
        unbind_job(token)


def current_job() -> dict[str, Any] | None:
    return _job.get()


class ContextFilter(logging.Filter):
    """Copies the job and process fields onto each record (a handler filter, so records
    propagated from every logger, Celery's and uvicorn's included, get them). A field the
    call passed itself (``extra=``) wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in _process.items():
            if k not in record.__dict__:
                setattr(record, k, v)
        job = _job.get()
        if job:
            for k, v in job.items():
                if v is not None and k not in record.__dict__:
                    setattr(record, k, v)
        return True


# -- formats ---------------------------------------------------------------------------------
def resolve_format(fmt: str | None = None, stream=None) -> str:
    """``text`` or ``json``: ``auto`` (and unset) is text on a terminal, json elsewhere."""
    fmt = (fmt or os.environ.get("EASEL_LOG_FORMAT") or "auto").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"EASEL_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    stream = stream if stream is not None else sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


def _short(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [job=… seg=…]: message``; the bracket only while a job runs."""

    def __init__(self, fmt: str = TEXT_FORMAT, datefmt: str | None = None):
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        job, seg = getattr(record, "job_id", None), getattr(record, "segment", None)
        ctx = ""
        if job is not None:
            ctx = f" [job={_short(job)}" + (f" seg={_short(seg)}" if seg is not None else "") + "]"
        record.easel_context = ctx
        return super().format(record)


# Attributes of records that are not fields of the line: the LogRecord's own (the JSON
# formatter's default list), uvicorn's colored copy of the message, the text format's context.
_EXTRA_RESERVED = ("color_message", "easel_context", "taskName")


def json_formatter() -> logging.Formatter:
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``job_id``/``segment``/``worker``/``family`` where known, any ``extra=`` fields,
    ``exc_info`` (the traceback) on errors; an access log line of uvicorn's adds ``client``,
    ``method``, ``path`` and ``status``."""
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    class EaselJsonFormatter(JsonFormatter):
        def add_fields(self, log_data, record, message_dict):
            log_data["time"] = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")
            super().add_fields(log_data, record, message_dict)
            if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
                client, method, path, _http, status = record.args
                log_data.update(client=client, method=method, path=path, status=status)

    return EaselJsonFormatter("%(levelname)s %(name)s %(message)s",
                              rename_fields={"levelname": "level", "name": "logger"},
                              reserved_attrs=[*RESERVED_ATTRS, *_EXTRA_RESERVED])


def make_formatter(fmt: str = "auto") -> logging.Formatter:
    """The formatter for ``fmt`` (``auto`` resolved against stderr); a dictConfig factory too."""
    return json_formatter() if resolve_format(fmt) == "json" else TextFormatter()


def configure_logging(level: str | int = "INFO", fmt: str | None = None, stream=None) -> str:
    """Make the root logger write to stderr in the chosen format, with the context filter;
    replaces root's handlers. Returns the format used (``text`` or ``json``)."""
    stream = stream if stream is not None else sys.stderr
    resolved = resolve_format(fmt, stream)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter() if resolved == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)
    return resolved


def uvicorn_log_config(level: str = "info", fmt: str | None = None) -> dict:
    """uvicorn's ``log_config``: its loggers and easel's all go through one root handler in
    the chosen format (resolved here, so the server processes uvicorn spawns, which share
    this stderr, all write the same format)."""
    resolved = resolve_format(fmt)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "easel.shared.logs.ContextFilter"}},
        "formatters": {"easel": {"()": "easel.shared.logs.make_formatter", "fmt": resolved}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "easel", "filters": ["context"]}},
        "loggers": {name: {"handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")},
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


# -- Celery ----------------------------------------------------------------------------------
def task_job_fields(args: Any) -> tuple[Any, Any]:
    """(job_id, segment) of a task's arguments: ``(job_id, segment)`` for the plain task, one
    list of requests for a celery-batches task (lists of ids and segments when several)."""
    args = tuple(args or ())
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        ids, segs = [], []
        for req in args[0]:
            a = tuple(getattr(req, "args", None) or ())
            ids.append(a[0] if a else None)
            segs.append(a[-1] if len(a) > 1 else None)
        if len(ids) == 1:
            return ids[0], segs[0]
        return (ids, segs) if ids else (None, None)
    if len(args) >= 2:
        return args[0], args[1]
    return (args[0], None) if args else (None, None)


def _on_task_prerun(args=None, **_kw) -> None:
    job_id, segment = task_job_fields(args)
    if job_id is not None:
        bind_job(job_id, segment)


def _on_task_postrun(**_kw) -> None:
    unbind_job()


def _keep_our_logging(**_kw) -> None:
    """A setup_logging receiver: its presence stops Celery replacing root's handlers."""


def install_celery_logging(app) -> None:
    """Keep this process's logging when a Celery worker starts (Celery would otherwise put
    its own handler on root), bind each task's job to the records it logs, and, as Celery
    does by default, send stray writes to stdout/stderr into the log."""
    from celery.signals import celeryd_after_setup, setup_logging, task_postrun, task_prerun

    setup_logging.connect(_keep_our_logging, weak=False)
    task_prerun.connect(_on_task_prerun, weak=False)
    task_postrun.connect(_on_task_postrun, weak=False)

    @celeryd_after_setup.connect(weak=False)
    def _redirect(**_kw):  # where Celery itself would redirect them
        if app.conf.worker_redirect_stdouts:
            app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)
