"""The queue in front of the model: admission control, fair order, dynamic batches.

Pure scheduling on the event loop; it never touches tensors. The engine puts
one :class:`WorkItem` per distinct prompt to compute, and a single consumer
(the engine's model loop) takes batches with :meth:`Batcher.next_batch`.

* Admission: at most ``max_queue_prompts`` prompts wait. :meth:`admit` refuses
  at once (:class:`QueueFull`, with a retry hint); :meth:`wait_for_space` lets
  a caller wait instead (streams: backpressure).
* Fairness: each user has their own FIFO; batches are filled round-robin
  across users, so one user's 100k-prompt backlog delays another user's
  prompt by at most one batch. ``fair=False`` serves strictly in arrival order.
* Batching: a batch closes when it reaches ``max_batch_prompts`` or
  ``max_batch_tokens``, or when its oldest prompt has waited ``max_queue_delay_ms``.
  A prompt costs what the engine says it runs (:attr:`WorkItem.tokens`): its
  padded length with ``--compute exact``, its real tokens with ``packed``.
* Dropping: items nobody waits for any more (cancelled callers) leave the
  queue at once; items whose deadline passed are dropped when reached. Neither
  ever reaches the model.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from common.config import BatchingConfig
from common.errors import DeadlineExceeded, EncoderOverloaded

QUEUED, RUNNING, DONE, DROPPED = "queued", "running", "done", "dropped"


class QueueFull(EncoderOverloaded):
    """The queue holds ``max_queue_prompts``; ``retry_after_s`` estimates when there will be room."""


@dataclass(eq=False)  # identity semantics: deque.remove must find this very item
class WorkItem:
    """One distinct prompt to compute, shared by every request that asked for it.

    Attributes:
        key: cache key (model fingerprint + prompt).
        prompt: the text.
        user: who queued it first; it waits in that user's queue.
        tokens: what it costs in a batch: padded tokens (``max_sequence_length``) with
            ``--compute exact``, real tokens with ``packed``.
        future: resolved by the engine with the result, or an exception.
        deadline: ``time.monotonic()`` after which nobody wants it; None: no deadline.
        waiters: requests waiting on it; at 0 it is dropped.
        enqueued_ns: ``time.perf_counter_ns()`` at admission.
    """

    key: str
    prompt: str
    user: str
    tokens: int
    future: asyncio.Future
    deadline: float | None = None
    waiters: int = 1
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    seq: int = 0
    state: str = QUEUED

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class Batcher:
    """Bounded, per-user queue that hands out batches to one consumer.

    Args:
        config: batch and queue limits, fair or FIFO order.
        on_drop: called with ``(item, reason)`` for every item dropped before
            reaching the model (``"cancelled"`` or ``"deadline"``).
    """

    def __init__(self, config: BatchingConfig, on_drop=None):
        self.config = config
        self._queues: OrderedDict[str, deque[WorkItem]] = OrderedDict()  # round-robin order
        self._queued = 0
        self._seq = itertools.count()
        self._changed = asyncio.Event()  # new work arrived
        self._space = asyncio.Event()  # work left the queue
        self._on_drop = on_drop
        # Moving average of one forward pass, for the retry hint.
        self._batch_s: float | None = None

    @property
    def queued(self) -> int:
        """Prompts waiting (not yet handed to the model)."""
        return self._queued

    def queued_by_user(self) -> dict[str, int]:
        return {user: len(q) for user, q in self._queues.items()}

    # -- admission -------------------------------------------------------

    def has_space(self, n: int) -> bool:
        # An empty queue always takes a request, even one larger than the bound.
        return self._queued == 0 or self._queued + n <= self.config.max_queue_prompts

    def check_space(self, n: int) -> None:
        """Raise :class:`QueueFull` unless ``n`` more prompts fit."""
        if not self.has_space(n):
            retry_ms = self.retry_after_ms()
            raise QueueFull(
                f"the encoder queue is full ({self._queued} prompts waiting, limit "
                f"{self.config.max_queue_prompts}); retry in about {retry_ms} ms",
                retry_after_s=retry_ms / 1000,
            )

    async def wait_for_space(self, n: int, deadline: float | None = None) -> None:
        """Wait until ``n`` more prompts fit; DeadlineExceeded if ``deadline`` passes first."""
        while not self.has_space(n):
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded("the deadline passed while waiting for room in the encoder queue")
            self._space.clear()
            try:
                await asyncio.wait_for(self._space.wait(), timeout)
            except TimeoutError:
                pass

    def put(self, items: list[WorkItem]) -> None:
        """Queue ``items`` (call :meth:`check_space` or :meth:`wait_for_space` first)."""
        for item in items:
            item.seq = next(self._seq)
            item.state = QUEUED
            self._queues.setdefault(item.user, deque()).append(item)
        self._queued += len(items)
        if items:
            self._changed.set()

    def discard(self, item: WorkItem, reason: str = "cancelled") -> None:
        """Take a queued ``item`` out because nobody waits for it any more (``reason``: cancelled, deadline)."""
        if item.state != QUEUED:
            return
        queue = self._queues.get(item.user)
        if queue is not None:
            queue.remove(item)
            if not queue:
                del self._queues[item.user]
        self._drop(item, reason)

    def retry_after_ms(self) -> int:
        """A guess at when the queue will have room: the batches ahead times one forward pass."""
        per_batch_s = self._batch_s if self._batch_s is not None else 0.1
        batches_ahead = math.ceil(max(1, self._queued) / self.max_prompts_per_batch)
        delay_ms = (batches_ahead * per_batch_s + self.config.max_queue_delay_ms / 1000) * 1000
        return int(min(60_000, max(10, delay_ms)))

    def record_batch_time(self, seconds: float) -> None:
        self._batch_s = seconds if self._batch_s is None else 0.8 * self._batch_s + 0.2 * seconds

    # -- batching --------------------------------------------------------

    @property
    def max_prompts_per_batch(self) -> int:
        return max(1, self.config.max_batch_prompts)

    async def next_batch(self) -> list[WorkItem]:
        """Wait for work, let a batch fill for up to ``max_queue_delay_ms``, return it (marked running)."""
        delay_s = self.config.max_queue_delay_ms / 1000
        while True:
            while self._queued == 0:
                self._changed.clear()
                await self._changed.wait()
            oldest_ns = min(q[0].enqueued_ns for q in self._queues.values())
            wait_s = delay_s - (time.perf_counter_ns() - oldest_ns) / 1e9
            if self._queued < self.max_prompts_per_batch and wait_s > 0:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wait_s)
                except TimeoutError:
                    pass
                continue  # re-check: the queue may have filled, emptied or aged
            batch = self._take()
            if batch:
                return batch

    def _take(self) -> list[WorkItem]:
        batch: list[WorkItem] = []
        tokens = 0
        now = time.monotonic()
        while self._queues and len(batch) < self.max_prompts_per_batch:
            user = self._pick_user()
            queue = self._queues[user]
            item = queue[0]
            if batch and tokens + item.tokens > self.config.max_batch_tokens:
                break
            queue.popleft()
            if self.config.fair:
                self._queues.move_to_end(user)  # next prompt comes from the next user
            if not queue:
                del self._queues[user]
            if item.expired(now):
                self._drop(item, "deadline")
                continue
            self._queued -= 1
            item.state = RUNNING
            batch.append(item)
            tokens += item.tokens
        self._notify_space()
        return batch

    def _pick_user(self) -> str:
        if self.config.fair:
            return next(iter(self._queues))
        return min(self._queues, key=lambda u: self._queues[u][0].seq)

    def _drop(self, item: WorkItem, reason: str) -> None:
        self._queued -= 1
        item.state = DROPPED
        if not item.future.done():
            if item.waiters > 0:
                item.future.set_exception(DeadlineExceeded("the deadline passed while the prompt was queued"))
                item.future.exception()  # callers may have gone already; do not log it as unretrieved
            else:
                item.future.cancel()
        if self._on_drop is not None:
            self._on_drop(item, reason)
        self._notify_space()

    def _notify_space(self) -> None:
        self._space.set()

    def fail_all(self, exc: BaseException) -> None:
        """Fail every queued item with ``exc`` (shutdown)."""
        for queue in self._queues.values():
            for item in queue:
                item.state = DROPPED
                if not item.future.done():
                    item.future.set_exception(exc)
                    item.future.exception()
        self._queues.clear()
        self._queued = 0
        self._notify_space()
