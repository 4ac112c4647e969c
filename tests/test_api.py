"""The HTTP API over real HTTP: a real `easel api` process, the session's valkey, SeaweedFS and
sd15 worker, and (for webhooks) a real local HTTP receiver."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.client import HTTPResponse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from easel.producer.embedded import free_port
from easel.producer.webhooks import verify_signature
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from tests.conftest import ROOT, WRITER_S3_KEY, png_bytes
from tests.netproxy import TcpProxy

# Two secrets mid-rotation (new first): each signs every delivery.
NEW_SECRET = "whsec_" + base64.b64encode(b"easel-test-key-new").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"easel-test-key-old").decode()
WEBHOOK_SECRET = f"{NEW_SECRET} {OLD_SECRET}"
KEYS = {  # token -> key config (the server only sees the sha256)
    "tok-main": {"name": "main", "rate_per_min": 60000, "burst": 5000},
    "tok-other": {"name": "other"},
    "tok-tight": {"name": "tight", "rate_per_min": 3, "burst": 3},
    "tok-capped": {"name": "capped", "max_in_flight": 2, "rate_per_min": 60000, "burst": 5000},
    "tok-held": {"name": "held", "max_in_flight": 1, "over_cap": "hold", "rate_per_min": 60000, "burst": 5000},
    "tok-watcher": {"name": "watcher", "rate_per_min": 60000, "burst": 5000,
                    "webhook_events": ["queued", "started", "progress", "succeeded"]},
}


def keys_env(keys: dict[str, dict] = KEYS) -> str:
    return json.dumps([{**cfg, "sha256": hashlib.sha256(tok.encode()).hexdigest()} for tok, cfg in keys.items()])


class ApiServer:
    """`python -m easel.producer.cli api` on a free port, as an operator would run it."""

    def __init__(self, env: dict[str, str], logdir: Path, name: str = "api", workers: int = 1,
                 log_level: str = "warning"):
        self.port = free_port()
        self.workers, self.log_level = workers, log_level
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logdir / f"{name}.log"
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "ApiServer":
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "api", "--port", str(self.port),
                                          "--log-level", self.log_level, "--workers", str(self.workers)],
                                         env=self.env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"api not up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, token: str | None = "tok-main") -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


PARKED = "parked"  # a family no worker serves: its jobs stay queued, and no other test reads its queue


def registry_with_parked_family(folder: Path) -> Path:
    from easel.shared.registry import BUNDLED

    data = yaml.safe_load(BUNDLED.read_text())
    data["models"][PARKED] = {"source": "tiny-sd15", "family": PARKED, "latent_space": "sd1-vae", "kind": "sd"}
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def api(easel_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    env = {**easel_env, "EASEL_API_KEYS": keys_env(), "EASEL_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "EASEL_MODELS": str(registry_with_parked_family(folder)),
           "EASEL_WEBHOOK_BACKOFF_S": "0.3", "EASEL_WEBHOOK_SWEEP_S": "0.2", "EASEL_WEBHOOK_MAX_ATTEMPTS": "3",
           "EASEL_WEBHOOK_PROGRESS_EVERY_S": "0.3",
           "EASEL_ALLOW_PRIVATE_URLS": "1"}
    server = ApiServer(env, folder).start()
    yield server
    server.stop()


@pytest.fixture
def http(api):
    with api.client() as c:
        yield c


def job_body(image: str, **stage) -> dict:
    st = {"task": "img2img", "model": "sd15", "prompt": "a red fox", "steps": 3, "strength": 0.6, "seed": 7}
    st.update(stage)
    return {"input": {"image": image}, "stages": [st]}


def unreadable_input() -> str:
    """An object in the inputs folder that is no image: accepted at submission (only its
    presence is checked there), failed by the worker that reads it."""
    from easel.shared.settings import get_settings
    from easel.shared.storage import Storage

    return Storage(get_settings()).put_input(b"no image here " + uuid.uuid4().bytes, "png")


def upload(http: httpx.Client, data: bytes | None = None) -> str:
    r = http.post("/v1/uploads", files={"file": ("in.png", data or png_bytes((64, 64)), "image/png")})
    assert r.status_code == 201, r.text
    return r.json()["image"]


def wait_state(http: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        if r.json()["state"] in ("succeeded", "failed", "cancelled"):
            return r.json()
        time.sleep(0.1)
    raise TimeoutError(job_id)


def test_health_ready_and_openapi(api):
    assert httpx.get(f"{api.url}/healthz").json()["status"] == "ok"
    r = httpx.get(f"{api.url}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"redis": "ok", "s3": "ok"}
    spec = httpx.get(f"{api.url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/uploads", "/v1/uploads/presign",
            "/healthz", "/readyz"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "webhook_url" in spec["components"]["schemas"]["JobRequest"]["properties"]


def test_openapi_documents_errors_models_sse_and_links(api):
    spec = httpx.get(f"{api.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and schemas["Problem"]["required"] == ["detail"]
    model = schemas["Stage"]["properties"]["model"]
    assert "sd15" in model["enum"] and PARKED in model["enum"]  # this server's registry, not the bundled one
    problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if int(status) >= 400 and path != "/readyz":
                    assert resp["content"] == problem, (method, path, status)
            if op.get("security"):
                assert {"401", "429"} <= set(op["responses"]), (method, path)
    events = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert "itemSchema" in events["200"]["content"]["text/event-stream"]
    create = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"400", "415", "422", "429"} <= set(create) and create["429"]["headers"]["Retry-After"]["required"]
    assert {link["operationId"] for link in create["201"]["links"].values()} == {"get_job", "cancel_job", "job_events"}
    assert {"413", "415"} <= set(spec["paths"]["/v1/uploads"]["post"]["responses"])


def test_errors_share_one_body_and_say_what_went_wrong(api, http):
    r = http.post("/v1/jobs", content=b'{"stages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("request body is not valid JSON")
    assert r.json()["errors"][0]["type"] == "json_invalid"
    r = http.post("/v1/jobs", content=json.dumps(job_body("s3://easel/inputs/x.png")),
                  headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    r = http.post("/v1/uploads", json={"file": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = http.post("/v1/jobs", json={**job_body("s3://easel/inputs/x.png", steps=0), "priority": 10})
    assert r.status_code == 422
    assert r.json()["detail"] == ("priority: Input should be less than or equal to 9; "
                                  "stages.0.steps: Input should be greater than or equal to 1")
    assert [e["loc"] for e in r.json()["errors"]] == [["body", "priority"], ["body", "stages", 0, "steps"]]
    # One error per unknown key: a body of thousands lists the first 20 and counts the rest.
    r = http.post("/v1/jobs", json={**job_body("s3://easel/inputs/x.png"), **{f"k{i}": 0 for i in range(5000)}})
    assert r.status_code == 422 and len(r.json()["errors"]) == 20 and r.json()["errors"][0]["loc"] == ["body", "k0"]
    assert r.json()["detail"].endswith("k4: Extra inputs are not permitted (and 4995 more)")
    assert len(r.content) < 10_000
    r = http.request("OPTIONS", f"/v1/jobs/{uuid.uuid4().hex}")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET" and r.json() == {"detail": "Method Not Allowed"}


def test_readyz_is_503_when_redis_is_unreachable(easel_env, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = ApiServer({**easel_env, "EASEL_REDIS_URL": dead, "EASEL_API_KEYS": keys_env()}, tmp_path).start()
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # alive, so not restarted
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["redis"].startswith("error") and r.json()["checks"]["s3"] == "ok"
        assert dead.rsplit(":", 1)[1].split("/")[0] not in r.text  # unauthenticated: no address in it
        r = httpx.get(f"{server.url}/v1/queues", headers={"Authorization": "Bearer tok-main"})
        assert r.status_code == 503 and "Redis unavailable" in r.json()["detail"]
        assert dead.rsplit(":", 1)[1].split("/")[0] not in r.text  # no address leaks to clients
    finally:
        server.stop()


def test_readyz_is_ready_with_credentials_that_may_not_look_the_bucket_up(easel_env, tmp_path):
    """Least-privilege S3 credentials (objects only, no s3:ListBucket) get 403 for a bucket
    lookup: S3 answered, and the API serves with them, so the readiness probe passes."""
    key_id, secret = WRITER_S3_KEY
    env = {**easel_env, "EASEL_API_KEYS": keys_env(), "EASEL_S3_ACCESS_KEY_ID": key_id,
           "EASEL_S3_SECRET_ACCESS_KEY": secret}
    server = ApiServer(env, tmp_path).start()
    try:
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 200 and r.json()["checks"] == {"redis": "ok", "s3": "ok"}, r.text
    finally:
        server.stop()


def test_healthz_answers_while_requests_stalled_on_redis_hold_every_thread(easel_env, tmp_path):
    """Redis that stops answering (a network stall, not a refusal) holds each request that
    reads it in a thread of the server's pool until its timeout; more such requests than the
    pool's 40 threads must not make the liveness probe fail, or every replica is restarted."""
    valkey_port = int(easel_env["EASEL_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(valkey_port).start()
    env = {**easel_env, "EASEL_API_KEYS": keys_env(), "EASEL_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}
    server = ApiServer(env, tmp_path).start()
    stalled: list[threading.Thread] = []
    try:
        proxy.hold()
        for _ in range(60):
            t = threading.Thread(target=lambda: httpx.get(f"{server.url}/v1/queues", timeout=60,
                                                          headers={"Authorization": "Bearer tok-main"}), daemon=True)
            t.start()
            stalled.append(t)
        time.sleep(2)  # every thread of the pool is now waiting on Redis
        assert all(t.is_alive() for t in stalled)
        r = httpx.get(f"{server.url}/healthz", timeout=3)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        proxy.release()
        for t in stalled:
            t.join(60)
        server.stop()
        proxy.stop()


def refusing_s3(status: int, code: str) -> ThreadingHTTPServer:
    """An S3 endpoint that answers every request with ``status`` and the error ``code``."""
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>no</Message></Error>'.encode()

    class Refusing(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _refuse(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _refuse

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status, code, answer, detail", [
    (503, "SlowDown", 503, "object storage failed: SlowDown"),  # throttled: worth a retry
    (403, "AccessDenied", 500, "object storage refused the server's request (AccessDenied)"),  # configuration
])
def test_an_object_store_answering_with_errors_gives_a_problem_not_a_bare_500(easel_env, tmp_path, status, code,
                                                                              answer, detail):
    s3 = refusing_s3(status, code)
    server = ApiServer({**easel_env, "EASEL_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3.server_address[1]}",
                        "EASEL_API_KEYS": keys_env()}, tmp_path).start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer tok-main"}, timeout=60) as c:
            r = c.post("/v1/uploads", files={"file": ("in.png", png_bytes((64, 64)), "image/png")})
        assert r.status_code == answer and r.json()["detail"].startswith(detail), r.text
        assert (int(r.headers["retry-after"]) >= 1) if answer == 503 else "retry-after" not in r.headers
    finally:
        server.stop()
        s3.shutdown()


def test_a_broker_that_cannot_take_the_message_gives_503_and_frees_the_slot(easel_env, tmp_path):
    """The broker away when a job's message is sent (the job store still up): 503 with
    Retry-After naming the broker, the key's in-flight slot given back, and a retry with the
    same Idempotency-Key queues the job anew. In-process: the broker is the job store's Redis
    for a server, so only the app's own Celery app can point at a dead port."""
    from fastapi.testclient import TestClient

    from easel.producer.api.app import create_app
    from easel.shared.celery_app import make_celery
    from easel.shared.settings import Settings

    # A queue prefix of its own: no worker, no waiting tenant, room for one job (the margin),
    # so the job is admitted and its message sent at once.
    settings = Settings(api_keys=json.loads(keys_env()), queue_prefix=f"brokerless{uuid.uuid4().hex[:8]}")
    app = create_app(settings, webhooks=False)
    api = app.state.api
    broker = api.client.celery
    api.client.celery = make_celery(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    api.client.celery.conf.task_publish_retry = False  # the default rides out a minute first
    retried = {"Authorization": "Bearer tok-capped", "Idempotency-Key": f"broker-{uuid.uuid4().hex}"}
    with TestClient(app) as c:
        image = c.post("/v1/uploads", headers=retried, files={"file": ("in.png", png_bytes((64, 64)), "image/png")})
        body = job_body(image.json()["image"])
        r = c.post("/v1/jobs", json=body, headers=retried)
        assert r.status_code == 503 and r.json()["detail"].startswith("message broker unavailable"), r.text
        assert int(r.headers["retry-after"]) >= 1
        assert api.inflight.count("capped") == 0
        api.client.celery = broker
        again = c.post("/v1/jobs", json=body, headers=retried)
        assert again.status_code == 201, again.text
        assert c.delete(f"/v1/jobs/{again.json()['id']}", headers=retried).status_code == 200
    api.r.delete(*api.r.scan_iter(match=f"{settings.queue_prefix}*"))


def test_event_streams_past_the_cap_get_503_and_a_closed_stream_frees_its_connection(easel_env):
    """An API process serves EASEL_API_SSE_MAX_STREAMS event streams at once; one more gets
    503 with Retry-After before its response starts (not a 200 that breaks off), its last
    quarter kept for keys holding less than a quarter; a request without a key is a 401
    even then; a stream that ends gives its Redis connection back. In-process, to read the
    app's own counts."""
    from fastapi.testclient import TestClient

    from easel.producer.api.app import create_app
    from easel.shared.settings import Settings

    settings = Settings(api_keys=json.loads(keys_env()), queue_prefix=f"sse{uuid.uuid4().hex[:8]}",
                        api_sse_max_streams=4)
    app = create_app(settings, webhooks=False)
    api, headers, others = app.state.api, {"Authorization": "Bearer tok-main"}, {"Authorization": "Bearer tok-other"}
    with TestClient(app) as c, contextlib.ExitStack() as streams:
        image = c.post("/v1/uploads", headers=headers, files={"file": ("in.png", png_bytes((64, 64)), "image/png")})
        job_id = c.post("/v1/jobs", json=job_body(image.json()["image"]), headers=headers).json()["id"]
        theirs = c.post("/v1/jobs", json=job_body(image.json()["image"]), headers=others).json()["id"]
        kept = []  # line iterators kept: a dropped one closes its stream

        def follow(job: str, who: dict) -> None:
            stream = streams.enter_context(c.stream("GET", f"/v1/jobs/{job}/events", headers=who))
            assert stream.status_code == 200
            kept.append(stream.iter_lines())
            assert next(kept[-1]).startswith("event: status")

        for _ in range(3):
            follow(job_id, headers)
        assert api.sse_streams == 3
        refused = c.get(f"/v1/jobs/{job_id}/events", headers=headers)  # a quarter left, for other keys
        assert refused.status_code == 503 and "EASEL_API_SSE_MAX_STREAMS" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) >= 1
        follow(theirs, others)
        assert c.get(f"/v1/jobs/{theirs}/events", headers=others).status_code == 503  # all taken
        assert c.get(f"/v1/jobs/{theirs}/events").status_code == 401
        streams.close()
        deadline = time.monotonic() + 10
        while api.sse_streams or api.aredis.connection_pool._in_use_connections:
            assert time.monotonic() < deadline, (api.sse_streams, api.aredis.connection_pool._in_use_connections)
            time.sleep(0.1)
        assert c.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
        assert c.delete(f"/v1/jobs/{theirs}", headers=others).status_code == 200
    api.r.delete(*api.r.scan_iter(match=f"{settings.queue_prefix}*"))


def test_missing_or_bad_key_is_401(api):
    r = httpx.post(f"{api.url}/v1/jobs", json=job_body("s3://easel/inputs/x.png"))
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    with api.client("not-a-key") as c:
        r = c.get("/v1/queues")
    assert r.status_code == 401 and r.json()["detail"] == "invalid API key"


FORM_START = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.png"\r\n'
              b'Content-Type: image/png\r\n\r\n')  # a form (boundary b) up to its file's bytes


def post_head(url: str, path: str, headers: dict[str, str], sent: bytes) -> tuple[int, dict[str, str], dict]:
    """A POST whose head declares ``headers`` but whose body is only ``sent`` so far: the
    answer (status, headers, JSON body) the server gives without the rest, read until it
    closes the connection (a socket timeout where it waits for the rest instead)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, **headers}.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + sent)
        answer = HTTPResponse(sock)
        answer.begin()
        body = json.loads(answer.read())
        assert sock.recv(1) == b""  # closed: nothing more is read from this request
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, body


def test_a_body_declared_over_the_cap_is_413_before_it_is_read_or_the_key_checked(api):
    """A terabyte declared and the first kilobyte of a well-formed body sent: a 413 Problem at
    once, with or without a key, and the connection closed, so the rest is never read. A body
    within the cap but without a known key: a 401, before it is read too."""
    for path, content_type, start, setting in (
            ("/v1/uploads", "multipart/form-data; boundary=b", FORM_START, "EASEL_MAX_INPUT_BYTES"),
            ("/v1/jobs", "application/json", b'{"input": {"image": "data:image/png;base64,', "EASEL_API_MAX_BODY_BYTES")):
        for auth in ({}, {"Authorization": "Bearer tok-main"}):
            status, headers, body = post_head(api.url, path, {"Content-Type": content_type,
                                                              "Content-Length": str(10**12), **auth},
                                              start + b"A" * 1024)
            assert (status, headers["connection"]) == (413, "close"), (path, auth, status, body)
            assert setting in body["detail"] and "limit" in body["detail"], (path, auth, body)
        for auth in ({}, {"Authorization": "Bearer not-a-key"}):
            status, headers, body = post_head(api.url, path, {"Content-Type": content_type,
                                                              "Content-Length": str(10**6), **auth},
                                              start + b"A" * 1024)
            assert (status, headers["connection"]) == (401, "close"), (path, auth, status, body)
            assert "API key" in body["detail"] and headers["www-authenticate"].startswith("Bearer")


def chunked(data: bytes, size: int = 16384):
    """``data`` as an iterator: httpx sends it chunked, with no Content-Length."""
    return (data[i:i + size] for i in range(0, len(data), size))


def test_a_streamed_body_past_the_cap_is_413_and_one_without_a_key_401(easel_env, tmp_path):
    """A body sent without a Content-Length (chunked) is counted as it is read, and refused
    with a 413 Problem once it passes the route's cap: EASEL_MAX_INPUT_BYTES plus a form's
    framing for an upload, EASEL_API_MAX_BODY_BYTES for the rest. Without a key it is
    refused before any of it is read (401). Bodies within the caps still go through."""
    env = {**easel_env, "EASEL_API_KEYS": keys_env(), "EASEL_MAX_INPUT_BYTES": "100000",
           "EASEL_API_MAX_BODY_BYTES": "200000"}
    server = ApiServer(env, tmp_path).start()
    form = {"Content-Type": "multipart/form-data; boundary=b"}
    big_upload = FORM_START + b"0" * 300_000 + b"\r\n--b--\r\n"
    big_job = json.dumps(job_body("data:image/png;base64," + "A" * 300_000)).encode()
    try:
        for token, status in ((None, 401), ("tok-main", 413)):
            with server.client(token) as c:
                for path, body, headers, setting in (
                        ("/v1/uploads", big_upload, form, "EASEL_MAX_INPUT_BYTES"),
                        ("/v1/jobs", big_job, {"Content-Type": "application/json"}, "EASEL_API_MAX_BODY_BYTES")):
                    r = c.post(path, content=chunked(body), headers=headers)
                    assert r.status_code == status, (token, path, r.status_code, r.text)
                    assert (setting if status == 413 else "missing API key") in r.json()["detail"], r.text
        with server.client() as c:
            small = FORM_START + png_bytes((64, 64)) + b"\r\n--b--\r\n"
            assert c.post("/v1/uploads", content=chunked(small, 100), headers=form).status_code == 201
            r = c.post("/v1/uploads/presign", content=chunked(b'{"content_type": "image/png"}', 4),
                       headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text
    finally:
        server.stop()


def test_a_body_waits_for_its_keys_rate_and_the_processs_budget_before_it_is_read(easel_env, tmp_path):
    """Before a body is read: a key past its rate limit gets its 429 at once (one token spent
    for the request, not one more by the route), and while other bodies' bytes fill the
    process's budget (EASEL_API_MAX_BODIES_IN_FLIGHT_BYTES) a new one gets 503 and
    Retry-After. The budget counts bytes as they arrive: a body declared and not sent holds
    none of it. Once the bodies are done, others go through again."""
    keys = {**KEYS, "tok-three": {"name": "three", "rate_per_min": 1, "burst": 3}}
    env = {**easel_env, "EASEL_API_KEYS": keys_env(keys), "EASEL_API_MAX_BODIES_IN_FLIGHT_BYTES": "100000"}
    server = ApiServer(env, tmp_path).start()
    host, port = server.url.removeprefix("http://").split(":")

    def held(sent: int) -> socket.socket:
        """A job's POST declaring 99 kB, of which ``sent`` bytes are sent and the rest never."""
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer tok-main\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 99000\r\n\r\n".encode() + b"{" * sent)
        return sock

    def presign(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/uploads/presign", json={"content_type": "image/png"})

    try:
        with server.client("tok-three") as c:  # a body and two requests without: the three tokens
            assert presign(c).status_code == 200
            assert [c.get("/v1/queues").status_code for _ in range(2)] == [200, 200]
        status, headers, body = post_head(server.url, "/v1/jobs", {
            "Authorization": "Bearer tok-three", "Content-Type": "application/json", "Content-Length": str(10**5)},
            b'{"input": {"image": "data:image/png;base64,')
        assert (status, headers["connection"]) == (429, "close") and "rate limit exceeded" in body["detail"]
        with held(0), server.client() as c:
            time.sleep(0.3)
            assert presign(c).status_code == 200  # declared, nothing sent: nothing held
        with held(95_000), server.client() as c:
            time.sleep(0.5)
            status, headers, body = post_head(server.url, "/v1/uploads/presign", {
                "Authorization": "Bearer tok-main", "Content-Type": "application/json", "Content-Length": "20000"},
                b"{")
            assert (status, headers["retry-after"]) == (503, "1"), body
            assert "EASEL_API_MAX_BODIES_IN_FLIGHT_BYTES" in body["detail"]
            assert c.get("/v1/queues").status_code == 200  # requests without a body are not held back
        with server.client() as c:  # the held request's bytes are given back when it ends
            deadline = time.monotonic() + 10
            while (r := presign(c)).status_code == 503:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.1)
            assert r.status_code == 200, r.text
    finally:
        server.stop()


def test_a_lone_body_is_read_whole_whatever_the_budget():
    """The budget holds other requests' bodies back, never a request's own: a body under the
    caps alone on a process is read whole even past a budget smaller than it."""
    from easel.producer.api.limits import _Budget

    budget = _Budget(100)
    assert budget.take(80, own=0) and budget.take(80, own=80) and budget.reading == 160
    assert not budget.room_for(1)  # another request, while this one holds more than the budget


def test_job_over_http_completes_and_presigned_urls_download(api, http, sd15_worker):
    image = upload(http)
    assert image.startswith("s3://easel/inputs/")
    r = http.post("/v1/jobs", json=job_body(image, seed=31))
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] in ("queued", "running", "succeeded")
    done = wait_state(http, job["id"])
    assert done["state"] == "succeeded", done["error"]
    (out,) = done["outputs"]
    assert out["uri"] == f"s3://easel/jobs/{job['id']}/output/0.png" and out["expires_at"] > time.time() + 60
    png = httpx.get(out["url"])  # presigned: no API key, straight from S3
    assert png.status_code == 200
    img = Image.open(io.BytesIO(png.content))
    assert img.format == "PNG" and img.size == (64, 64)
    manifest = httpx.get(done["manifest"]["url"]).json()
    assert manifest["stages"][0]["seeds"] == [31] and manifest["job_id"] == job["id"]


def test_presigned_post_upload_feeds_a_job(api, http, sd15_worker):
    r = http.post("/v1/uploads/presign", json={"content_type": "image/png"})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["method"] == "POST" and up["image"].startswith("s3://easel/uploads/main/")
    policy = json.loads(base64.b64decode(up["fields"]["policy"]))
    assert ["content-length-range", 1, up["max_bytes"]] in policy["conditions"]
    post = httpx.post(up["url"], data=up["fields"], files={"file": ("in.png", png_bytes((72, 64)), "image/png")})
    assert post.status_code in (200, 201, 204), post.text
    done = wait_state(http, http.post("/v1/jobs", json=job_body(up["image"], steps=2)).json()["id"])
    assert done["state"] == "succeeded", done["error"]
    assert Image.open(io.BytesIO(httpx.get(done["outputs"][0]["url"]).content)).size == (72, 64)


def test_presigned_upload_over_the_limit_is_refused_by_the_s3_server(easel_env):
    """The limit is enforced by S3 (SeaweedFS here), not by the worker afterwards."""
    from easel.shared.settings import Settings
    from easel.shared.storage import Storage

    storage = Storage(Settings())
    storage.ensure_bucket()
    key = f"uploads/limit-test/{uuid.uuid4().hex}.png"
    up = storage.presign_upload(key, "image/png", max_bytes=1000)
    big = httpx.post(up["url"], data=up["fields"], files={"file": ("in.png", b"\x89PNG" + b"0" * 2000, "image/png")})
    assert big.status_code == 400 and "EntityTooLarge" in big.text
    wrong = httpx.post(up["url"], data={**up["fields"], "Content-Type": "text/html"},
                       files={"file": ("in.html", b"<script>", "text/html")})
    assert wrong.status_code == 403
    assert not storage.exists(key)
    ok = httpx.post(up["url"], data=up["fields"], files={"file": ("in.png", png_bytes((8, 8)), "image/png")})
    assert ok.status_code in (200, 201, 204) and storage.exists(key)


def sse_events(http: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """A job's SSE stream, read to its end: (event name, data) pairs."""
    events: list[tuple[str, dict]] = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def test_sse_stream_yields_progress_then_done(api, http, sd15_worker):
    image = upload(http)
    # A long job ahead keeps ours queued long enough to watch it from the start.
    blocker = http.post("/v1/jobs", json=job_body(image, steps=12, strength=1.0)).json()["id"]
    job_id = http.post("/v1/jobs", json=job_body(image, steps=6, strength=1.0, seed=3)).json()["id"]
    events = sse_events(http, job_id)
    names = [n for n, _ in events]
    assert names[0] == "status" and names[-1] == "done", names
    steps = [d["step"] for n, d in events if n == "progress"]
    assert steps and steps == sorted(steps) and max(steps) == events[-2][1].get("total_steps", max(steps))
    assert "state" in names  # queued -> running was seen
    final = events[-1][1]
    assert final["state"] == "succeeded" and final["outputs"][0]["url"].startswith("http")
    assert wait_state(http, blocker)["state"] == "succeeded"


def test_cancel_over_http(api, http):
    # No worker serves the parked family: the job stays queued until cancelled.
    r = http.post("/v1/jobs", json=job_body(upload(http), model=PARKED))
    assert r.status_code == 201
    r = http.delete(f"/v1/jobs/{r.json()['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert r.json()["error"] == "cancelled before it ran"


def test_jobs_are_private_to_their_key(api, http):
    job_id = http.post("/v1/jobs", json=job_body(upload(http), model=PARKED)).json()["id"]
    with api.client("tok-other") as other:
        assert other.get(f"/v1/jobs/{job_id}").status_code == 404
        assert other.delete(f"/v1/jobs/{job_id}").status_code == 404
        r = other.post("/v1/jobs", json=job_body("s3://easel/uploads/main/x.png"))
        assert r.status_code == 422 and "not readable with this key" in r.json()["detail"]
    assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_rate_limit_gives_clear_429(api):
    with api.client("tok-tight") as c:
        codes = [c.get("/v1/queues").status_code for _ in range(3)]
        r = c.get("/v1/queues")
    assert codes == [200, 200, 200]
    assert r.status_code == 429
    assert "rate limit exceeded for key 'tight': 3 requests/minute (burst 3)" in r.json()["detail"]
    assert int(r.headers["retry-after"]) >= 1


def test_a_chain_waiting_for_its_next_family_is_queued_and_cancels_at_once(api, http, sd15_worker, tmp_path):
    """Between two families of a chain a job is queued, and says why it waits; a cancel ends
    it at once, and its hand-off is deleted when the next family's worker comes to the
    message (an ended job's hand-offs are garbage)."""
    from easel.shared.settings import Settings
    from easel.shared.storage import Storage
    from tests.conftest import WorkerProc

    body = {"input": {"image": upload(http)}, "stages": [
        {"model": "sd15", "prompt": "a fox", "steps": 2, "strength": 0.6, "seed": 1},
        {"model": PARKED, "prompt": "a fox, refined", "steps": 2, "strength": 0.5, "seed": 2}]}
    job_id = http.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/jobs/{job_id}").json())["started_at"] is None or job["state"] != "queued":
        assert time.monotonic() < deadline and job["state"] in ("queued", "running"), job
        time.sleep(0.1)
    assert job["waiting_for"].startswith(f"no live worker serves family {PARKED}"), job
    storage = Storage(Settings())
    assert storage.list(f"jobs/{job_id}/handoff/")
    cancelled = http.delete(f"/v1/jobs/{job_id}").json()
    assert (cancelled["state"], cancelled["error"]) == ("cancelled", "cancelled while it waited in a queue")
    parked = WorkerProc(PARKED, api.env, tmp_path).start()
    try:
        deadline = time.monotonic() + 60
        while storage.list(f"jobs/{job_id}/handoff/"):
            assert time.monotonic() < deadline, "the hand-off of a cancelled job was left"
            time.sleep(0.2)
    finally:
        parked.stop()
    assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_in_flight_cap_gives_clear_429_and_frees_on_cancel(api, http):
    image = upload(http)
    with api.client("tok-capped") as c:
        retried = {"Idempotency-Key": f"cap-{uuid.uuid4().hex}"}
        ids = [c.post("/v1/jobs", json=job_body(image, model=PARKED, seed=i), headers=retried if i else {}).json()["id"]
               for i in range(2)]
        r = c.post("/v1/jobs", json=job_body(image, model=PARKED, seed=9))
        assert r.status_code == 429
        assert r.json()["detail"] == ("key 'capped' already has 2 jobs queued or running, its cap is 2; "
                                      "wait for some to finish or cancel some")
        again = c.post("/v1/jobs", json=job_body(image, model=PARKED, seed=1), headers=retried)
        assert again.status_code == 200 and again.json()["id"] == ids[1], again.text  # a retry is no new job
        other = http.post("/v1/jobs", json=job_body(image, model=PARKED, seed=10))  # another key: unaffected
        assert other.status_code == 201, other.text
        http.delete(f"/v1/jobs/{other.json()['id']}")
        for j in ids:
            assert c.delete(f"/v1/jobs/{j}").json()["state"] == "cancelled"
        r = c.post("/v1/jobs", json=job_body(image, model=PARKED, seed=9))
        assert r.status_code == 201, r.text
        c.delete(f"/v1/jobs/{r.json()['id']}")


def test_a_key_that_holds_over_its_cap_has_every_job_run_one_at_a_time(api, sd15_worker):
    """over_cap: hold accepts past max_in_flight (1 here) and dispatches the key's jobs one at a
    time: each starts only after the one before it ended."""
    with api.client("tok-held") as c:
        image = upload(c)
        posted = [c.post("/v1/jobs", json=job_body(image, steps=20, seed=70 + i)) for i in range(3)]
        assert [r.status_code for r in posted] == [201, 201, 201], [r.text for r in posted]
        jobs = [wait_state(c, r.json()["id"]) for r in posted]
    assert [j["state"] for j in jobs] == ["succeeded"] * 3
    spans = sorted((j["started_at"], j["finished_at"]) for j in jobs)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


@pytest.mark.parametrize("change, status, message", [
    ({"strength": 1.5}, 422, "strength"),
    ({"model": "no-such-model"}, 422, "unknown model 'no-such-model'"),
])
def test_invalid_jobs_are_422_naming_the_problem(api, http, change, status, message):
    r = http.post("/v1/jobs", json=job_body("s3://easel/inputs/x.png", **change))
    assert r.status_code == status and message in json.dumps(r.json())


def test_server_side_paths_and_bad_uploads_are_refused(api, http):
    r = http.post("/v1/jobs", json=job_body("/etc/passwd"))
    assert r.status_code == 422 and "local paths are uploaded by the client" in json.dumps(r.json())
    r = http.post("/v1/uploads", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"]


def test_idempotency_key_header_replays_the_job(api, http):
    body = job_body(upload(http), model=PARKED)
    a = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "api-idem-1"})
    b = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "api-idem-1"})
    assert (a.status_code, b.status_code) == (201, 200) and a.json()["id"] == b.json()["id"]
    with api.client("tok-other") as other:  # another key's same idempotency key is another job
        c = other.post("/v1/jobs", json=body, headers={"Idempotency-Key": "api-idem-1"})
        assert c.status_code == 201 and c.json()["id"] != a.json()["id"]
        other.delete(f"/v1/jobs/{c.json()['id']}")
    http.delete(f"/v1/jobs/{a.json()['id']}")


def test_a_replay_adds_only_a_webhook_url_a_new_job_could_have(inproc):
    """A retry whose first request's reply was lost may record the job's webhook, which the
    first request could not record in time: only with a URL that passes a new job's check
    (https, a public address). A private one is not added; the answer is the job, as for any
    replay."""
    body = job_body(upload(inproc))
    key = {"Idempotency-Key": f"mend-{uuid.uuid4().hex[:8]}"}
    first = inproc.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == 201 and first.json()["webhook"] is None
    private = inproc.post("/v1/jobs", json={**body, "webhook_url": "https://10.0.0.5/hook"}, headers=key)
    assert private.status_code == 200 and private.json()["id"] == first.json()["id"]
    assert private.json()["webhook"] is None
    public = inproc.post("/v1/jobs", json={**body, "webhook_url": "https://93.184.216.34/hook"}, headers=key)
    assert public.status_code == 200 and public.json()["webhook"]["url"] == "https://93.184.216.34/hook"
    plain = inproc.post("/v1/jobs", json={**body, "webhook_url": "http://93.184.216.34/hook"})  # a new job's check
    assert plain.status_code == 422
    assert plain.json()["detail"].startswith("webhook_url: only https:// webhook URLs are accepted"), plain.text


@pytest.fixture
def inproc(easel_env):
    """The app in this process (FastAPI's TestClient over the session's valkey and SeaweedFS),
    to reach its state: a queue prefix of its own, which no worker serves (its jobs stay
    queued), private and unresolvable URLs refused as in production, and server errors
    answered as a client sees them rather than raised here."""
    from fastapi.testclient import TestClient

    from easel.producer.api.app import create_app
    from easel.shared.settings import Settings

    settings = Settings(api_keys=json.loads(keys_env()), queue_prefix=f"inproc{uuid.uuid4().hex[:8]}",
                        webhook_secret=WEBHOOK_SECRET, allow_private_urls=False)
    app = create_app(settings, webhooks=False)
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": "Bearer tok-main"}) as c:
        yield c
    r = app.state.api.r
    if keys := list(r.scan_iter(match=f"{settings.queue_prefix}*")):
        r.delete(*keys)


UNRESOLVABLE = "https://easel-test.invalid"  # .invalid never resolves (RFC 2606)


def test_a_name_that_does_not_resolve_now_is_503_not_a_refused_job(inproc):
    """A DNS failure may pass in a moment: 503 with Retry-After, for an input URL as for a
    webhook URL, where a 422 would tell the client never to send that job again."""
    image = upload(inproc)
    for body, field in ((job_body(f"{UNRESOLVABLE}/in.png"), "input image"),
                        ({**job_body(image), "webhook_url": f"{UNRESOLVABLE}/hook"}, "webhook_url")):
        r = inproc.post("/v1/jobs", json=body)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (field, r.status_code, r.text)
        assert r.json()["detail"].startswith(f"{field}: cannot resolve easel-test.invalid"), r.json()


def test_a_retry_gets_its_job_before_any_check_of_a_new_one(inproc):
    """A retry with the job's Idempotency-Key answers the job (200) before the checks a new job
    goes through (webhook and input URLs resolved, inputs read, the chain planned): a retry
    during a DNS or S3 blip must not be told its job failed. The retry's body names hosts
    that do not resolve, standing in for names that resolved at first and do not now."""
    key = {"Idempotency-Key": f"replay-{uuid.uuid4().hex}"}
    first = inproc.post("/v1/jobs", json=job_body(upload(inproc)), headers=key)
    assert first.status_code == 201, first.text
    retry = {**job_body(f"{UNRESOLVABLE}/in.png"), "webhook_url": f"{UNRESOLVABLE}/hook"}
    again = inproc.post("/v1/jobs", json=retry, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text
    assert again.headers["location"] == first.headers["location"]
    # The job had no webhook: the retry's is registered, as its first request would have done
    # had its reply been lost after queueing the job (the URL is checked when it is sent to).
    assert again.json()["webhook"]["url"] == retry["webhook_url"]
    assert inproc.delete(f"/v1/jobs/{first.json()['id']}").json()["state"] == "cancelled"


def test_an_idempotency_key_another_owners_job_holds_is_409_not_that_job(inproc):
    """Idempotency keys are per API key ("main/<key>"), but a job submitted without the API
    (the CLI, the Python client: no owner) may carry any key, that one too: the API key's
    request is refused, not answered with that job and its presigned outputs."""
    api = inproc.app.state.api
    key = f"taken-{uuid.uuid4().hex}"
    image = upload(inproc)
    operators = api.client.submit({**job_body(image), "idempotency_key": f"main/{key}"})
    r = inproc.post("/v1/jobs", json=job_body(image), headers={"Idempotency-Key": key})
    assert r.status_code == 409 and "already uses it" in r.json()["detail"], r.text
    assert not api.r.sismember(api.inflight.key("main"), operators)  # nor counted under the key's cap
    assert api.store.owner(operators) is None


def test_a_job_queued_just_before_redis_drops_is_already_its_keys(inproc):
    """The script that queues a job writes its owner with it: a connection lost right after
    (the reply of the next command never comes) leaves a job its key can read, cancel and
    get again with its idempotency key, never one that no key owns; the retry then does
    what the first request could not."""
    import redis as redis_lib

    api = inproc.app.state.api
    queued, submit_many = [], api.client.scheduler.submit_many

    def queued_then_dropped(*args, **kw):
        queued.extend(got.job_id for got in submit_many(*args, **kw))
        raise redis_lib.ConnectionError("Connection closed by server.")

    key = {"Idempotency-Key": f"blip-{uuid.uuid4().hex}"}
    body = {**job_body(upload(inproc)), "webhook_url": "https://93.184.216.34/hook"}  # public, no DNS
    api.client.scheduler.submit_many = queued_then_dropped
    try:
        r = inproc.post("/v1/jobs", json=body, headers=key)
    finally:
        del api.client.scheduler.submit_many
    assert r.status_code == 503 and len(queued) == 1, (r.status_code, r.text)
    (job_id,) = queued
    assert api.store.owner(job_id) == "main"
    assert inproc.get(f"/v1/jobs/{job_id}").status_code == 200
    assert not api.r.sismember(api.inflight.key("main"), job_id)  # its reservation went with the 503
    again = inproc.post("/v1/jobs", json=body, headers=key)
    assert again.status_code == 200 and again.json()["id"] == job_id, again.text
    # What the first request would have done next: the job counts under the key's cap, and
    # has its webhook.
    assert api.r.sismember(api.inflight.key("main"), job_id)
    assert again.json()["webhook"]["url"] == body["webhook_url"]
    assert inproc.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_a_redis_error_no_retry_mends_is_500_and_its_text_stays_in_the_log(inproc, caplog):
    """Redis refusing a command (here a rate-limit bucket of the wrong type: WRONGTYPE) is the
    server's fault, so no Retry-After that would have clients retry it forever; the reply
    is logged with its traceback, and the client sees no Redis text."""
    api = inproc.app.state.api
    bucket = f"{api.s.queue_prefix}:ratelimit:main"
    api.r.set(bucket, "not a hash")
    try:
        r = inproc.get("/v1/queues")
    finally:
        api.r.delete(bucket)
    assert r.status_code == 500 and "retry-after" not in r.headers, (r.status_code, r.text)
    assert "WRONGTYPE" not in r.text and "server's log" in r.json()["detail"]
    logged = [rec for rec in caplog.records if rec.name == "easel.api" and rec.exc_info]
    assert logged and "WRONGTYPE" in str(logged[-1].exc_info[1])


def test_a_job_whose_record_expires_after_the_ownership_check_is_404(inproc):
    """The record can expire between the ownership check and the read or the cancel; the
    store then raises KeyError, which must be the 404 Problem a moment later would get, not
    a bare 500. The record is deleted right after the check, where its TTL would run out."""
    api = inproc.app.state.api
    image, checked = upload(inproc), api.owned

    def owned_then_expired(job_id, principal):
        checked(job_id, principal)
        api.r.delete(api.store.key(job_id))

    api.owned = owned_then_expired
    try:
        for method in ("GET", "DELETE"):
            job_id = inproc.post("/v1/jobs", json=job_body(image)).json()["id"]
            r = inproc.request(method, f"/v1/jobs/{job_id}")
            assert r.status_code == 404 and r.json() == {"detail": f"no job {job_id}"}, (method, r.text)
    finally:
        del api.owned


def test_a_queued_job_answers_from_one_read_of_its_record(inproc):
    """A queued job's response (status, place in line, webhook) comes from one read of its
    record: a record that expires right after that read still answers as read, where a
    second read of it (for where it waits, or its webhook) would find nothing. The record is
    deleted right after the read, where its TTL would run out."""
    api = inproc.app.state.api
    store = api.client.store
    job_id = inproc.post("/v1/jobs", json=job_body(upload(inproc))).json()["id"]
    before = inproc.get(f"/v1/jobs/{job_id}").json()
    assert before["state"] == "queued"  # no worker serves inproc's queues
    read = store.view

    def read_then_expired(job_id):
        view = read(job_id)
        api.r.delete(store.key(job_id))
        return view

    store.view = read_then_expired
    try:
        r = inproc.get(f"/v1/jobs/{job_id}")
    finally:
        del store.view
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("state", "progress", "waiting_for")} == \
        {k: before[k] for k in ("state", "progress", "waiting_for")}
    assert inproc.get(f"/v1/jobs/{job_id}").status_code == 404  # gone for the next read


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_direct_uploads_take_the_formats_the_docs_name(http, fmt):
    """docs/how-to/http-api.md names these beside PNG, JPEG and WEBP (presigned uploads take
    only those three)."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes((64, 64)))).save(buf, fmt)
    r = http.post("/v1/uploads", files={"file": (f"in.{fmt.lower()}", buf.getvalue(), "application/octet-stream")})
    assert r.status_code == 201 and r.json()["image"].endswith(f".{fmt.lower()}"), r.text


class Receiver:
    """A real HTTP server that records webhook calls and answers from a script of status codes."""

    def __init__(self, statuses: list[int]):
        self.calls: queue.Queue = queue.Queue()
        self.statuses = list(statuses)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.calls.put((dict(self.headers), body, time.time()))
                code = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 60):
        return self.calls.get(timeout=timeout)

    def close(self):
        self.server.shutdown()


def test_webhook_is_signed_retried_and_carries_the_result(api, http, sd15_worker):
    rx = Receiver([500])  # first attempt fails: the dispatcher must retry with backoff
    try:
        body = {**job_body(upload(http), seed=5), "webhook_url": rx.url}
        job_id = http.post("/v1/jobs", json=body).json()["id"]
        h1, b1, t1 = rx.next()
        h2, b2, t2 = rx.next()
        assert t2 - t1 >= 0.2  # backoff, not a hot loop
        for headers, raw in ((h1, b1), (h2, b2)):
            # Any Standard Webhooks verifier accepts it, with the old secret as with the new one.
            for secret in (NEW_SECRET, OLD_SECRET):
                assert Webhook(secret).verify(raw, headers) == json.loads(raw)
            verify_signature(WEBHOOK_SECRET, headers, raw)
        assert h1["webhook-id"] == h2["webhook-id"] == f"{job_id}.succeeded"  # receivers dedupe retries on it
        event = json.loads(b2)
        assert event["type"] == "job.succeeded" and event["job"]["id"] == job_id and event["attempt"] == 2
        assert event["key"] == "main"  # the submitting key, signed with the rest
        assert h2["Easel-Event"] == "job.succeeded" and len(h2["webhook-signature"].split()) == 2
        png = httpx.get(event["job"]["outputs"][0]["url"])
        assert Image.open(io.BytesIO(png.content)).format == "PNG"
        deadline = time.monotonic() + 10
        while http.get(f"/v1/jobs/{job_id}").json()["webhook"]["state"] != "delivered":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert http.get(f"/v1/jobs/{job_id}").json()["webhook"]["attempts"] == 2
        with pytest.raises(ValueError, match="does not match"):
            verify_signature("whsec_" + base64.b64encode(b"wrong").decode(), h2, b2)
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + base64.b64encode(b"wrong").decode()).verify(b2, h2)
        with pytest.raises(ValueError, match="tolerance"):
            verify_signature(WEBHOOK_SECRET, h2, b2, now=time.time() + 3600)
    finally:
        rx.close()


def test_a_keys_event_filter_decides_which_webhooks_it_gets(api, sd15_worker):
    """The "watcher" key asked for queued, started, progress and succeeded; the default
    keys get the terminal events only (the tests above). The job runs several of the
    dispatcher's 1 s sweeps, so one of them sees it in progress."""
    rx = Receiver([])
    try:
        with api.client("tok-watcher") as http:
            body = {**job_body(upload(http), steps=400, strength=1.0), "webhook_url": rx.url}
            job_id = http.post("/v1/jobs", json=body).json()["id"]
            calls = []
            while not calls or calls[-1][0]["Easel-Event"] != "job.succeeded":
                calls.append(rx.next())
    finally:
        rx.close()
    types = [h["Easel-Event"] for h, _, _ in calls]
    assert {"job.queued", "job.started", "job.progress", "job.succeeded"} <= set(types), types
    assert len(types) == len(set(h["webhook-id"] for h, _, _ in calls))  # one delivery per event
    for headers, raw, _ in calls:
        assert Webhook(NEW_SECRET).verify(raw, headers)["job"]["id"] == job_id


def test_a_job_ending_in_an_event_its_key_left_out_still_reads(api, sd15_worker):
    """The "watcher" key asked for no job.failed: its failed job gets no such webhook, and
    the job still reads, its webhook "not requested"."""
    rx = Receiver([])
    try:
        with api.client("tok-watcher") as http:
            body = {**job_body(unreadable_input()), "webhook_url": rx.url}
            job_id = http.post("/v1/jobs", json=body).json()["id"]
            deadline = time.monotonic() + 60
            while True:
                r = http.get(f"/v1/jobs/{job_id}")
                assert r.status_code == 200, r.text
                if r.json()["webhook"]["state"] == "not requested":
                    break
                assert time.monotonic() < deadline, r.json()
                time.sleep(0.1)
            assert r.json()["state"] == "failed"
        sent = []
        while not rx.calls.empty():
            sent.append(rx.calls.get()[0]["Easel-Event"])
        assert "job.failed" not in sent, sent
    finally:
        rx.close()


def test_a_terminal_webhook_is_due_when_its_job_ends_and_passing_ones_are_read_a_page_a_sweep(client):
    """A job whose key wants only terminal events is never read by the dispatchers: the state
    change that ends it makes its delivery due, and registering a job that has already ended
    does. Jobs wanting passing events are read a page a sweep, the next page each sweep: one
    behind a full page of older jobs still waiting is seen by the second sweep."""
    from easel.producer.webhooks import WebhookDispatcher
    from easel.shared.jobstore import JobStore
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec, JobState
    from easel.shared.settings import Settings

    store = JobStore(client.store.r, prefix="webhook-page")  # no other test's jobs
    hooks = WebhookDispatcher(Settings(), store, render=lambda j: {"id": j}, secret_for=lambda owner: None)
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"},
                                   "stages": [{"model": "sd15", "prompt": "x", "seed": 1}]})
    plan = plan_job(spec, client.registry)
    ids = [store.create(spec, plan)[0] for _ in range(hooks.WATCH_PAGE + 4)]
    url = "https://hooks.example.test/easel"
    try:
        terminal_only, ended_before, short, *watched = ids
        hooks.register(terminal_only, url, ["succeeded"])
        assert store.r.zscore(hooks.watch_key, terminal_only) is None
        assert store.transition(terminal_only, JobState.succeeded)
        assert store.r.zscore(hooks.due_key, terminal_only) == 0  # due now, before any sweep
        assert store.transition(ended_before, JobState.cancelled, error="cancelled")
        hooks.register(ended_before, url, ["succeeded"])  # ended in a state its key does not want
        assert store.r.zscore(hooks.due_key, ended_before) is None
        assert store.r.hget(store.key(ended_before), "webhook_state") == "not requested"

        # A job that starts and ends between two sweeps: its terminal event is due at once, its
        # started event is still sent once a sweep reads it, and the terminal one only once.
        hooks.register(short, url, ["started", "succeeded"])
        assert store.transition(short, JobState.running, started_at=time.time())
        assert store.transition(short, JobState.succeeded)
        assert store.r.zscore(hooks.due_key, short) == 0
        store.r.hset(store.key(short), "webhook_state", "delivered")  # as if delivered before the sweep
        store.r.zrem(hooks.due_key, short)

        for job_id in watched:  # oldest first
            hooks.register(job_id, url, ["started"])
        last = watched[-1]
        assert store.transition(last, JobState.running, started_at=time.time())
        hooks.sweep()  # the oldest page: the short job's started event; the others still queued
        assert store.r.hget(store.key(short), "webhook_sent:started") is not None
        assert store.r.zscore(hooks.watch_key, short) is None
        assert store.r.zscore(hooks.due_key, short) is None  # delivered already: not due again
        assert store.r.hget(store.key(last), "webhook_sent:started") is None
        hooks.sweep()  # the next page: its started event is scheduled
        assert store.r.hget(store.key(last), "webhook_sent:started") is not None
        assert store.transition(last, JobState.failed, error="x")
        assert store.r.hget(store.key(last), "webhook_state") == "not requested"
    finally:
        hooks.stop()
        store.r.delete(hooks.watch_key, hooks.due_key, *(store.key(j) for j in ids))


