"""S3-compatible storage over boto3: inputs, hand-off latents, results and manifests.

Keys are deterministic (``jobs/<job_id>/...``) so a stage delivered twice overwrites the
same objects with the same bytes instead of producing a second result.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from easel.shared.settings import Settings

log = logging.getLogger("easel.storage")

_MIME = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg", "gif": "image/gif", "bmp": "image/bmp",
         "tiff": "image/tiff", "json": "application/json", "safetensors": "application/octet-stream"}


class DeleteRefused(RuntimeError):
    """The S3 server kept objects it was asked to delete (no permission, an object lock);
    ``deleted``: how many of the others it did delete."""

    def __init__(self, refused: list[dict], asked: int, bucket: str):
        first = refused[0]
        why = f"{first.get('Code')} ({first.get('Message')})"
        if first.get("Code") == "AccessDenied":
            why += ": easel's S3 credentials need s3:DeleteObject on the bucket"
        super().__init__(f"S3 refused to delete {len(refused)} of {asked} objects, e.g. "
                         f"s3://{bucket}/{first.get('Key', '?')}: {why}")
        self.refused, self.deleted = refused, asked - len(refused)


class NotFound(KeyError):
    """The object does not exist (a readable, permanent failure)."""


@dataclass(frozen=True)
class S3Ref:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> "S3Ref":
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// reference: {uri!r}")
        bucket, _, key = uri[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"s3 reference must be s3://bucket/key: {uri!r}")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


# What S3 servers without lifecycle support answer to a lifecycle call.
# A server without lifecycle rules, or credentials that may not set them: the sweep does the work.
LIFECYCLE_UNSUPPORTED = {"NotImplemented", "MethodNotAllowed", "501", "405", "AccessDenied", "403"}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


# S3 answers that mean "not now", still there after boto3's own retries: a server busy,
# throttling or failing over, not refusing the call.
_NOT_NOW_CODES = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                            "RequestLimitExceeded", "ServiceUnavailable", "InternalError"})
_UNREACHABLE = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                botocore.exceptions.IncompleteReadError)


def s3_not_now(exc: BaseException) -> bool:
    """Whether the same S3 call may succeed later: the server unreachable, a connection
    dropped mid-request, a timeout, throttling (429, ``SlowDown``) or a 5xx."""
    if isinstance(exc, _UNREACHABLE):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or _code(exc) in _NOT_NOW_CODES
    return False


# Between a patient write's tries: full jitter over a doubling from 0.5 s, capped at 10 s, so
# the writes of a farm's workers do not come back in lock-step when S3 does.
WRITE_BACKOFF_BASE_S, WRITE_BACKOFF_CAP_S = 0.5, 10.0
T = TypeVar("T")


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def handoff_prefix(job_id: str) -> str:
    """Where a chain's hand-offs between families are kept until the job ends."""
    return f"{job_prefix(job_id)}handoff/"


INPUT_SLACK_S = 3600  # how much less than a job record's TTL a reused input may have left
FRESH_KNOWN_S = 60.0  # how long a process trusts its last look at an object's age
# What retention expires: results and hand-offs, inputs, the API's presigned uploads.
RETAINED_PREFIXES = ("jobs/", "inputs/", "uploads/")


# An input's key: inputs/<sha256 of its bytes>[-<width>x<height>].<ext>
_INPUT_KEY = re.compile(r"inputs/[0-9a-f]{64}(?:-([0-9]{1,6})x([0-9]{1,6}))?\.[a-z0-9]{1,5}")


def input_key(sha256: str, ext: str, size: tuple[int, int] | None) -> str:
    return f"inputs/{sha256}{f'-{size[0]}x{size[1]}' if size else ''}.{ext}"


def is_input_key(key: str) -> bool:
    """A key ``put_input`` writes: its name says its bytes."""
    return _INPUT_KEY.fullmatch(key) is not None


def named_input_size(ref: str | None) -> tuple[int, int] | None:
    """The (width, height) an input's ``s3://`` reference names (``put_input``), or None."""
    try:
        m = _INPUT_KEY.fullmatch(S3Ref.parse(ref or "").key)
    except ValueError:  # not an s3:// reference
        return None
    return None if m is None or m.group(1) is None else (int(m.group(1)), int(m.group(2)))


def _missing(e: ClientError) -> bool:
    """S3's answer for an object (or bucket) that is not there."""
    return e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NoSuchBucket", "NotFound")


def _denied(e: ClientError) -> bool:
    """S3's answer to credentials that may not make the call (a HEAD's answer has no reason)."""
    return _code(e) in ("AccessDenied", "403")


