"""gRPC adapter: admitted requests in, engine calls, framed protobuf out. No model or policy code here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

from common.config import Limits
from common.errors import (
    Flux2RemoteError,
    InvalidRequest,
    UpsamplingUnavailable,
    retry_after_ms,
    retry_metadata,
    status_of,
)
from common.protocol import pb2, pb2_grpc
from common.wire import WireTensor, dtype_from_wire
from encoder_server.admission import Refused, Ticket
from encoder_server.engine import EncodedPrompt
from encoder_server.metrics import EncoderMetrics
from encoder_server.models import ModelRegistry, ServedModel
from encoder_server.upsampling import UpsampleService
from encoder_server.validation import UpsampleArgs

log = logging.getLogger(__name__)


class TextEncoderServicer(pb2_grpc.TextEncoderServicer):
    """Implements ``flux2.encoder.v1.TextEncoder`` on top of the served models' engines.

    The policy interceptor (encoder_server/interceptor.py) runs first and hands
    ``Encode`` one :class:`Ticket`, and ``EncodeStream`` an iterator of tickets
    and :class:`Refused` messages, instead of raw requests.
    """

    def __init__(
        self,
        models: ModelRegistry,
        info: pb2.GetInfoResponse,
        limits: Limits,
        metrics: EncoderMetrics,
        upsampling: UpsampleService | None = None,
    ):
        self._models = models
        self._upsampling = upsampling
        self._metrics = metrics
        self._info = info
        self._limits = limits

    async def GetInfo(self, request, context):
        try:
            model = self._models.get(request.model or self._models.names[0])
        except Flux2RemoteError as exc:
            await context.abort(*status_of(exc))
        described = model.info()
        reply = pb2.GetInfoResponse()
        reply.CopyFrom(self._info)
        # The top-level fields describe one model, as they did before servers had several.
        for field in (
            "model_id",
            "revision",
            "fingerprint",
            "num_hidden_layers",
            "computed_layers",
            "hidden_size",
            "embedding_dim",
            "max_sequence_length",
            "dtype",
            "quantization",
            "device",
            "demo",
            "padding_side",
            "family",
        ):
            setattr(reply, field, getattr(described, field))
        reply.hidden_states_layers[:] = described.hidden_states_layers
        reply.model_name = described.name
        return reply

    async def GetPadTable(self, request, context) -> AsyncIterator[bytes]:
        try:
            model = self._models.get(request.model)
            if model.pad_table is None:
                raise InvalidRequest(
                    f"model {model.name!r} has no pad table (its tokenizer pads on the {model.backend.padding_side}); "
                    "ask Encode for whole embeddings"
                )
        except Flux2RemoteError as exc:
            await context.abort(*status_of(exc))
        metadata = pb2.PromptMetadata(model_fingerprint=model.backend.fingerprint)
        table = model.pad_table
        assert table is not None  # refused above
        for msg in WireTensor.from_tensor(table).frames(
            request_id="",
            prompt_index=0,
            metadata=metadata,
            chunk_bytes=self._limits.max_chunk_bytes,
            request_done=True,
        ):
            yield msg

    async def Encode(self, ticket: Ticket, context) -> AsyncIterator[bytes]:
        try:
            responses = await self._encode(ticket, deadline=_deadline_of(context))
        except Flux2RemoteError as exc:
            await context.abort(*status_of(exc), trailing_metadata=retry_metadata(exc))
        for msg in responses:
            yield msg

    async def EncodeStream(self, tickets: AsyncIterator[Ticket | Refused], context) -> AsyncIterator[bytes]:
        # Reading stops while max_in_flight_per_stream requests are open, i.e.
        # queued, computing, or answered but not yet written out: gRPC flow
        # control then pushes back on the client (backpressure), and a client
        # that sends without reading cannot pile up finished embeddings here.
        in_flight = asyncio.Semaphore(self._limits.max_in_flight_per_stream)
        ready: asyncio.Queue[Iterator[bytes] | BaseException | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def handle(item: Ticket | Refused) -> None:
            msgs: Iterator[bytes] | BaseException
            try:
                if isinstance(item, Refused):
                    raise item.error
                # A full queue makes the stream wait (backpressure) instead of failing the request.
                msgs = await self._encode(item, deadline=_deadline_of(context), wait_for_capacity=True)
            except Flux2RemoteError as exc:
                code, message = status_of(exc)
                msgs = iter(
                    [
                        pb2.EncodeResponse(
                            request_id=item.request_id,
                            error=pb2.EncodeError(
                                code=code.value[0], message=message, retry_after_ms=retry_after_ms(exc) or 0
                            ),
                            request_done=True,
                        ).SerializeToString()
                    ]
                )
            except Exception as exc:  # a bug: end the call with it rather than hold a slot forever
                msgs = exc
            finally:
                if isinstance(item, Ticket):
                    item.release()  # served or failed: its quota is settled, the stream may forget it
            await ready.put(msgs)  # the writer releases its in_flight slot once it is written

        async def read_all() -> None:
            try:
                async for item in tickets:
                    await in_flight.acquire()
                    task = asyncio.create_task(handle(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*tasks)
                await ready.put(None)
            except BaseException as exc:  # reported to the writer below, never lost
                await ready.put(exc)

        reader = asyncio.create_task(read_all())
        try:
            while (item := await ready.get()) is not None:
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        return
                    raise item
                for msg in item:  # one request's messages stay contiguous
                    yield msg
                in_flight.release()
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def Upsample(self, ticket: Ticket, context) -> pb2.UpsampleResponse:
        t0 = time.perf_counter_ns()
        try:
            with ticket.charging():
                if self._upsampling is None:
                    raise UpsamplingUnavailable("the server was started without --upsampling")
                # The upsampling service reports its own failures as our errors (INTERNAL without
                # details for a bug, RESOURCE_EXHAUSTED for out of memory): nothing else escapes.
                outcome = await self._upsampling.upsample(
                    ticket.model,
                    ticket.prompts,
                    ticket.upsample or UpsampleArgs(),
                    user=ticket.user,
                    deadline=_deadline_of(context),
                )
        except Flux2RemoteError as exc:
            await context.abort(*status_of(exc), trailing_metadata=retry_metadata(exc))
        batch = outcome.batch
        return pb2.UpsampleResponse(
            request_id=ticket.request_id,
            results=[
                pb2.UpsampledPrompt(text=text, generated_tokens=generated, input_tokens=inputs)
                for text, generated, inputs in zip(batch.texts, batch.generated_tokens, batch.input_tokens, strict=True)
            ],
            seed=batch.seed,
            temperature=outcome.temperature,
            model_fingerprint=outcome.fingerprint,
            queue_time_ns=outcome.queue_ns,
            tokenization_time_ns=batch.tokenization_ns,
            generation_time_ns=batch.generation_ns,
            total_time_ns=time.perf_counter_ns() - t0,
        )

    # -- helpers ---------------------------------------------------------

    async def _encode(
        self, ticket: Ticket, *, deadline: float | None = None, wait_for_capacity: bool = False
    ) -> Iterator[bytes]:
        """Serve one admitted request; return its serialized response messages as a lazy iterator.

        Messages are built one chunk at a time while gRPC sends the previous
        ones, instead of materialising every message of a 15.7 MB embedding first.
        """
        t0 = time.perf_counter_ns()
        request = ticket.request
        model = self._models.get(ticket.model)
        with ticket.charging():
            dtype = dtype_from_wire(request.dtype, default=model.backend.dtype)
            results = await model.engine.encode(
                ticket.prompts,
                user=ticket.user,
                cache_only=request.cache_only,
                deadline=deadline,
                wait_for_capacity=wait_for_capacity,
            )
        total_ns = time.perf_counter_ns() - t0
        return self._messages(ticket.request_id, results, dtype, total_ns, model, request.pad_table)

    def _messages(
        self,
        request_id: str,
        results: list[EncodedPrompt],
        dtype,
        total_ns: int,
        model: ServedModel,
        client_table: str,
    ) -> Iterator[bytes]:
        """Serialized EncodeResponse messages, framed straight from the embeddings' memory
        (see common/wire.py: protobuf-python would copy each 1 MiB chunk three times)."""
        for index, result in enumerate(results):
            metadata = pb2.PromptMetadata(
                token_count=result.token_count,
                truncated=result.truncated,
                queue_time_ns=result.queue_ns,
                tokenization_time_ns=result.tokenization_ns,
                inference_time_ns=result.inference_ns,
                total_time_ns=total_ns,
                model_fingerprint=model.backend.fingerprint,
                cache_hit=result.cache_hit,
                batch_size=result.batch_size,
                compute=model.backend.compute,
            )
            rows, metadata.pad_rows_elided = model.answer_rows(result, client_table)
            tensor = WireTensor.from_tensor(rows.to(dtype))
            self._metrics.response_bytes.labels(transport="grpc").inc(tensor.nbytes)
            yield from tensor.frames(
                request_id=request_id,
                prompt_index=index,
                metadata=metadata,
                chunk_bytes=self._limits.max_chunk_bytes,
                request_done=index == len(results) - 1,
            )


def _deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
