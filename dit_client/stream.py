"""Bulk encoding over one ``EncodeStream`` call: bounded in-flight work, retries, reconnects.

:meth:`dit_client.remote.RemoteTextEncoder.encode_stream` is the public entry
point; this module holds the machinery so the client class stays small.

How it works: prompts are cut into requests of ``batch_size`` prompts, each
tagged with a fresh ``request_id``. At most ``max_in_flight`` requests are
outstanding; the next one is sent only when a response completes, and the
prompt iterable is consumed lazily. The server sends each request's messages
contiguously, so the client assembles one request (``batch_size`` embeddings)
at a time while the others wait on the server, and gRPC flow control bounds
what is in transit: client memory does not grow with the number of prompts. A request's
embeddings are handed to the caller only once all of them arrived intact
(size, CRC-32C, fingerprint): a request that fails half-way is retried whole,
never half-served.

Transient failures are retried with exponential backoff and jitter:

* a request answered with ``RESOURCE_EXHAUSTED`` or ``UNAVAILABLE`` is sent again
  on the same stream;
* a stream that breaks (server restart, connection reset, ``max_connection_age``
  GOAWAY, or no response for ``timeout`` seconds) is reopened and every request
  that was in flight is sent again.

Anything else (bad input, authentication, a different model fingerprint after
a reconnect...) raises at once.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch

from common.errors import EncoderUnavailable, Flux2RemoteError, IntegrityError, InvalidRequest, error_from_code
from common.protocol import pb2
from common.wire import decode_response_frame, dtype_to_wire
from dit_client.connection import Connection
from dit_client.frames import EncoderInfo, PromptMetadata, ResponseAssembler, check_output_dtype
from dit_client.pad_table import HeldTable
from dit_client.retry import RETRYABLE, RetryPolicy

# Defaults sized for FLUX.2-dev (15.7 MB per embedding): the client assembles one
# request of 8 (126 MB) at a time; 8 requests in flight (the server's default
# per-stream limit) are two of the server's 32-prompt batches, so the next batch
# is already queued while the current one computes and travels.
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_IN_FLIGHT = 8


class EncoderClient(Protocol):
    """What the stream machinery uses of a client (:class:`dit_client.remote.RemoteTextEncoder` has it)."""

    connection: Connection

    def info(self, *, model: str | None = None, refresh: bool = False) -> EncoderInfo:
        """``GetInfo`` about ``model``, cached by the client."""
        ...

    def pad_table_for(self, info: EncoderInfo) -> HeldTable | None:
        """The pad table requests name; None: whole embeddings."""
        ...


@dataclass(frozen=True)
class StreamedEmbedding:
    """One prompt's result from :meth:`RemoteTextEncoder.encode_stream`.

    Attributes:
        index: position of the prompt in the input iterable (0-based).
        prompt: the prompt text.
        embedding: ``[max_sequence_length, embedding_dim]`` CPU tensor
            (``[512, 15360]`` bfloat16 for FLUX.2-dev), bit for bit what the server computed
            (pad rows the server left out already put back from the pad table);
            a view into its request's buffer (``clone()`` it to keep it on its own).
        metadata: token count, timings, cache hit, fingerprint, ``pad_rows_elided``.
        pad_table: id of the pad table whose first ``metadata.pad_rows_elided`` rows
            start ``embedding`` (``ModelInfo.pad_table``); ``""`` when no row was left out.
    """

    index: int
    prompt: str
    embedding: torch.Tensor
    metadata: PromptMetadata
    pad_table: str = ""

    def compact(self) -> tuple[torch.Tensor, int]:
        """``(rows [n, embedding_dim], pad_count)``: the rows that came over the wire and how many pad rows precede them.

        For stores that keep only real rows: ``embedding`` equals
        ``common.pad_table.rebuild(rows, pad_count, table)`` with the table :attr:`pad_table`
        names. ``rows`` is a view of ``embedding`` (no copy). ``pad_count`` is 0, and
        ``rows`` the whole embedding, when the server sent every row (elision off, a model
        without a pad table, or rows that differ from the table).
        """
        pad_count = self.metadata.pad_rows_elided
        return self.embedding[pad_count:], pad_count


@dataclass
class _Request:
    indices: list[int]
    prompts: list[str]
    attempts: int = 0


@dataclass
class _Watchdog:
    """Cancels the call when requests are in flight but nothing arrives for ``idle_s`` seconds.

    A half-open TCP connection or a wedged server would otherwise block the
    response iterator forever.
    """

    def __init__(self, call: grpc.Call, idle_s: float):
        self._call = call
        self._idle_s = idle_s
        self._last = time.monotonic()
        self._armed = False
        self._stop = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="encode-stream-watchdog", daemon=True)
        self._thread.start()

    def poke(self, armed: bool) -> None:
        self._last = time.monotonic()
        self._armed = armed

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self._idle_s / 4)):
            if self._armed and time.monotonic() - self._last > self._idle_s:
                self.fired = True
                self._call.cancel()
                return


_CLOSE = object()


class _StreamJob:
    """State of one ``encode_stream`` call across stream reopenings."""

    def __init__(
        self, client: EncoderClient, prompts, *, batch_size, max_in_flight, dtype, cache_only, retry, model=None
    ):
        self.client = client
        self.retry = retry or RetryPolicy()
        self.cache_only = cache_only
        self.model = model or ""  # the server's model that encodes ("" = its only one)
        self.info: EncoderInfo = client.info(model=self.model)
        self.info.check_named(self.model, client.connection.target)
        self.fingerprint = self.info.fingerprint
        limits = self.info.limits
        server_batch = int(limits.get("max_prompts_per_request") or DEFAULT_BATCH_SIZE)
        server_in_flight = int(limits.get("max_in_flight_per_stream") or DEFAULT_MAX_IN_FLIGHT)
        self.batch_size = batch_size or min(DEFAULT_BATCH_SIZE, server_batch)
        self.max_in_flight = max_in_flight or min(DEFAULT_MAX_IN_FLIGHT, server_in_flight)
        if not 1 <= self.batch_size <= server_batch:
            raise InvalidRequest(
                f"batch size {self.batch_size} is outside 1..{server_batch} (the server's max_prompts_per_request)"
            )
        if self.max_in_flight < 1:
            raise InvalidRequest(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        self.dtype = dtype or self.info.dtype
        check_output_dtype(self.dtype)
        self.held = client.pad_table_for(self.info)
        self.max_chars = int(limits.get("max_prompt_chars") or 0)
        self._fresh = self._batches(prompts)
        self._fresh_done = False
        self._retry_heap: list[tuple[float, int, _Request]] = []  # (ready_at, tiebreak, request)
        self._tiebreak = itertools.count()
        self._ids = itertools.count()
        self._stream_failures = 0  # consecutive stream breaks without a completed request

    # -- request supply ----------------------------------------------------

    def _batches(self, prompts: Iterable[str]) -> Iterator[_Request]:
        batch = _Request([], [])
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidRequest(f"prompt {index} is a {type(prompt).__name__}, not a string")
            # Checked here so a bad prompt names its position in the caller's
            # input instead of failing a request far down the stream.
            if self.max_chars and len(prompt) > self.max_chars:
                raise InvalidRequest(
                    f"prompt {index} has {len(prompt)} characters; the server accepts at most {self.max_chars}"
                )
            batch.indices.append(index)
            batch.prompts.append(prompt)
            if len(batch.prompts) == self.batch_size:
                yield batch
                batch = _Request([], [])
        if batch.prompts:
            yield batch

    def _next_request(self) -> _Request | None:
        if self._retry_heap and self._retry_heap[0][0] <= time.monotonic():
            return heapq.heappop(self._retry_heap)[2]
        if not self._fresh_done:
            request = next(self._fresh, None)
            if request is not None:
                return request
            self._fresh_done = True
        return None

    def _requeue(self, request: _Request, delay_s: float) -> None:
        heapq.heappush(self._retry_heap, (time.monotonic() + delay_s, next(self._tiebreak), request))

    def _retry_request(self, request: _Request, exc: Flux2RemoteError) -> None:
        request.attempts += 1
        if request.attempts >= self.retry.max_attempts:
            raise type(exc)(f"{exc} (gave up after {request.attempts} attempts)") from None
        self._requeue(request, self.retry.wait_before_retry(request.attempts, exc))

    # -- the streams -------------------------------------------------------

    def run(self) -> Iterator[StreamedEmbedding]:
        while True:
            try:
                yield from self._one_stream()
                return
            except _StreamBroken as broken:
                self._stream_failures += 1
                if self._stream_failures >= self.retry.max_attempts:
                    raise type(broken.exc)(f"{broken.exc} (gave up after {self._stream_failures} attempts)") from None
                time.sleep(self.retry.wait_before_retry(self._stream_failures, broken.exc))
                # The stream broke, not the requests: resend them without spending their attempts.
                for request in broken.in_flight:
                    self._requeue(request, 0.0)
                self._check_same_model()

    def _check_same_model(self) -> None:
        try:
            info = self.client.info(model=self.model, refresh=True)
        except RETRYABLE:
            return  # still down: the next stream fails fast and backs off again
        if info.fingerprint != self.fingerprint:
            raise IntegrityError(
                f"the encoder at {self.client.connection.target} now serves fingerprint {info.fingerprint}, "
                f"not {self.fingerprint} as when the job started: embeddings would be mixed"
            )

    def _one_stream(self) -> Iterator[StreamedEmbedding]:
        connection = self.client.connection
        outbox: queue.Queue = queue.Queue()
        # Raw frames, split by common.wire: chunk bytes are copied once, into the output tensor.
        call = connection.encode_stream_raw(iter(outbox.get, _CLOSE), metadata=connection.metadata)
        watchdog = _Watchdog(call, connection.timeout)
        in_flight: dict[str, _Request] = {}
        receiving: dict[str, ResponseAssembler] = {}
        try:
            while True:
                # 1. Top up the window of in-flight requests.
                while len(in_flight) < self.max_in_flight and (request := self._next_request()) is not None:
                    request_id = str(next(self._ids))
                    in_flight[request_id] = request
                    outbox.put(
                        pb2.EncodeRequest(
                            prompts=request.prompts,
                            dtype=dtype_to_wire(self.dtype),
                            cache_only=self.cache_only,
                            request_id=request_id,
                            model=self.model,
                            pad_table=self.held.id if self.held else "",
                        )
                    )
                if not in_flight:
                    if self._retry_heap:  # only backoffs left: wait for the earliest
                        watchdog.poke(armed=False)
                        time.sleep(max(0.0, self._retry_heap[0][0] - time.monotonic()))
                        continue
                    break  # everything answered
                watchdog.poke(armed=True)

                # 2. Read one message and route it to its request.
                raw = next(call, None)
                if raw is None:
                    raise _StreamBroken(
                        EncoderUnavailable(f"the encoder at {connection.target} closed the stream early"),
                        list(in_flight.values()),
                    )
                msg, offset, data = decode_response_frame(raw)
                request = in_flight.get(msg.request_id)
                if request is None:
                    raise IntegrityError(f"response for unknown request_id {msg.request_id!r}")
                if msg.HasField("error"):
                    del in_flight[msg.request_id]
                    receiving.pop(msg.request_id, None)
                    exc = error_from_code(
                        msg.error.code, msg.error.message, retry_after_s=msg.error.retry_after_ms / 1000 or None
                    )
                    if not isinstance(exc, RETRYABLE):
                        raise type(exc)(f"prompts {request.indices[0]}..{request.indices[-1]}: {exc}") from None
                    self._retry_request(request, exc)
                    continue
                assembler = receiving.get(msg.request_id)
                if assembler is None:
                    out = torch.empty(
                        (len(request.prompts), self.info.max_sequence_length, self.info.embedding_dim),
                        dtype=self.dtype,
                    )
                    assembler = receiving[msg.request_id] = ResponseAssembler(
                        out, self.fingerprint, self.held.rows if self.held else None
                    )
                assembler.add(msg, offset, data)
                if msg.request_done:
                    metadata = assembler.finish()
                    del in_flight[msg.request_id], receiving[msg.request_id]
                    self._stream_failures = 0
                    # The caller's time (writing a shard, a training step) is not the server's silence.
                    watchdog.poke(armed=False)
                    for i, index in enumerate(request.indices):
                        table = self.held.id if self.held and metadata[i].pad_rows_elided else ""
                        yield StreamedEmbedding(index, request.prompts[i], assembler.out[i], metadata[i], table)
            # 3. Half-close; the server ends the stream once it has nothing left.
            outbox.put(_CLOSE)
            for _ in call:
                pass
        except grpc.RpcError as err:
            if watchdog.fired:
                exc = EncoderUnavailable(
                    f"no response from {connection.target} for {connection.timeout:.0f}s; reconnecting"
                )
            else:
                exc = connection.translate(err)
            if not isinstance(exc, RETRYABLE):
                raise exc from None
            raise _StreamBroken(exc, list(in_flight.values())) from None
        finally:
            watchdog.stop()
            outbox.put(_CLOSE)  # unblocks gRPC's request-reading thread
            call.cancel()


class _StreamBroken(Exception):
    """The stream itself failed transiently; ``in_flight`` requests must be sent again."""

    def __init__(self, exc: Flux2RemoteError, in_flight: list[_Request]):
        super().__init__(str(exc))
        self.exc = exc
        self.in_flight = in_flight


def encode_stream(
    client: EncoderClient,
    prompts: Iterable[str],
    *,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    dtype: torch.dtype | None = None,
    cache_only: bool = False,
    retry: RetryPolicy | None = None,
    model: str | None = None,
) -> Iterator[StreamedEmbedding]:
    """See :meth:`dit_client.remote.RemoteTextEncoder.encode_stream`."""
    job = _StreamJob(
        client,
        prompts,
        batch_size=batch_size,
        max_in_flight=max_in_flight,
        dtype=dtype,
        cache_only=cache_only,
        retry=retry,
        model=model,
    )
    return job.run()