def bucket_lookup_answered(e: ClientError) -> bool:
    """A bucket lookup that S3 answered: the bucket is not there (ours to create), or the
    credentials may not look it up (403: no ``s3:ListBucket``; ``ensure_bucket`` takes them at
    their word that it exists). Anything else (a 5xx) is S3 failing."""
    return _missing(e) or _denied(e)


def s3_client(settings: Settings, *, attempts: int = 4, connect_s: float = 5, read_s: float = 60):
    """An S3 client for ``settings``: ``attempts`` in all for each call (the first and its
    retries), each read bounded by ``read_s``."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(
            # SeaweedFS and other S3 servers mishandle the default flexible checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect_s,
            read_timeout=read_s,
            s3={"addressing_style": "path"},
            signature_version="s3v4",  # presigned POST policies are SigV2 otherwise
        ),
        **settings.s3_credentials(),
    )


def _no_rules(e: ClientError) -> bool:
    """False, after a warning where the rules may be there but not ours to change."""
    if _code(e) in ("AccessDenied", "403"):
        log.warning("these S3 credentials may not read or set the bucket's lifecycle rules (%s): retention "
                    "sweeps instead, and rules set earlier by other credentials stay in force", _code(e))
    return False


def _remember(cache: dict[str, float], key: str, until: float) -> None:
    if len(cache) > 10_000:
        cache.clear()
    cache[key] = until


class Storage:
    def __init__(self, settings: Settings, write_patience_s: float = 0):
        """``write_patience_s``: how long each ``put`` keeps trying while S3 is away or
        busy (``s3_not_now``). A worker's results want patience: a failed write sends the
        segment again, its GPU work lost. Zero: the client's quick tries only."""
        self.settings = settings
        self.bucket = settings.s3_bucket
        self.write_patience_s = write_patience_s
        # A few quick tries (four in all, boto3's backoff: a few seconds at most); longer outages
        # are the task's retries (backoff up to 30 s), or a write's patience.
        self.client = s3_client(settings)
        # For the best-effort look a submission takes at the objects it names: one short
        # try, so an S3 outage slows no submission by more than a few seconds.
        self._quick = s3_client(settings, attempts=1, connect_s=2, read_s=5)
        self._bucket_ready = False
        self._lock = threading.Lock()
        self._fresh_until: dict[str, float] = {}  # key -> monotonic time its age was last found fine until
        self._looked_until: dict[str, float] = {}  # key -> until when a submission need not look again

    def ensure_bucket(self) -> None:
        """Create the bucket where it is missing. Credentials that may write objects but not
        look the bucket up (403: no ``s3:ListBucket``) are taken at their word that it exists."""
        if self._bucket_ready:
            return
        with self._lock:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _missing(e):
                    self._create_bucket()
                elif not _denied(e):
                    return  # a 5xx: the write that follows says why
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # created by someone else meanwhile
                raise

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes, content_type: str | None = None, metadata: dict[str, str] | None = None) -> str:
        ext = key.rsplit(".", 1)[-1]

        def write() -> None:
            self.ensure_bucket()  # once per process; within the write's patience
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                   ContentType=content_type or _MIME.get(ext, "application/octet-stream"),
                                   Metadata=metadata or {})

        self._patiently(write)
        return self.uri(key)

    def _patiently(self, call: Callable[[], T]) -> T:
        """``call()``, tried again while S3 is not there for now, until ``write_patience_s``
        has passed (the last try at that point). A time rather than a count of tries: what a
        count rides out depends on boto3's backoff, which its releases change."""
        deadline = time.monotonic() + self.write_patience_s
        tried = 0
        while True:
            try:
                return call()
            except Exception as exc:
                left = deadline - time.monotonic()
                if left <= 0 or not s3_not_now(exc):
                    raise
                if tried == 0:
                    log.warning("S3 write failed (%s: %s); trying again for up to %.0fs", type(exc).__name__, exc,
                                left)
            time.sleep(min(left, random.uniform(0, min(WRITE_BACKOFF_CAP_S, WRITE_BACKOFF_BASE_S * 2 ** tried))))
            tried += 1

    def get(self, uri_or_key: str, max_bytes: int | None = None) -> bytes:
        ref = S3Ref.parse(uri_or_key) if uri_or_key.startswith("s3://") else S3Ref(self.bucket, uri_or_key)
        try:
            obj = self.client.get_object(Bucket=ref.bucket, Key=ref.key)
        except ClientError as e:
            if _missing(e):
                raise NotFound(f"{ref} does not exist") from None
            raise
        size = obj.get("ContentLength") or 0
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{ref} is {size} bytes, over the {max_bytes}-byte limit")
        return obj["Body"].read()

    def exists(self, uri_or_key: str) -> bool:
        ref = S3Ref.parse(uri_or_key) if uri_or_key.startswith("s3://") else S3Ref(self.bucket, uri_or_key)
        try:
            self.client.head_object(Bucket=ref.bucket, Key=ref.key)
            return True
        except ClientError:
            return False

    def put_input(self, data: bytes, ext: str, size: tuple[int, int] | None = None) -> str:
        """Content-addressed upload: the same bytes land on the same key. ``size``: the image's
        (width, height) as a worker decodes it, named in the key (``input_key``) so that a
        producer charges a job over it its work without reading it again. A job may wait as
        long as its record lives (``job_ttl_s``) and retention counts from an object's last
        write, so a copy there with less life left than that (less an hour, so that a
        thousand jobs over one image rewrite it once an hour, not a thousand times) is
        rewritten by a copy onto itself on the server: the bytes are not sent again."""
        key = input_key(hashlib.sha256(data).hexdigest(), ext, size)
        try:
            there = self._keep(key)
        except ClientError:  # could not tell: write it
            there = False
        if not there:
            self.put(key, data)
        return self.uri(key)

    def keep_for_a_job(self, uri: str) -> bool:
        """An object of this bucket that retention expires, named by a new job (an input used
        again by its ``s3://`` URI, an earlier job's output), gets at least as much life left
        as ``put_input`` gives. False when it is not there (a job naming it would fail). An
        object found is trusted for a minute; one elsewhere (another bucket or prefix) is not
        looked at, and an S3 error here only skips the rewrite: the worker's read decides."""
        try:
            ref = S3Ref.parse(uri)
        except ValueError:  # the job's validation names it
            return True
        now = time.monotonic()
        if (ref.bucket != self.bucket or not ref.key.startswith(RETAINED_PREFIXES)
                or now < self._looked_until.get(ref.key, 0.0)):
            return True
        try:
            found = self._keep(ref.key, self._quick)
        except (BotoCoreError, ClientError) as e:  # could not tell: not asked again for a minute
            log.warning("could not check the age of %s for a new job: %s", uri, e)
            found = True
        if found:  # (a missing one is looked for again: it may be uploaded any moment)
            _remember(self._looked_until, ref.key, now + FRESH_KNOWN_S)
        return found

    def _keep(self, key: str, client=None) -> bool:
        """Rewrite ``key`` in place when it has less life left than a new job's record may
        need; False when there is no such object. A process trusts what it found for a minute
        at most, so a bulk submission over one image looks once a minute, not once a job."""
        now = time.monotonic()
        if now < self._fresh_until.get(key, 0.0):
            return True
        age, fresh_s = self.age_s(key, client), self._input_fresh_s()
        if age is None:
            return False
        if age > fresh_s:
            if not self._rewrite(key, client):
                return False
            age = 0.0
        _remember(self._fresh_until, key, now + min(FRESH_KNOWN_S, fresh_s - age))
        return True

    def _input_fresh_s(self) -> float:
        """How old a reused input may be and still outlive a new job's record (less the slack);
        with no retention, any age."""
        keep_s, ttl_s = self.settings.retention_days * 86400, self.settings.job_ttl_s
        # The slack is at most half a record's life, so a reused input always has at least
        # that much left (and never one past its deletion, with records shorter than the slack).
        return max(0, keep_s - ttl_s) + min(INPUT_SLACK_S, ttl_s / 2) if keep_s else float("inf")

    def _rewrite(self, key: str, client=None) -> bool:
        """Copy the object onto itself (a new last-write time); False when there is none."""
        try:
            (client or self.client).copy_object(
                Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                MetadataDirective="REPLACE", ContentType=_MIME.get(key.rsplit(".", 1)[-1], "application/octet-stream"))
        except ClientError as e:
            if _missing(e):
                return False
            raise
        return True

    def age_s(self, key: str, client=None) -> float | None:
        """Seconds since the object was last written; None when there is none (another
        refusal, e.g. a busy server's, raises)."""
        try:
            head = (client or self.client).head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _missing(e):
                return None
            raise
        return time.time() - head["LastModified"].timestamp()

    def presign(self, uri_or_key: str, expires_s: int = 3600) -> str:
        ref = S3Ref.parse(uri_or_key) if uri_or_key.startswith("s3://") else S3Ref(self.bucket, uri_or_key)
        return self.client.generate_presigned_url("get_object", Params={"Bucket": ref.bucket, "Key": ref.key},
                                                  ExpiresIn=expires_s)

    def presign_upload(self, key: str, content_type: str, max_bytes: int, expires_s: int = 3600) -> dict:
        """A presigned POST for one upload: ``{"url", "fields"}``. Its policy makes the S3
        server itself refuse a body over ``max_bytes`` or of another content type (a
        presigned PUT cannot bound the size)."""
        return self.client.generate_presigned_post(
            self.bucket, key, Fields={"Content-Type": content_type},
            Conditions=[{"Content-Type": content_type}, ["content-length-range", 1, max_bytes]],
            ExpiresIn=expires_s)

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    def expire_after(self, prefixes: Iterable[str], days: int) -> bool:
        """Lifecycle rules that expire objects under ``prefixes`` ``days`` after they were
        written; ``days`` 0 removes them (objects kept). easel's rules are replaced, the
        bucket's other rules kept. False when the server takes no lifecycle rules, or these
        credentials may not set them."""
        self.ensure_bucket()
        try:
            now = self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)["Rules"]
        except ClientError as e:
            if _code(e) in LIFECYCLE_UNSUPPORTED:
                return _no_rules(e)
            if _code(e) != "NoSuchLifecycleConfiguration":
                raise
            now = []
        rules = [r for r in now if not r.get("ID", "").startswith("easel-")]
        # On a versioned bucket an expiry only hides an object behind a delete marker (and a
        # refreshed input leaves its older copy): the versions it leaves go a day later.
        rules += [{"ID": f"easel-{p.strip('/')}", "Status": "Enabled", "Filter": {"Prefix": p},
                   "Expiration": {"Days": days}, "NoncurrentVersionExpiration": {"NoncurrentDays": 1}}
                  for p in prefixes if days]
        try:
            if not rules and now:
                self.client.delete_bucket_lifecycle(Bucket=self.bucket)
            elif rules:
                self.client.put_bucket_lifecycle_configuration(Bucket=self.bucket,
                                                               LifecycleConfiguration={"Rules": rules})
        except ClientError as e:
            if _code(e) in LIFECYCLE_UNSUPPORTED:
                return _no_rules(e)
            raise
        return True

    def delete_older(self, prefix: str, max_age_s: float) -> int:
        """Delete the objects under ``prefix`` written over ``max_age_s`` ago; returns how many.
        Raises DeleteRefused, once every page is done, when the server kept any."""
        cutoff, asked, refused = time.time() - max_age_s, 0, []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            # Deleted page by page, right after it is read: an input rewritten after its page
            # was listed (``put_input``) could be deleted, so that window stays short.
            old = [o["Key"] for o in page.get("Contents", []) if o["LastModified"].timestamp() < cutoff]
            refused += self._delete(old)
            asked += len(old)
        if refused:
            raise DeleteRefused(refused, asked, self.bucket)
        return asked

    def _delete(self, keys: list[str]) -> list[dict]:
        """Delete ``keys``; returns the server's refusals (a multi-delete answers 200 and names
        the objects it kept: nothing else would say so). One already gone is no refusal."""
        refused: list[dict] = []
        for i in range(0, len(keys), 1000):
            reply = self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            refused += [e for e in reply.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        return refused

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a key prefix in this bucket); returns how many.
        Raises DeleteRefused when the server kept any."""
        keys = self.list(prefix)
        if refused := self._delete(keys):
            raise DeleteRefused(refused, len(keys), self.bucket)
        return len(keys)

    def download_prefix(self, uri: str, dest: Path) -> int:
        """Every object under an ``s3://bucket/prefix/`` into ``dest`` (keys relative to the
        prefix); returns how many. Raises NotFound when the prefix holds nothing. Folder
        markers (keys ending in ``/``, as consoles make) are skipped; a key that would land
        outside ``dest`` (``..`` in it) is refused."""
        ref = S3Ref.parse(uri.rstrip("/") + "/")
        root = dest.resolve()
        n = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=ref.bucket, Prefix=ref.key):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                target = (root / obj["Key"][len(ref.key):]).resolve()
                if not target.is_relative_to(root):
                    raise ValueError(f"{uri}: object key {obj['Key']!r} would be written outside {dest}")
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(ref.bucket, obj["Key"], str(target))
                n += 1
        if not n:
            raise NotFound(f"{uri} holds no objects")
        return n
