"""Knowing when the real work is done, so a graceful stop need not wait for idle streams.

The same count bounds how many Encode/EncodeStream calls run at once.

``grpc.aio.Server.stop(grace)`` waits for *every* open call, including
``grpc.health.v1.Health/Watch`` streams that load balancers keep open forever
and reflection streams. Waiting on those would turn every restart into a full
grace period. :class:`InFlightCalls` counts only TextEncoder calls; the server
drains those, then ends whatever is left.
"""

from __future__ import annotations

import asyncio
import inspect

import grpc

from common.errors import EncoderOverloaded, retry_metadata
from common.protocol import SERVICE_NAME

# Calls bounded by ``max_calls``; GetInfo is cheap and holds nothing.
_BOUNDED_METHODS = frozenset({f"/{SERVICE_NAME}/Encode", f"/{SERVICE_NAME}/EncodeStream"})


class InFlightCalls(grpc.aio.ServerInterceptor):
    """Counts running TextEncoder calls; :meth:`wait_idle` returns when none is left.

    Put it first in the interceptor list so it wraps everything else.

    Args:
        max_calls: Encode/EncodeStream calls allowed at once (``None``: no bound);
            one more is refused with RESOURCE_EXHAUSTED and a retry hint.
    """

    def __init__(self, max_calls: int | None = None):
        self._max_calls = max_calls
        self._bounded = 0
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    def close(self) -> None:
        """Refuse new TextEncoder calls with UNAVAILABLE from now on; running ones go on."""
        self._closing = True

    async def _refuse_if_closing(self, context: grpc.aio.ServicerContext) -> None:
        if self._closing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica or later"
            )

    async def _refuse_if_full(self, context: grpc.aio.ServicerContext) -> None:
        if self._max_calls is not None and self._bounded >= self._max_calls:
            exc = EncoderOverloaded(
                f"the encoder is serving {self._bounded} calls at once, its limit (--max-concurrent-calls); "
                "retry in a moment, or send bulk work through one EncodeStream",
                retry_after_s=1.0,
            )
            await context.abort(exc.code, str(exc), trailing_metadata=retry_metadata(exc))

    @property
    def count(self) -> int:
        return self._count

    def _begin(self, context: grpc.aio.ServicerContext, bounded: bool) -> None:
        self._count += 1
        self._bounded += bounded
        self._idle.clear()
        # Count the call until gRPC has sent its status, not just until the
        # handler returns: stopping in between would cut off the final status.
        context.add_done_callback(lambda _context: self._end(bounded))

    def _end(self, bounded: bool) -> None:
        self._count -= 1
        self._bounded -= bounded
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: forever) for the count to reach 0; True if it did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        bounded = handler_call_details.method in _BOUNDED_METHODS
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        return handler._replace(
            **{k: self._wrap(getattr(handler, k), k, bounded) for k in kinds if getattr(handler, k) is not None}
        )

    def _wrap(self, behaviour, kind: str, bounded: bool):
        if kind in ("unary_stream", "stream_stream"):

            async def wrapped(request, context):
                await self._refuse_if_closing(context)
                if bounded:
                    await self._refuse_if_full(context)
                self._begin(context, bounded)
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for message in result:
                        yield message
                else:
                    await result

        else:

            async def wrapped(request, context):
                await self._refuse_if_closing(context)
                if bounded:
                    await self._refuse_if_full(context)
                self._begin(context, bounded)
                return await behaviour(request, context)

        return wrapped
