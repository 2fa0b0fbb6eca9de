"""Turns requests into embeddings: caches, compute-once, batching, one model thread.

``EncodeEngine.encode`` is what the gRPC servicer and the HTTP endpoint call.
For each distinct prompt of a request it tries, in order:

1. the in-memory LRU, then the disk cache, then the cache shared by every
   replica (``cache_hit=True``);
2. an identical prompt already queued or running (same model fingerprint and
   prompt): the request waits on that computation instead of starting its own;
   with a shared cache, one computing on another replica (its lease) too;
3. a new :class:`~encoder_server.batcher.WorkItem` in the user's queue.

A single model loop takes batches from the :class:`~encoder_server.batcher.Batcher`
and runs them on a dedicated thread, so gRPC I/O never waits on a forward pass
and the model never runs two batches at once. Results go to the memory cache at
once and to the disk cache in the background.

With a pad table (``pad_table=``), every cache keeps only a prompt's real rows
(:meth:`~encoder_server.cache.CachedEmbedding.compact`); an answer carries them
with the pad count and rebuilds the full embedding only when someone reads
:attr:`EncodedPrompt.embedding`, so an elided answer never builds it at all.

A prompt's cost in a batch (``--max-batch-tokens``) is its padded length with
``compute="exact"`` (every prompt runs 512 tokens) and its real tokens with
``compute="packed"`` (counted with :meth:`EmbeddingBackend.count_tokens` before
it is queued).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.config import BatchingConfig
from common.errors import (
    Cancelled,
    DeadlineExceeded,
    EncoderOverloaded,
    EncoderUnavailable,
    Flux2RemoteError,
    NotCached,
    ServerError,
)
from common.pad_table import pad_table_id
from encoder_server.batcher import DONE, QUEUED, Batcher, WorkItem
from encoder_server.cache import CachedEmbedding, DiskCache, MemoryCache, cache_key, rebuild_rows
from encoder_server.cluster import SharedCache
from encoder_server.identity import ANONYMOUS
from encoder_server.metrics import EncoderMetrics
from encoder_server.text_encoder import EmbeddingBackend

log = logging.getLogger(__name__)

# Disk writes queued behind a slow disk hold whole embeddings in memory; past
# this many, new results are not written (they stay in the memory cache).
_MAX_PENDING_WRITES = 64


def _bytes_of(cache: MemoryCache | DiskCache) -> Callable[[], int]:
    """Reads the cache's current size in bytes (a gauge's callback; one per cache, so no loop variable is shared)."""
    return lambda: cache.nbytes


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's embedding and how it was made.

    Attributes:
        rows: ``[max_sequence_length - pad_count, embedding_dim]`` CPU tensor in the compute
            dtype: the embedding without its first ``pad_count`` rows. Shared with the cache:
            read it, never modify it in place.
        token_count: non-pad tokens after truncation.
        truncated: the templated prompt was cut to ``max_sequence_length``.
        queue_ns, tokenization_ns, inference_ns: where the time went, in nanoseconds
            (tokenization and inference are those of the whole batch; all 0 for cache hits).
        batch_size: prompts that shared the forward pass (0 for cache hits).
        cache_hit: served from the cache without running the model.
        pad_count: leading rows left out of ``rows``: the first ``pad_count`` rows of ``pad_table``.
        pad_table: ``[P, embedding_dim]``, ``P >= pad_count``; None when ``pad_count`` is 0.
        pad_table_id: that table's id (:func:`common.pad_table.pad_table_id`), ``""`` without one.
    """

    rows: torch.Tensor
    token_count: int
    truncated: bool
    queue_ns: int
    tokenization_ns: int
    inference_ns: int
    batch_size: int
    cache_hit: bool = False
    pad_count: int = 0
    pad_table: torch.Tensor | None = None
    pad_table_id: str = ""

    @functools.cached_property
    def embedding(self) -> torch.Tensor:
        """``[max_sequence_length, embedding_dim]``: the pad table's rows put back in front of
        ``rows``, bit for bit what the model computed (built on first read; ``rows`` itself
        when nothing was left out, shared with the cache: never modify it in place)."""
        if self.pad_table is None:  # nothing was left out
            return self.rows
        return rebuild_rows(self.rows, self.pad_count, self.pad_table)


@dataclass(frozen=True)
class _Computed:
    entry: CachedEmbedding
    queue_ns: int
    tokenization_ns: int
    inference_ns: int
    batch_size: int


