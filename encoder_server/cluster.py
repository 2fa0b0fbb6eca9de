"""State shared by every replica through Redis or Valkey (``--shared-cache redis://HOST:PORT/DB``).

Three things live there, so N replicas behave like one server:

* **embeddings**: ``flux2:emb:<cache key>`` holds the same checksummed
  safetensors entry the disk cache writes (encoder_server/cache.py): with a pad
  table only the real rows, the pad count and the table's id, so Redis' memory
  holds 4-10x more FLUX.2-dev prompts. Every read verifies the CRC-32C; a
  damaged entry is deleted, counted in ``flux2_encoder_cache_corrupt_total`` and
  treated as a miss, and one made with another pad table is a miss. No TTL:
  eviction is Redis' ``maxmemory-policy`` (``allkeys-lru``, see docs/replicas.md).
* **compute-once leases**: ``flux2:lease:<cache key>`` (``SET NX PX``) names the
  replica computing a prompt; the others wait for its entry. A lease expires on
  its own, so a replica that dies mid-computation holds nobody up for longer
  than ``lease_ms`` (5 s; a live holder renews its leases while it works).
* **per-user limits**: the rate (a token bucket) and the daily quota, updated
  atomically by Lua scripts on Redis' own clock, so a user has one limit for
  the whole cluster, not one per replica.

Redis is an accelerator, never a dependency of a request: every call has a
short timeout, and after a failure the link stays "down" for a few seconds
(no request waits on a dead Redis twice). While it is down, replicas serve
from their local caches, compute locally and count limits locally, and say
so once in the log and in ``flux2_encoder_shared_cache_errors_total``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from encoder_server.cache import CachedEmbedding, decode_entry, encode_entry
from encoder_server.metrics import EncoderMetrics

log = logging.getLogger(__name__)

_EMB = "flux2:emb:"
_LEASE = "flux2:lease:"
_RATE = "flux2:rate:"
_QUOTA = "flux2:quota:"

# Token bucket on Redis' clock: KEYS[1] the user's bucket; ARGV[1] requests per
# minute. Returns 0 when a token was taken, else the milliseconds until one is free.
_TAKE_TOKEN = """
local rpm = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or rpm
local at = tonumber(state[2]) or now
tokens = math.min(rpm, tokens + (now - at) * rpm / 60000)
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 60000 / rpm)
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return wait
"""

# Daily quota: KEYS[1] the user's counter for the day; ARGV[1] prompts asked,
# ARGV[2] the quota. Returns the count before this request when it was counted,
# or -1 - count when it would pass the quota (nothing counted).
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local asked = tonumber(ARGV[1])
if used + asked > tonumber(ARGV[2]) then
  return -1 - used
end
redis.call('INCRBY', KEYS[1], asked)
redis.call('EXPIRE', KEYS[1], 172800)
return used
"""

_REFUND = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local left = redis.call('DECRBY', KEYS[1], tonumber(ARGV[1]))
  if left < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
return 0
"""

# Extend the leases this replica still holds: KEYS the leases, ARGV[1] the
# replica id, ARGV[2] the new time to live in ms.
_RENEW = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('PEXPIRE', key, tonumber(ARGV[2])) end
end
return 0
"""

# Delete a lease only if this replica still holds it (it may have expired and
# been taken by another).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class ClusterUnavailable(Exception):
    """Redis did not answer in time (or is marked down); the caller falls back to local state."""


class RedisLink:
    """One Redis connection pool with short timeouts and a circuit breaker.

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` for TLS).
        timeout_s: per-command timeout; Redis on a LAN answers in well under a millisecond.
        down_for_s: after a failure, how long the link is not tried again.
        metrics: counts failures in ``flux2_encoder_shared_cache_errors_total``.
    """

    def __init__(
        self, url: str, *, timeout_s: float = 0.25, down_for_s: float = 5.0, metrics: EncoderMetrics | None = None
    ):
        self.url = url
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self._down_for_s = down_for_s
        self._down_until = 0.0
        self._metrics = metrics
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._scripts = {
            name: self.client.register_script(body)
            for name, body in (
                ("take", _TAKE_TOKEN),
                ("reserve", _RESERVE),
                ("refund", _REFUND),
                ("release", _RELEASE),
                ("renew", _RENEW),
            )
        }

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    async def call(self, make):
        """Run ``await make(client)``; raise :class:`ClusterUnavailable` when Redis is down or slow."""
        if not self.up:
            raise ClusterUnavailable("marked down")
        try:
            return await make(self.client)
        except (TimeoutError, RedisError, OSError) as exc:
            was_up = self.up
            self._down_until = time.monotonic() + self._down_for_s
            if self._metrics is not None:
                self._metrics.shared_cache_errors.inc()
            if was_up:
                log.warning(
                    "shared state at %s unavailable (%s); serving from local caches and limits for %.0f s",
                    _redact(self.url),
                    exc,
                    self._down_for_s,
                )
            raise ClusterUnavailable(str(exc)) from None

    async def script(self, name: str, keys: list[str], args: list) -> int:
        return await self.call(lambda _client: self._scripts[name](keys=keys, args=args))

    async def close(self) -> None:
        await self.client.aclose()


