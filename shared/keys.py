"""Names of the fair-share keys in Redis that both the scheduler (which owns them) and the job
store (which touches them when a job leaves its queue, a worker beats, or metrics count)
use, so neither imports the other for a name."""
from __future__ import annotations


def pending_key(prefix: str, queue: str, tenant: str) -> str:
    return f"{prefix}:pending:{queue}:{tenant}"


def backlog_key(prefix: str, queue: str) -> str:
    """A list as long as the queue's pending jobs: its LLEN is what autoscalers that read list
    lengths (KEDA's redis trigger) add to the broker lists' lengths."""
    return f"{prefix}:backlog:{queue}"


def tenants_waiting_key(prefix: str, queue: str) -> str:
    """A string that exists while some tenant has jobs pending for ``queue`` (the active
    tenants' set is not empty): set where a tenant joins that set, deleted by the dispatch
    that empties it, so admission reads it in its one MGET."""
    return f"{prefix}:tenants-waiting:{queue}"


def backlog_channel(prefix: str) -> str:
    """Pub/sub: a queue's name, published when a job starts waiting in its pending sets while
    none did. Its workers then dispatch after their claims until a dispatch finds none."""
    return f"{prefix}:backlog"


def cap_key(prefix: str, tenant: str) -> str:
    """A tenant's cap on dispatched jobs not ended (absent: none): a string, so admission
    reads it in the same MGET as the queue's capacity and paused flag."""
    return f"{prefix}:cap:{tenant}"


def flight_key(prefix: str, tenant: str) -> str:
    """A capped tenant's dispatched jobs not yet ended (zset: id -> when dispatched or last
    checked); a job's record names it in its ``capped`` field until its final state."""
    return f"{prefix}:flight:{tenant}"


def family_instances_key(prefix: str, family: str) -> str:
    return f"{prefix}:family:{family}:instances"


def family_capacity_key(prefix: str, family: str) -> str:
    """Messages the family's live workers take from its queue at once (the sum of their batch
    sizes): set by every heartbeat, gone when heartbeats stop. Admission reads it in one GET."""
    return f"{prefix}:family:{family}:capacity"


def family_batch_sizes_key(prefix: str, family: str) -> str:
    """The batch sizes the family's workers take (a set; a size whose workers all stopped
    leaves it at the next beat): one instances zset per size (``family_batch_class_prefix``),
    so a heartbeat sums the capacity in a few reads."""
    return f"{prefix}:family:{family}:batch-sizes"


def family_batch_class_prefix(prefix: str, family: str) -> str:
    """``<prefix><size>``: the family's instances that take ``size`` messages at once (zset of
    heartbeat expiry)."""
    return f"{prefix}:family:{family}:batch:"


def job_seconds_prefix(prefix: str) -> str:
    """``<prefix><instance>``: a worker's mean seconds per job, kept as long as its heartbeat."""
    return f"{prefix}:job-seconds:"
