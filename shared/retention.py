"""Results that expire: job outputs, manifests, hand-offs and uploaded inputs are kept
``retention_days`` in the bucket, and job records (``job_ttl_s``, at most that) go first, so
a status never points at objects that are gone.

Where the S3 server takes lifecycle rules, one rule per prefix does the work on the server's
side; where it does not, a sweep deletes what is older. Either way one worker process of the
farm does it once an hour (a lease in Redis), so a farm of hundreds of workers sets the rule
or lists the bucket once, not once per process.
"""
from __future__ import annotations

import logging
import time

from easel.shared.jobstore import JobStore
from easel.shared.storage import RETAINED_PREFIXES, DeleteRefused, Storage, s3_not_now

log = logging.getLogger("easel.retention")

EVERY_S = 3600.0
RETRY_S = 300.0  # after S3 could not be reached: tried again this soon, not a period later


class ResultRetention:
    """Called often (from a worker's reaper pass); acts at most once per ``every_s`` in this
    process, and only in the one process of the farm that takes that period's lease."""

    def __init__(self, store: JobStore, storage: Storage, days: int, every_s: float = EVERY_S):
        self.store, self.storage, self.days, self.every_s = store, storage, days, every_s
        self._next_try = 0.0

    def __call__(self) -> str | None:
        if time.monotonic() < self._next_try:
            return None
        self._next_try = time.monotonic() + self.every_s
        if not self.store.lease("retention", self.every_s):
            return None
        try:
            return self._apply()
        except Exception as e:
            if not s3_not_now(e):
                raise
            # An S3 outage is not this process's fault: one line, and the next try (by this
            # process or another) comes once the retry delay is over.
            log.warning("retention: S3 did not answer (%s); trying again in %.0f s", e, RETRY_S)
            self._next_try = time.monotonic() + RETRY_S
            self.store.release_lease("retention")
            return None

    def _apply(self) -> str | None:
        if not self.days:  # kept: rules set under an earlier retention must not go on deleting
            return "lifecycle rules: none of easel's" if self.storage.expire_after(RETAINED_PREFIXES, 0) else None
        if self.storage.expire_after(RETAINED_PREFIXES, self.days):
            return f"lifecycle rules: {', '.join(RETAINED_PREFIXES)} expire after {self.days} days"
        deleted, refused = 0, 0
        for prefix in RETAINED_PREFIXES:  # each prefix swept whatever the others' refusals
            try:
                deleted += self.storage.delete_older(prefix, self.days * 86400)
            except DeleteRefused as e:
                deleted, refused = deleted + e.deleted, refused + len(e.refused)
                log.warning("retention: %s", e)
        log.info("retention: the bucket takes no lifecycle rules; deleted %d objects older than %d days%s",
                 deleted, self.days, f", {refused} refused" if refused else "")
        return f"swept: {deleted} objects older than {self.days} days deleted" + (
            f", {refused} refused" if refused else "")