class EncodeEngine:
    """Batches, deduplicates and caches embedding work for one backend.

    Args:
        backend: the model (``.encode(prompts) -> EncodedBatch``, ``.fingerprint``, ``.spec``).
        batching: batch and queue limits, fair or FIFO scheduling.
        memory_cache: in-memory LRU; ``None`` keeps nothing in memory.
        disk_cache: persistent cache; ``None`` keeps nothing on disk.
        metrics: where to count; a private :class:`EncoderMetrics` by default.
        cache_scope: ``"shared"``: every user shares cached embeddings and running
            computations; ``"user"``: each user has their own (the user is part of
            every cache key, so no hit, ``cache_only`` answer or joined computation
            can tell one user what another sent).
        shared_cache: embeddings and compute-once leases shared with other replicas
            (Redis); ``None`` for a lone server.
        pad_table: ``[P, embedding_dim]``, the rows every prompt has at its pad positions
            (:func:`encoder_server.models.served_pad_table`); with it the caches keep only
            real rows. ``None``: entries keep the whole embedding.
    """

    def __init__(
        self,
        backend: EmbeddingBackend,
        *,
        batching: BatchingConfig | None = None,
        memory_cache: MemoryCache | None = None,
        disk_cache: DiskCache | None = None,
        metrics: EncoderMetrics | None = None,
        cache_scope: str = "shared",
        shared_cache: SharedCache | None = None,
        pad_table: torch.Tensor | None = None,
    ):
        if cache_scope not in ("shared", "user"):
            raise ValueError(f"cache_scope must be 'shared' or 'user', not {cache_scope!r}")
        self.backend = backend
        self.cache_scope = cache_scope
        self.shared_cache = shared_cache
        self._cluster_lookups: dict[str, asyncio.Future] = {}
        self._leases: set[str] = set()
        self._lease_renewal: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.batching = batching or BatchingConfig()
        self.memory_cache = memory_cache
        self.disk_cache = disk_cache
        self.metrics = metrics or EncoderMetrics()
        self.pad_table = pad_table
        self.pad_table_id = pad_table_id(backend.fingerprint, pad_table)
        # Exact: every prompt is padded to max_sequence_length, so that is what it costs in a batch.
        # Packed: only its real tokens run (counted before it is queued).
        self._prompt_tokens = backend.spec.max_sequence_length
        self._packed = backend.compute == "packed"
        self._batcher = Batcher(self.batching, on_drop=self._on_drop)
        self._inflight: dict[str, WorkItem] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-model")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-cache-writer")
        self._write_slots = threading.BoundedSemaphore(_MAX_PENDING_WRITES)
        self._loop_task: asyncio.Task | None = None
        self._closed = False
        self._bind_gauges()

    @classmethod
    def from_config(
        cls,
        config,
        backend: EmbeddingBackend,
        *,
        caches: tuple[MemoryCache | None, DiskCache | None] | None = None,
        metrics: EncoderMetrics | None = None,
        cache_scope: str = "shared",
        shared_cache: SharedCache | None = None,
        pad_table: torch.Tensor | None = None,
    ) -> EncodeEngine:
        """The engine a :class:`~common.config.ServerConfig` describes (batching, memory and disk caches).

        ``caches``: ``(memory, disk)`` shared with other engines (a server's models share one
        bound); None builds them from ``config``. ``cache_scope`` is the resolved scope
        (``config.cache.scope`` may say ``auto``).
        """
        memory, disk = caches if caches is not None else cls.caches_from_config(config)
        return cls(
            backend,
            batching=config.batching,
            memory_cache=memory,
            disk_cache=disk,
            metrics=metrics,
            cache_scope=cache_scope,
            shared_cache=shared_cache,
            pad_table=pad_table,
        )

    @staticmethod
    def caches_from_config(config) -> tuple[MemoryCache | None, DiskCache | None]:
        """The memory and disk caches a ServerConfig asks for (engines of several models share them)."""
        cache = config.cache
        memory = MemoryCache(cache.memory_mb * 2**20) if cache.memory_mb > 0 else None
        disk = DiskCache(cache.dir, int(cache.max_gb * 2**30)) if cache.dir else None
        return memory, disk

    # -- public API ------------------------------------------------------

    @property
    def queued(self) -> int:
        """Prompts waiting for a forward pass."""
        return self._batcher.queued

    async def encode(
        self,
        prompts: list[str],
        *,
        user: str = ANONYMOUS,
        cache_only: bool = False,
        deadline: float | None = None,
        wait_for_capacity: bool = False,
    ) -> list[EncodedPrompt]:
        """Embeddings for ``prompts``, in order.

        Args:
            prompts: validated prompt texts.
            user: who asks (for fair scheduling, quotas and metrics).
            cache_only: answer from the cache only; a miss raises ``NotCached``.
            deadline: ``time.monotonic()`` value after which the result is useless;
                past it the call raises ``DeadlineExceeded`` and its queued work is dropped.
            wait_for_capacity: when the queue is full, wait for room (streams:
                backpressure) instead of raising ``EncoderOverloaded`` at once.

        Returns:
            One :class:`EncodedPrompt` per prompt; embeddings are ``[512, embedding_dim]``.
        """
        if self._closed:
            raise EncoderUnavailable("the encoder is shutting down")
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded("the deadline passed before encoding started")
        fingerprint = self.backend.fingerprint
        scope = user if self.cache_scope == "user" else ""
        keys = [cache_key(fingerprint, p, scope) for p in prompts]
        prompt_of = dict(zip(keys, prompts, strict=True))  # duplicates inside one request collapse here

        # 1. Caches.
        found: dict[str, tuple[CachedEmbedding, str]] = {}
        for key in prompt_of:
            entry = self._usable(self.memory_cache.get(key), stored=True) if self.memory_cache is not None else None
            if entry is not None:
                found[key] = (entry, "memory")
        if self.disk_cache is not None:
            # Joining a computation already under way beats reading the disk.
            to_read = [k for k in prompt_of if k not in found and k not in self._inflight]
            if to_read:
                for key, entry in zip(to_read, await asyncio.to_thread(self._read_disk, to_read), strict=True):
                    entry = self._usable(entry)
                    if entry is not None:
                        found[key] = (entry, "disk")
                        if self.memory_cache is not None:
                            self.memory_cache.put(key, entry)
        if self.shared_cache is not None:
            # Other replicas' results, and (unless cache_only) compute-once across replicas.
            to_ask = [k for k in prompt_of if k not in found and k not in self._inflight]
            if to_ask:
                lookups = (self.shared_cache.get(k) if cache_only else self._from_cluster(k, deadline) for k in to_ask)
                for key, entry in zip(to_ask, await asyncio.gather(*lookups), strict=True):
                    entry = self._usable(entry)
                    if entry is not None:
                        found[key] = (entry, "shared")
                        if self.memory_cache is not None:
                            self.memory_cache.put(key, entry)
        for _, tier in found.values():
            self.metrics.cache_hits.labels(tier=tier).inc()
        missing = [k for k in prompt_of if k not in found]
        self.metrics.cache_misses.inc(len(missing))
        if cache_only and missing:
            indices = [i for i, k in enumerate(keys) if k not in found]
            raise NotCached(
                f"cache_only: {len(indices)} of {len(prompts)} prompt(s) are not cached "
                f"(indices {indices[:10]}{'...' if len(indices) > 10 else ''})"
            )

        # 2-3. Share running work or queue new work; admitted all at once or not at all.
        waiting: dict[str, tuple[WorkItem, str]] = {}
        if self._packed and not wait_for_capacity:
            # Refused before its tokens are counted: counting takes the model's tokenizer lock,
            # and a request that cannot be queued must not delay the ones that can.
            self._batcher.check_space(len([k for k in missing if k not in self._inflight]))
        costs = await self._costs(missing, prompt_of)
        # After any await (the disk read, counting tokens, waiting for room), work that
        # finished meanwhile is in the memory cache and must not be computed again.
        awaited = self.disk_cache is not None or self.shared_cache is not None or self._packed
        try:
            while missing:
                if self._closed:
                    raise EncoderUnavailable("the encoder is shutting down")
                if awaited and self.memory_cache is not None:
                    for key in missing:
                        if (entry := self._usable(self.memory_cache.get(key), stored=True)) is not None:
                            found[key] = (entry, "memory")
                    missing = [k for k in missing if k not in found]
                    if not missing:
                        break
                new = [k for k in missing if k not in self._inflight]
                if self._batcher.has_space(len(new)) or not new:
                    self._join_or_queue(missing, prompt_of, costs, user, deadline, waiting)
                    break
                if not wait_for_capacity:
                    self._batcher.check_space(len(new))  # raises QueueFull with a retry hint
                await self._batcher.wait_for_space(len(new), deadline)
                awaited = True
            computed = await self._wait(waiting, deadline)
        finally:
            self._release(waiting)

        for _, source in waiting.values():
            self.metrics.prompts_served.labels(user=user, source=source).inc()
        for _, tier in found.values():
            self.metrics.prompts_served.labels(user=user, source=f"cache_{tier}").inc()
        out = []
        for key in keys:
            if key in found:
                out.append(self._answer(found[key][0], 0, 0, 0, 0, True))
            else:
                c = computed[key]
                out.append(self._answer(c.entry, c.queue_ns, c.tokenization_ns, c.inference_ns, c.batch_size, False))
        return out

    def _answer(
        self,
        entry: CachedEmbedding,
        queue_ns: int,
        tokenization_ns: int,
        inference_ns: int,
        batch_size: int,
        cache_hit: bool,
    ) -> EncodedPrompt:
        """The answer for one entry: its stored rows as they are, the pad count, the table to rebuild with."""
        table = self.pad_table if entry.pad_count else None
        table_id = self.pad_table_id if entry.pad_count else ""
        return EncodedPrompt(
            entry.embedding,
            entry.token_count,
            entry.truncated,
            queue_ns,
            tokenization_ns,
            inference_ns,
            batch_size,
            cache_hit,
            entry.pad_count,
            table,
            table_id,
        )

    def _usable(self, entry: CachedEmbedding | None, stored: bool = False) -> CachedEmbedding | None:
        """A cached entry this engine can answer with (compact where it can be), or None: compute it.

        An entry that left rows out of another pad table cannot be rebuilt here (two servers with
        one fingerprint whose pad rows differ, or one without a table): a miss, never a guess.
        A full entry read from disk or the shared cache (written by a server without a table, or
        before compact entries) is made compact, so the memory cache holds it at its compact
        size; ``stored``: it came from the memory cache, which holds entries as this engine
        made them.
        """
        if entry is None:
            return None
        if entry.pad_count:
            return entry if entry.pad_table == self.pad_table_id else None
        if self.pad_table is None or stored:
            return entry
        return CachedEmbedding.compact(
            entry.embedding, entry.token_count, entry.truncated, self.pad_table, self.pad_table_id
        )

    def close(self) -> None:
        """Stop the model loop, fail queued work, finish pending disk writes."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self._lease_renewal is not None:
            self._lease_renewal.cancel()
        self._batcher.fail_all(EncoderUnavailable("the encoder is shutting down"))
        for item in list(self._inflight.values()):
            if not item.future.done():
                item.future.set_exception(EncoderUnavailable("the encoder is shutting down"))
                item.future.exception()
        self._inflight.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)

    # -- request side ----------------------------------------------------

    async def _costs(self, keys: list[str], prompt_of: dict[str, str]) -> dict[str, int]:
        """What each prompt costs in a batch: its padded length (exact), its real tokens (packed)."""
        if not self._packed or not keys:
            return dict.fromkeys(keys, self._prompt_tokens)
        # Tokenized off the event loop; the backend counts with its own tokenizer (thread-safe).
        try:
            counts = await asyncio.to_thread(self.backend.count_tokens, [prompt_of[k] for k in keys])
        except Exception as exc:  # the forward pass tokenizes again and reports the error per prompt
            log.warning("counting tokens failed (%s); these prompts cost their padded length", exc)
            return dict.fromkeys(keys, self._prompt_tokens)
        return {k: max(1, int(n)) for k, n in zip(keys, counts, strict=True)}

    def _join_or_queue(self, missing, prompt_of, costs, user, deadline, waiting) -> None:
        """Attach to in-flight items or create queued ones. Synchronous: nothing else runs meanwhile."""
        loop = asyncio.get_running_loop()
        new_items = []
        for key in missing:
            item = self._inflight.get(key)
            if item is not None:
                item.waiters += 1
                # The shared work stays wanted as long as its most patient waiter.
                item.deadline = None if item.deadline is None or deadline is None else max(item.deadline, deadline)
                waiting[key] = (item, "shared")
            else:
                item = WorkItem(key, prompt_of[key], user, costs[key], loop.create_future(), deadline)
                self._inflight[key] = item
                new_items.append(item)
                waiting[key] = (item, "computed")
        self._batcher.put(new_items)
        self._ensure_loop()

    async def _wait(self, waiting: dict[str, tuple[WorkItem, str]], deadline: float | None) -> dict[str, _Computed]:
        if not waiting:
            return {}
        futures = {item.future for item, _ in waiting.values()}
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        # asyncio.wait never cancels the shared futures, only stops waiting on them.
        done, pending = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for fut in done:
            if fut.cancelled():
                raise Cancelled("the shared computation was cancelled")
            failure = fut.exception()
            if failure is not None:
                raise failure
        if pending:
            raise DeadlineExceeded("the deadline passed before the embeddings were ready")
        return {key: item.future.result() for key, (item, _) in waiting.items()}

    def _release(self, waiting: dict[str, tuple[WorkItem, str]]) -> None:
        """This request stops waiting; queued items nobody else waits for leave the queue."""
        now = time.monotonic()
        for item, _ in waiting.values():
            item.waiters -= 1
            if item.waiters == 0 and item.state == QUEUED:
                self._batcher.discard(item, "deadline" if item.expired(now) else "cancelled")

    def _on_drop(self, item: WorkItem, reason: str) -> None:
        if self._inflight.get(item.key) is item:
            del self._inflight[item.key]
        self._give_up_lease(item.key)
        self.metrics.prompts_dropped.labels(reason=reason).inc()

    # -- across replicas (shared cache) --------------------------------------

    async def _from_cluster(self, key: str, deadline: float | None) -> CachedEmbedding | None:
        """Another replica's entry for ``key`` (waiting while one computes it), or None: compute it here.

        Concurrent requests for one key on this replica share one lookup.
        """
        lookup = self._cluster_lookups.get(key)
        if lookup is None:
            lookup = asyncio.ensure_future(self._lookup_cluster(key, deadline))
            self._cluster_lookups[key] = lookup
            lookup.add_done_callback(functools.partial(self._forget_lookup, key))
        return await asyncio.shield(lookup)

    def _forget_lookup(self, key: str, _done: asyncio.Future) -> None:
        self._cluster_lookups.pop(key, None)

    def _shared(self) -> SharedCache:
        """The shared cache; only called on the paths that run when there is one."""
        assert self.shared_cache is not None
        return self.shared_cache

    def _disk(self) -> DiskCache:
        """The disk cache; only called on the paths that run when there is one."""
        assert self.disk_cache is not None
        return self.disk_cache

    async def _lookup_cluster(self, key: str, deadline: float | None) -> CachedEmbedding | None:
        shared = self._shared()
        entry = await shared.get(key)
        while entry is None:
            if await shared.try_lease(key):
                self._leases.add(key)  # ours to compute, publish and release (_finish, _on_drop)
                self._ensure_lease_renewal()
                return None
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the deadline passed while another replica computed this prompt")
            # Another replica computes it; None here means its lease ended without an entry (it died or failed).
            entry = await shared.wait_for(key, deadline)
        return entry

    def _publish(self, key: str, entry: CachedEmbedding | None) -> None:
        """Put what this replica computed under its lease into the shared cache, then release the lease."""
        if key not in self._leases:
            return
        self._leases.discard(key)

        async def publish() -> None:
            if entry is not None:
                await self._shared().put(key, entry)
            await self._shared().release(key)

        task = asyncio.get_running_loop().create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _give_up_lease(self, key: str) -> None:
        self._publish(key, None)

    def _ensure_lease_renewal(self) -> None:
        if self._lease_renewal is None or self._lease_renewal.done():
            self._lease_renewal = asyncio.get_running_loop().create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        """While this replica holds leases (queued or computing prompts), keep them alive."""
        period = self._shared().lease_ms / 3000
        while self._leases and not self._closed:
            await asyncio.sleep(period)
            await self._shared().renew(list(self._leases))

    def _read_disk(self, keys: list[str]) -> list[CachedEmbedding | None]:
        disk = self._disk()
        return [disk.get(k) for k in keys]

    # -- model side ------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._model_loop(), name="encoder-model-loop")

    async def _model_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._batcher.next_batch()
            t_start = time.perf_counter_ns()
            try:
                results = await loop.run_in_executor(self._executor, self._compute, [i.prompt for i in batch])
                self._batcher.record_batch_time((time.perf_counter_ns() - t_start) / 1e9)
                for item, result in zip(batch, results, strict=True):
                    self._finish(item, result, t_start)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must fail this batch, not hang every later request
                log.exception("model loop failed on a batch of %d", len(batch))
                for item in batch:
                    self._finish(item, ServerError("internal error while encoding"), t_start)

    def _compute(self, prompts: list[str]) -> Sequence[tuple | BaseException]:
        """Run on the model thread: one forward pass; if it fails, each prompt alone, so one
        bad prompt (or an out-of-memory batch) fails only itself."""
        try:
            return self._forward(prompts)
        except Exception as exc:
            if len(prompts) == 1:
                return [as_reportable(exc)]
            log.warning("batch of %d failed (%s); retrying prompts one by one", len(prompts), exc)
        out: list[tuple | BaseException] = []
        for p in prompts:
            try:
                out.extend(self._forward([p]))
            except Exception as exc:
                out.append(as_reportable(exc))
        return out

    def _forward(self, prompts: list[str]) -> list[tuple]:
        batch = self.backend.encode(prompts)
        self.metrics.prompts_computed.inc(len(prompts))
        self.metrics.batch_size.observe(len(prompts))
        run_tokens = sum(batch.token_counts) if self._packed else len(prompts) * self._prompt_tokens
        self.metrics.batch_tokens.observe(run_tokens)
        self.metrics.tokenize_seconds.observe(batch.tokenization_ns / 1e9)
        self.metrics.inference_seconds.observe(batch.inference_ns / 1e9)
        # Rows are views: in a cache, one would keep the whole batch alive (and a backend's
        # result may itself be a view of something bigger, a padded batch or stacked hidden
        # states). Each entry owns exactly its bytes: the row itself when it is the whole
        # storage (one prompt, exact size), else a copy made here, on the model thread. With a
        # pad table only the real rows are kept (the pad rows checked bit for bit against it).
        return [
            (
                CachedEmbedding.compact(
                    row, int(batch.token_counts[i]), bool(batch.truncated[i]), self.pad_table, self.pad_table_id
                ),
                batch.tokenization_ns,
                batch.inference_ns,
                len(prompts),
            )
            for i, row in enumerate(batch.embeddings.unbind(0))
        ]

    def _finish(self, item: WorkItem, result: tuple | BaseException, t_start: int) -> None:
        if self._inflight.get(item.key) is item:
            del self._inflight[item.key]
        item.state = DONE
        if isinstance(result, BaseException):
            self._give_up_lease(item.key)
            if not item.future.done():
                item.future.set_exception(result)
                item.future.exception()
            return
        entry, tokenization_ns, inference_ns, batch_size = result
        queue_ns = t_start - item.enqueued_ns
        self.metrics.queue_seconds.observe(queue_ns / 1e9)
        if self.memory_cache is not None:
            self.memory_cache.put(item.key, entry)
        self._write_disk(item.key, entry)
        self._publish(item.key, entry)
        if not item.future.done():
            item.future.set_result(_Computed(entry, queue_ns, tokenization_ns, inference_ns, batch_size))

    def _write_disk(self, key: str, entry: CachedEmbedding) -> None:
        if self.disk_cache is None:
            return
        if not self._write_slots.acquire(blocking=False):
            self.metrics.cache_write_errors.inc()
            return

        def write() -> None:
            try:
                self._disk().put(key, entry)
            except Exception as exc:  # a full or read-only disk must not fail requests
                log.warning("disk cache write failed: %s", exc)
                self.metrics.cache_write_errors.inc()
            finally:
                self._write_slots.release()

        self._writer.submit(write)

    # -- metrics ---------------------------------------------------------

    def _bind_gauges(self) -> None:
        m = self.metrics
        m.bind_gauge(m.queue_size, lambda: self._batcher.queued)
        for tier, cache in (("memory", self.memory_cache), ("disk", self.disk_cache)):
            if cache is None:
                continue
            m.bind_gauge(m.cache_bytes.labels(tier=tier), _bytes_of(cache))
            m.bind_gauge(m.cache_entries.labels(tier=tier), cache.__len__)
            cache.on_evict = m.cache_evictions.labels(tier=tier).inc
        for cache in (self.memory_cache, self.disk_cache):
            if cache is not None:
                cache.on_corrupt = m.cache_corrupt.inc


def as_reportable(exc: Exception, work: str = "forward pass") -> Flux2RemoteError:
    """What a caller is told when model work (``work``: "forward pass", "upsampling") fails.

    Our own errors as they are; running out of memory (CUDA or host) as EncoderOverloaded
    (RESOURCE_EXHAUSTED: smaller or fewer requests, or later, may fit); anything else (a bug)
    as a ServerError naming only its type, never its text: details go to the log.
    """
    if isinstance(exc, Flux2RemoteError):
        return exc
    log.error("%s failed", work, exc_info=exc)
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return EncoderOverloaded(
            f"the server ran out of memory during {work}; retry later, or with fewer prompts or images",
            retry_after_s=5.0,
        )
    return ServerError(f"internal error during {work} ({type(exc).__name__}); the server log has details")