def test_webhook_on_failure_names_the_reason(api, http, sd15_worker):
    rx = Receiver([])
    try:
        body = {**job_body(unreadable_input()), "webhook_url": rx.url}
        job_id = http.post("/v1/jobs", json=body).json()["id"]
        headers, raw, _ = rx.next()
        event = json.loads(raw)
        verify_signature(WEBHOOK_SECRET, headers, raw)
        assert event["type"] == "job.failed" and event["job"]["id"] == job_id
        assert "input image is not a readable image" in event["job"]["error"]
    finally:
        rx.close()


FUZZ_KEYS = {  # the two peers of tests/schemathesis.toml, with limits the checker's pace stays under
    "tok-main": {"name": "main", "rate_per_min": 60000, "burst": 5000},
    "tok-other": {"name": "other", "rate_per_min": 60000, "burst": 5000},
}


@pytest.mark.slow
def test_schemathesis_all_checks_pass(easel_env, tmp_path):
    """Every schemathesis check, stateful phase included, against a live server: statuses, bodies,
    headers and content types as the OpenAPI document says, invalid input refused, valid input
    accepted, auth enforced, 405s with a true Allow, and one key's jobs invisible to another.
    tests/schemathesis.toml holds the departures from schemathesis' defaults, each with its
    reason. A queue prefix of its own keeps generated jobs away from the session's workers."""
    env = {**easel_env, "EASEL_API_KEYS": keys_env(FUZZ_KEYS), "EASEL_QUEUE_PREFIX": "fuzz",
           "EASEL_WEBHOOK_SECRET": WEBHOOK_SECRET, "EASEL_API_SSE_MAX_S": "1"}
    wfc = tmp_path / "wfc-auth.yaml"
    wfc.write_text(yaml.safe_dump({"auth": [
        {"name": cfg["name"], "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {token}"}]}
        for token, cfg in FUZZ_KEYS.items()]}))
    server = ApiServer(env, tmp_path, "fuzz-api").start()
    image = upload(server.client(), png_bytes((64, 64)))  # what valid generated jobs name (schemathesis_hooks)
    try:
        r = subprocess.run(
            [str(Path(sys.executable).with_name("st")), "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
             "run", f"{server.url}/openapi.json", "--checks", "all",
             # DELETE /v1/jobs/{id} cancels: the job stays readable as `cancelled` (its error, its
             # SSE `done`) until it expires, as clients rely on, so a read after it is no use-after-free.
             "--exclude-checks", "use_after_free",
             "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "40", "--seed", "1",
             "--request-timeout", "20", "--generation-database", "none", "--no-color"],
            capture_output=True, text=True, timeout=480, cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT),
                 "EASEL_FUZZ_WFC": str(wfc), "EASEL_FUZZ_IMAGE": image})
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-8000:]
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        assert m and m.group(1) == m.group(2) and int(m.group(1)) > 500, out[-3000:]
        for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
            assert re.search(rf"✅ +{phase} \(in ", out), (phase, out[-3000:])
        scenarios = re.search(r"Scenarios: +(\d+)", out)
        links = re.search(r"API Links: +(\d+) covered", out)
        assert scenarios and int(scenarios.group(1)) >= 10 and links and int(links.group(1)) >= 5, out[-3000:]
    finally:
        server.stop()