def _redact(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


class SharedCache:
    """Embeddings and compute-once leases in Redis (see the module docstring).

    Every method degrades to "not there" when Redis is unavailable, so the
    engine computes locally instead of failing.
    """

    def __init__(self, link: RedisLink, *, lease_ms: int = 5_000, poll_s: float = 0.02):
        self.link = link
        # Short, and renewed while the holder works on it (renew()): a replica
        # that dies holds the others up for at most this long.
        self.lease_ms = lease_ms
        self._poll_s = poll_s

    async def get(self, key: str) -> CachedEmbedding | None:
        try:
            data = await self.link.call(lambda c: c.get(_EMB + key))
        except ClusterUnavailable:
            return None
        if data is None:
            return None
        try:
            return decode_entry(data, key)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # damaged in Redis or on the way: never served
            log.warning("shared cache: dropping damaged entry %s: %s", key[:16], exc)
            if self.link._metrics is not None:
                self.link._metrics.cache_corrupt.inc()
            try:
                await self.link.call(lambda c: c.delete(_EMB + key))
            except ClusterUnavailable:
                pass
            return None

    async def put(self, key: str, entry: CachedEmbedding) -> None:
        data = await asyncio.to_thread(encode_entry, key, entry)
        try:
            await self.link.call(lambda c: c.set(_EMB + key, data))
        except ClusterUnavailable:
            pass

    async def try_lease(self, key: str) -> bool:
        """True when this replica should compute ``key`` (it took the lease, or Redis is unavailable)."""
        try:
            return bool(
                await self.link.call(lambda c: c.set(_LEASE + key, self.link.replica_id, nx=True, px=self.lease_ms))
            )
        except ClusterUnavailable:
            return True

    async def renew(self, keys: list[str]) -> None:
        """Extend this replica's leases on ``keys`` by ``lease_ms`` (those another replica took are left alone)."""
        if not keys:
            return
        try:
            await self.link.script("renew", [_LEASE + k for k in keys], [self.link.replica_id, self.lease_ms])
        except ClusterUnavailable:
            pass

    async def release(self, key: str) -> None:
        try:
            await self.link.script("release", [_LEASE + key], [self.link.replica_id])
        except ClusterUnavailable:
            pass  # it expires on its own

    async def wait_for(self, key: str, deadline: float | None) -> CachedEmbedding | None:
        """Wait while another replica holds ``key``'s lease; its entry, or None once the lease is gone without one."""
        while deadline is None or time.monotonic() < deadline:
            entry = await self.get(key)
            if entry is not None:
                return entry
            try:
                held = await self.link.call(lambda c: c.exists(_LEASE + key))
            except ClusterUnavailable:
                return None
            if not held:
                return await self.get(key)  # it may have been written just before the release
            await asyncio.sleep(self._poll_s)
        return None


class ClusterLimits:
    """Per-user rate and daily quota counted in Redis for every replica at once.

    Each method raises :class:`ClusterUnavailable` when Redis cannot answer; the
    caller then counts locally.
    """

    def __init__(self, link: RedisLink, *, requests_per_minute: int, prompts_per_day: int):
        self.link = link
        self.rpm = requests_per_minute
        self.prompts_per_day = prompts_per_day

    async def take_request(self, user: str) -> float:
        """Take one request from ``user``'s bucket; 0.0 when taken, else the seconds until one is free."""
        wait_ms = await self.link.script("take", [_RATE + user], [self.rpm])
        return int(wait_ms) / 1000.0

    async def reserve(self, user: str, day: str, prompts: int) -> tuple[bool, int]:
        """Count ``prompts`` for ``user`` on ``day`` if the quota allows; ``(counted, used before)``."""
        result = int(await self.link.script("reserve", [f"{_QUOTA}{day}:{user}"], [prompts, self.prompts_per_day]))
        return (True, result) if result >= 0 else (False, -1 - result)

    async def refund(self, user: str, day: str, prompts: int) -> None:
        await self.link.script("refund", [f"{_QUOTA}{day}:{user}"], [prompts])


def utc_day(wall_clock: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if wall_clock is None else wall_clock, UTC).date().isoformat()
