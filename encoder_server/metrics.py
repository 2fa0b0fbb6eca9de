"""Prometheus metrics of one encoder server, and the ``--metrics-port`` endpoint.

Every server gets its own ``CollectorRegistry`` (several servers run in one
test process). Durations are in seconds, sizes in bytes, as Prometheus expects.

The headline series:

* ``flux2_encoder_prompts_computed_total``: prompts that actually ran through
  the model (cache hits and shared computations are not counted).
* ``flux2_encoder_requests_total{method,status,user}``: requests by outcome, refusals
  included (each EncodeStream message counts as one request).
* ``flux2_encoder_write_timeouts_total{method}``: answers cancelled because the
  client did not read them in time.
* ``flux2_encoder_prompts_served_total{user,source}``: where each answered
  prompt came from (``computed``, ``shared``, ``cache_memory``, ``cache_disk``).
* ``flux2_encoder_queue_size``, ``flux2_encoder_batch_size``,
  ``flux2_encoder_batch_tokens``, ``flux2_encoder_{queue,tokenize,inference}_duration_seconds``.
* ``flux2_encoder_cache_{hits,misses}_total``, ``flux2_encoder_cache_bytes{tier}``.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

# From a cache hit (~1 ms) to a queue backed up for a minute.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_BATCH_TOKEN_BUCKETS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class EncoderMetrics:
    """All metrics of one server, registered in ``self.registry``.

    Args:
        registry: where to register; a fresh ``CollectorRegistry`` by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flux2_encoder_requests",
            "Encode requests by RPC method, gRPC status and user.",
            ["method", "status", "user"],
            registry=r,
        )
        self.write_timeouts = Counter(
            "flux2_encoder_write_timeouts",
            "Answers cancelled because the client did not read them within --write-timeout.",
            ["method"],
            registry=r,
        )
        self.prompts_served = Counter(
            "flux2_encoder_prompts_served",
            "Prompts answered, by user and source (computed, shared, cache_memory, cache_disk).",
            ["user", "source"],
            registry=r,
        )
        self.prompts_computed = Counter(
            "flux2_encoder_prompts_computed", "Prompts that actually ran through the model.", registry=r
        )
        self.prompts_dropped = Counter(
            "flux2_encoder_prompts_dropped",
            "Queued prompts dropped before reaching the model (reason: cancelled, deadline).",
            ["reason"],
            registry=r,
        )
        self.queue_size = Gauge("flux2_encoder_queue_size", "Prompts waiting for a forward pass.", registry=r)
        self.batch_size = Histogram(
            "flux2_encoder_batch_size", "Prompts per forward pass.", buckets=_BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "flux2_encoder_batch_tokens",
            "Tokens per forward pass: padded (prompts x max_sequence_length) with --compute exact, real with packed.",
            buckets=_BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "flux2_encoder_queue_duration_seconds",
            "Time a computed prompt waited in the queue.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "flux2_encoder_tokenize_duration_seconds",
            "Tokenization time per forward pass.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "flux2_encoder_inference_duration_seconds",
            "Forward pass time (copy to CPU included).",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "flux2_encoder_cache_hits",
            "Prompts found in a cache, by tier (memory, disk, shared).",
            ["tier"],
            registry=r,
        )
        self.cache_misses = Counter("flux2_encoder_cache_misses", "Prompts found in no cache.", registry=r)
        self.cache_bytes = Gauge("flux2_encoder_cache_bytes", "Bytes held by each cache tier.", ["tier"], registry=r)
        self.cache_entries = Gauge(
            "flux2_encoder_cache_entries", "Entries held by each cache tier.", ["tier"], registry=r
        )
        self.cache_evictions = Counter(
            "flux2_encoder_cache_evictions", "Entries evicted to stay within a size bound.", ["tier"], registry=r
        )
        self.cache_corrupt = Counter(
            "flux2_encoder_cache_corrupt",
            "Cache entries (memory, disk, shared) that failed their checksum and were dropped.",
            registry=r,
        )
        self.response_bytes = Counter(
            "flux2_encoder_response_bytes",
            "Embedding bytes put on the wire (pad rows a client holds are not sent), by transport.",
            ["transport"],
            registry=r,
        )
        self.shared_cache_errors = Counter(
            "flux2_encoder_shared_cache_errors",
            "Calls to the shared Redis that failed or timed out (the server then used local state).",
            registry=r,
        )
        self.shared_cache_up = Gauge(
            "flux2_encoder_shared_cache_up",
            "1 while the shared Redis answers, 0 while it is marked down.",
            registry=r,
        )
        self.cache_write_errors = Counter(
            "flux2_encoder_cache_write_errors", "Disk cache writes that failed or were skipped.", registry=r
        )
        self.generated_tokens = Counter(
            "flux2_encoder_generated_tokens",
            "Tokens generated by prompt upsampling (Upsample), by model.",
            ["model"],
            registry=r,
        )
        self.user_generated_tokens = Counter(
            "flux2_encoder_user_generated_tokens",
            "Tokens generated by prompt upsampling, by user (the daily quota counts prompts, not these).",
            ["user"],
            registry=r,
        )
        self.upsample_queue = Gauge(
            "flux2_encoder_upsample_queue_size", "Upsample calls waiting for the generator.", registry=r
        )
        self.upsample_seconds = Histogram(
            "flux2_encoder_upsample_duration_seconds",
            "Generation time of one Upsample batch (decoding included).",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )

    def count_request(self, method: str, status: str, user: str) -> None:
        """One finished request; ``status`` is a gRPC status name such as ``OK`` or ``RESOURCE_EXHAUSTED``."""
        self.requests.labels(method=method, status=status, user=user).inc()

    def bind_gauge(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Read ``gauge`` from ``read()`` at scrape time (``gauge`` may be a labelled child)."""
        gauge.set_function(read)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one series (0 when absent); for tests and benchmarks."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class MetricsEndpoint:
    """``GET /metrics`` (Prometheus text) on a socket bound before the model loads.

    Served by aiohttp on the server's event loop: a scrape only formats
    counters, so it needs no thread of its own. ``port`` is the one bound.
    """

    def __init__(self, metrics: EncoderMetrics, sock: socket.socket):
        self._metrics = metrics
        self._sock = sock
        self.host: str = sock.getsockname()[0]
        self.port: int = sock.getsockname()[1]
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()
        log.info("metrics on port %d, path /metrics", self.port)

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