def test_event_streams_opened_at_once_cannot_pass_the_cap_together(easel_env, tmp_path):
    """Twelve streams of one key opened at the same moment: the cap (4 a process, of which a
    key holding a quarter gets 3) holds for them too; the rest get 503 before their response
    starts. The slot is taken where it is checked."""
    env = {**easel_env, "EASEL_API_KEYS": keys_env(), "EASEL_MODELS": str(registry_with_parked_family(tmp_path)),
           "EASEL_API_SSE_MAX_STREAMS": "4",
           "EASEL_QUEUE_PREFIX": f"ssecap{uuid.uuid4().hex[:8]}"}  # its parked job takes no other test's room
    server = ApiServer(env, tmp_path, name="api-sse-cap").start()
    try:
        with server.client() as c:
            job_id = c.post("/v1/jobs", json={**job_body(upload(c)), "stages": [
                {"model": PARKED, "prompt": "a fox", "steps": 2}]}).json()["id"]
        start, codes, held = threading.Barrier(12), [], threading.Event()

        def open_stream() -> None:
            with server.client() as c:
                start.wait()
                with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        next(r.iter_lines())
                        held.wait(30)  # keep it open until every other request has its answer

        threads = [threading.Thread(target=open_stream) for _ in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(codes) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        held.set()
        for t in threads:
            t.join(30)
        assert sorted(codes) == [200] * 3 + [503] * 9, codes
    finally:
        server.stop()


def test_a_key_kept_at_a_large_cap_reads_a_sample_of_its_jobs_a_refusal(client):
    """A bulk key kept at a cap of 1,000 refuses its next submissions reading at most a
    sample of its jobs' states each (64), not all 1,000; once many have ended, a sample
    finds some and the next submission is let in."""
    import hashlib

    from easel.producer.api.security import InFlight, Principal
    from easel.shared.settings import ApiKey

    r, prefix = client.store.r, f"capsample{uuid.uuid4().hex[:8]}"
    flight = InFlight(r, prefix)
    key = ApiKey(name="bulk", sha256=hashlib.sha256(b"tok-bulk").hexdigest(), max_in_flight=1000)
    p = Principal(key=key, rate_per_min=60, burst=10, max_in_flight=1000)
    ids = [uuid.uuid4().hex for _ in range(1000)]
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hset(f"{prefix}:job:{job_id}", "state", "queued")
    pipe.sadd(flight.key("bulk"), *ids)
    pipe.execute()

    def state_reads() -> int:
        return r.info("commandstats").get("cmdstat_hget", {}).get("calls", 0)

    try:
        before = state_reads()
        for _ in range(3):
            assert flight.reserve(p) == (None, 1000)
        assert state_reads() - before < 400  # 3 x 64, and whatever else ran meanwhile; 3,000 read whole
        pipe = r.pipeline(transaction=False)
        for job_id in ids[::2]:
            pipe.hset(f"{prefix}:job:{job_id}", "state", "succeeded")
        pipe.execute()
        token, n = flight.reserve(p)
        assert token is not None and n < 1000
    finally:
        r.delete(flight.key("bulk"), *(f"{prefix}:job:{job_id}" for job_id in ids))
