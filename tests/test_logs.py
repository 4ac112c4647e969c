"""Structured logs (shared/logs.py): the formats, the job and process fields, and a real
worker's JSON log with each job's records carrying its id."""
from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from easel.shared import logs
from tests.conftest import WorkerProc, img2img_job


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def fresh_logs():
    """Root's handlers and level, and the process fields, restored after the test."""
    root = logging.getLogger()
    handlers, level, process = list(root.handlers), root.level, dict(logs._process)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logs._process.clear()
    logs._process.update(process)
    logs.unbind_job()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_auto_is_text_on_a_terminal_and_json_elsewhere(monkeypatch):
    monkeypatch.delenv("EASEL_LOG_FORMAT", raising=False)
    assert logs.resolve_format("auto", Tty()) == "text"
    assert logs.resolve_format("auto", io.StringIO()) == "json"
    assert logs.resolve_format(None, io.StringIO()) == "json"  # unset means auto
    assert logs.resolve_format("text", io.StringIO()) == "text"
    assert logs.resolve_format("JSON", Tty()) == "json"
    with pytest.raises(ValueError, match="EASEL_LOG_FORMAT"):
        logs.resolve_format("xml")


def test_the_setting_takes_the_three_formats(monkeypatch):
    from pydantic import ValidationError

    from easel.shared.settings import Settings

    assert Settings().log_format == "auto"
    monkeypatch.setenv("EASEL_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("EASEL_LOG_FORMAT", "yaml")
    with pytest.raises(ValidationError):
        Settings()


def test_json_lines_carry_job_and_process_fields(fresh_logs):
    out = io.StringIO()
    assert logs.configure_logging("INFO", "json", stream=out) == "json"
    logs.set_process_fields(worker="sd15-0@host", family="sd15")
    log = logging.getLogger("easel.worker.engine")
    log.info("warm")
    with logs.job_context("abc123", 0):
        log.info("job %s denoised", "abc123")
        log.info("explicit", extra={"job_id": "other"})  # a field the call passes wins
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("stage failed")
    logging.getLogger("celery.worker").debug("below the level")
    log.warning("after")
    warm, denoised, explicit, failed, after = lines(out)
    assert warm["message"] == "warm" and warm["level"] == "INFO" and warm["logger"] == "easel.worker.engine"
    assert (warm["worker"], warm["family"]) == ("sd15-0@host", "sd15")
    assert "job_id" not in warm and "segment" not in warm
    assert denoised["message"] == "job abc123 denoised"
    assert (denoised["job_id"], denoised["segment"], denoised["worker"]) == ("abc123", 0, "sd15-0@host")
    assert explicit["job_id"] == "other"
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exc_info"] and failed["job_id"] == "abc123"
    assert "job_id" not in after and after["level"] == "WARNING"
    assert denoised["time"].endswith("+00:00") and "T" in denoised["time"]
    assert not {"args", "msg", "color_message", "easel_context", "taskName"} & set(denoised)


def test_text_lines_show_the_job_in_brackets(fresh_logs):
    out = Tty()
    assert logs.configure_logging("INFO", "auto", stream=out) == "text"
    log = logging.getLogger("easel.worker")
    log.info("idle")
    with logs.job_context(["a1", "b2"], [0, 0]):
        log.info("batch")
    idle, batch = out.getvalue().splitlines()
    assert idle.endswith(" INFO easel.worker: idle")
    assert batch.endswith(" INFO easel.worker [job=a1,b2 seg=0,0]: batch")


def test_uvicorn_access_lines_get_request_fields(fresh_logs):
    out = io.StringIO()
    logs.configure_logging("INFO", "json", stream=out)
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v1/queues",
                                             "1.1", 200, extra={"color_message": "x"})
    [line] = lines(out)
    assert line["message"] == '127.0.0.1:5000 - "GET /v1/queues HTTP/1.1" 200'
    assert (line["client"], line["method"], line["path"], line["status"]) == ("127.0.0.1:5000", "GET", "/v1/queues", 200)
    assert "color_message" not in line


def test_uvicorn_log_config_routes_everything_through_one_handler(fresh_logs, monkeypatch):
    import logging.config

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    cfg = logs.uvicorn_log_config("info", "json")
    assert cfg["formatters"]["easel"]["fmt"] == "json"
    logging.config.dictConfig(cfg)
    logging.getLogger("uvicorn.error").info("Started server process [1]")
    logging.getLogger("easel.producer.webhooks").info("delivered")
    assert [(r["logger"], r["message"]) for r in lines(out)] == [
        ("uvicorn.error", "Started server process [1]"), ("easel.producer.webhooks", "delivered")]


def test_task_arguments_give_the_job_fields():
    from celery_batches import SimpleRequest

    def req(*args):
        return SimpleRequest(id="t", name="n", args=args, kwargs={}, delivery_info={}, hostname="h",
                             ignore_result=True, reply_to=None, correlation_id=None, request_dict={})

    assert logs.task_job_fields(("abc", 1)) == ("abc", 1)
    assert logs.task_job_fields([[req("abc", 0)]]) == ("abc", 0)  # a micro-batch of one
    assert logs.task_job_fields(([req("abc", 0), req("def", 2)],)) == (["abc", "def"], [0, 2])
    assert logs.task_job_fields(()) == (None, None)
    # The signal receivers bind and clear them.
    logs._on_task_prerun(args=([req("abc", 0), req("def", 2)],))
    assert logs.current_job() == {"job_id": ["abc", "def"], "segment": [0, 2]}
    logs._on_task_postrun()
    assert logs.current_job() is None


# -- a real worker ---------------------------------------------------------------------------
def records(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        # Celery's shutdown notice goes straight to the process's own stdout, past logging.
        if line.strip() and not line.startswith("worker: Warm shutdown"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


@pytest.mark.parametrize("batch_size", [1, 2])
def test_a_worker_logs_json_with_each_jobs_fields(easel_env, tmp_path, input_png, batch_size):
    """Plain tasks (job_id a string) and micro-batches (a list of ids when several ran)."""
    from easel.producer.client import EaselClient
    from easel.shared.settings import Settings

    prefix = f"ltest{batch_size}"
    w = WorkerProc("sd15", {**easel_env, "EASEL_QUEUE_PREFIX": prefix, "EASEL_LOG_FORMAT": "json",
                            "EASEL_BATCH_SIZE": str(batch_size), "EASEL_BATCH_WAIT_S": "1.0"}, tmp_path).start()
    try:
        c = EaselClient(Settings(queue_prefix=prefix))
        lone = c.submit(img2img_job(str(input_png), steps=2))
        assert c.wait(lone, timeout=120).state.value == "succeeded"
        pair = [c.submit(img2img_job(str(input_png), steps=2, seed=s)) for s in (1, 2)] if batch_size > 1 else []
        assert all(c.wait(j, timeout=120).state.value == "succeeded" for j in pair)
    finally:
        w.stop()
    recs = records(w.log)
    assert recs and all(r["worker"] == w.hostname and r["family"] == "sd15" for r in recs)
    assert any("warm in" in r["message"] and "job_id" not in r for r in recs)
    mine = [r for r in recs if r.get("job_id") == lone]
    assert mine and all(r["segment"] == 0 for r in mine)
    assert any(lone in r["message"] for r in mine)  # the messages still name their job
    if pair:
        together = [r for r in recs if isinstance(r.get("job_id"), list)]
        assert together and all(sorted(r["job_id"]) == sorted(pair) and r["segment"] == [0, 0] for r in together)
