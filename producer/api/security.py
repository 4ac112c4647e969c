"""Bearer API keys, per-key token-bucket rate limits and a per-key cap on jobs in flight.

Keys are configured by their sha256 only. Limits live in Redis, so every API replica
shares one budget per key and a restart forgets nothing.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis
import yaml
from pydantic import ValidationError

from easel.shared.schema import JobState
from easel.shared.settings import ApiKey, Settings

_TERMINAL = {s.value for s in JobState if s.terminal}

# Token bucket on the server's clock (TIME), so replicas with skewed clocks agree.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local ok = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {ok, tostring(wait), tostring(tokens)}
"""


def hash_key(token: str) -> str:
    """What goes in the config for a token: ``easel api-key NAME --token TOKEN`` prints it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The caller, with its limits resolved against the defaults."""

    key: ApiKey
    rate_per_min: float
    burst: int
    max_in_flight: int

    @property
    def name(self) -> str:
        return self.key.name


# What a request without a known key is answered (401), with its WWW-Authenticate header:
# by the key check (deps.authenticate), and before a body is read (limits.BodyLimit).
MISSING_KEY = ("missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
INVALID_KEY = ("invalid API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


# The token whose hash infra/api-keys.example.yaml and the Kubernetes placeholder Secret
# show: anyone can read it, so a server that would accept it refuses to start.
PUBLISHED_EXAMPLE_SHA256 = "c2dcc1569d17d479e5a98c0fcfc9384ac93843b9cfbc4d3c0175c8a599b29f89"


def _file_key(entry: object, index: int, path: str) -> ApiKey:
    """One key of the keys file. Its errors never show what the entry holds: a token pasted
    where its hash belongs would land in the server's log."""
    try:
        return ApiKey.model_validate(entry)
    except ValidationError as e:
        problems = e.errors(include_input=False, include_url=False)
        why = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'the entry'}: {p['msg']}" for p in problems)
        if any(p["loc"] == ("sha256",) for p in problems):
            why += " (the hex SHA-256 of the token, as `easel api-key NAME` prints it, never the token)"
        raise ValueError(f"{path}, key {index + 1}: {why}") from None


class KeyRing:
    """The configured keys, by hash. Raises ValueError for a configuration no server should
    run with: two keys with one hash, or the published example key."""

    def __init__(self, settings: Settings):
        keys = list(settings.api_keys)
        if settings.api_keys_file:
            data = yaml.safe_load(Path(settings.api_keys_file).read_text()) or []
            if isinstance(data, dict):
                data = data.get("keys", [])
            keys += [_file_key(entry, i, settings.api_keys_file) for i, entry in enumerate(data)]
        self.settings = settings
        self.by_hash: dict[str, ApiKey] = {}
        for k in keys:
            if k.sha256 == PUBLISHED_EXAMPLE_SHA256:
                raise ValueError(f"API key {k.name!r} is the published example (its token is in "
                                 "infra/api-keys.example.yaml): make your own with `easel api-key NAME`")
            if k.sha256 in self.by_hash:
                raise ValueError(f"API keys {self.by_hash[k.sha256].name!r} and {k.name!r} have the same hash")
            self.by_hash[k.sha256] = k

    def __len__(self) -> int:
        return len(self.by_hash)

    def lookup(self, token: str) -> Principal | None:
        # Looked up by the token's hash: timing reveals nothing about other keys' tokens.
        k = self.by_hash.get(hash_key(token))
        if k is None:
            return None
        s = self.settings
        return Principal(key=k, rate_per_min=k.rate_per_min or s.api_rate_per_min, burst=k.burst or s.api_burst,
                         max_in_flight=k.max_in_flight or s.api_max_in_flight)


@dataclass
class RateDecision:
    allowed: bool
    retry_after_s: float
    remaining: float


class RateLimiter:
    def __init__(self, r: redis.Redis, prefix: str = "easel"):
        self.r, self.prefix = r, prefix
        self._script = r.register_script(_BUCKET)

    def hit(self, p: Principal) -> RateDecision:
        ok, wait, tokens = self._script(keys=[f"{self.prefix}:ratelimit:{p.name}"],
                                        args=[p.rate_per_min / 60.0, p.burst])
        return RateDecision(bool(int(ok)), float(wait), float(tokens))


class InFlight:
    """Per-key set of job ids not yet terminal; a submission reserves a slot before it queues.

    Reserve-then-check keeps concurrent submissions from overshooting the cap. Terminal
    jobs are pruned lazily, only when the set looks full, so the common path is O(1); and
    a prune reads a sample of ``PRUNE_SAMPLE`` members (all of a small set, a random
    sample of a large one), again while samples are mostly ended, so a key kept at a cap of
    100,000 costs 64 reads a refused submission, not 100,000. A large set's few ended jobs may be missed by one sample; the next finds
    them, and until then the key is short of that many slots.
    """

    RESERVATION_TTL_S = 120
    PRUNE_SAMPLE = 64
    PRUNE_ROUNDS = 8

    def __init__(self, r: redis.Redis, prefix: str = "easel"):
        self.r, self.prefix = r, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}:apikey:{name}:inflight"

    def reserve(self, p: Principal) -> tuple[str | None, int]:
        """Returns (reservation, in_flight); reservation is None when the cap is reached."""
        token = f"reserve:{time.time():.3f}:{uuid.uuid4().hex}"
        k = self.key(p.name)
        pipe = self.r.pipeline()
        pipe.sadd(k, token)
        pipe.scard(k)
        n = pipe.execute()[1]
        if n > p.max_in_flight:
            n = self.prune(p.name)
            if n > p.max_in_flight:
                self.r.srem(k, token)
                return None, n - 1
        return token, n

    def commit(self, name: str, token: str, job_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.srem(self.key(name), token)
        pipe.sadd(self.key(name), job_id)
        pipe.execute()

    def adopt(self, name: str, job_id: str) -> None:
        """Count a job the key submitted whose reservation was let go before its commit (its
        request failed after queueing it); a job counted already stays counted once."""
        self.r.sadd(self.key(name), job_id)

    def release(self, name: str, token: str) -> None:
        self.r.srem(self.key(name), token)

    def prune(self, name: str) -> int:
        """Drop ended jobs and stale reservations found in samples of the set; sampling again
        (up to ``PRUNE_ROUNDS``) while a sample is mostly ended (a set far over a lowered cap).
        Returns the set's size."""
        for _ in range(self.PRUNE_ROUNDS):
            if self._prune_sample(name) < self.PRUNE_SAMPLE // 2:
                break
        return self.r.scard(self.key(name))

    def _prune_sample(self, name: str) -> int:
        k = self.key(name)
        members = list(self.r.srandmember(k, self.PRUNE_SAMPLE))  # distinct: all of a set no larger
        jobs = [m for m in members if not m.startswith("reserve:")]
        stale = [m for m in members if m.startswith("reserve:")
                 and time.time() - float(m.split(":")[1]) > self.RESERVATION_TTL_S]
        pipe = self.r.pipeline(transaction=False)
        for j in jobs:
            pipe.hget(f"{self.prefix}:job:{j}", "state")
        states = pipe.execute() if jobs else []
        done = [j for j, st in zip(jobs, states) if st is None or st in _TERMINAL] + stale
        if done:
            self.r.srem(k, *done)
        return len(done)

    def count(self, name: str) -> int:
        return self.prune(name)
