"""The gRPC side of the request policy: one interceptor that adapts calls to :class:`Admission`.

For every TextEncoder method (the registry is ``admission.GRPC_METHODS``) it:

* makes requests protobuf cannot parse reach the policy as an
  :class:`~encoder_server.validation.UndecodableRequest` (INVALID_ARGUMENT, not INTERNAL);
* lets ``Encode``/``EncodeStream`` handlers yield bytes they framed themselves
  (common/wire.py), with no second serialization;
* runs the policy's steps in its order (see encoder_server/admission.py) and
  hands the servicer :class:`~encoder_server.admission.Ticket` objects instead of
  raw requests, so the servicer only adapts tickets to the engine;
* writes each answer message with the write timeout, and frees the call's
  slot once the answer is written or abandoned;
* counts every call until its status is sent, so a graceful stop can wait for
  exactly the calls that matter (health watchers and reflection streams, which
  never end on their own, are not counted).

The user is set in ``current_user`` inside the handler's own task, because a
ContextVar set in ``intercept_service`` does not reach the task that runs the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc

from common.errors import Flux2RemoteError, InvalidRequest, retry_metadata
from common.protocol import SERVICE_NAME
from encoder_server.admission import GRPC_METHODS, Admission, Method, Refused, Slot, Ticket
from encoder_server.identity import current_user
from encoder_server.usage import QuotaExhausted, RateLimited
from encoder_server.validation import UndecodableRequest, tolerant_deserializer

log = logging.getLogger(__name__)

# Handlers of these yield serialized EncodeResponse bytes (common/wire.py framing).
_FRAMED = frozenset({"Encode", "EncodeStream", "GetPadTable"})
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


async def _abort(context: grpc.aio.ServicerContext, exc: Flux2RemoteError) -> NoReturn:
    await context.abort(exc.code, str(exc), trailing_metadata=retry_metadata(exc))


def _authorization(handler_call_details) -> list[str]:
    return [value for key, value in (handler_call_details.invocation_metadata or ()) if key == "authorization"]


def _forget(tickets: dict[int, Ticket], key: int) -> None:
    """Drop a released ticket from a stream's open ones (its ``on_release``)."""
    tickets.pop(key, None)


class PolicyInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``admission`` to every TextEncoder call. Put it first: nothing runs before the policy."""

    def __init__(self, admission: Admission):
        self._admission = admission

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or not path.startswith(f"/{SERVICE_NAME}/"):
            return handler  # health checks and reflection: open, uncounted
        method = GRPC_METHODS.get(path)
        if method is None:  # a method added to the proto but not to the registry: refuse, never leave it open
            return _replace_behaviours(handler, lambda behaviour, kind: _unregistered(path))
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=tolerant_deserializer(handler.request_deserializer))
        if method.name in _FRAMED:
            handler = handler._replace(response_serializer=None)
        authorization = _authorization(handler_call_details)
        wrap = {
            "unary_unary": self._unary_metered if method.metered else self._unary,
            "unary_stream": self._unary_request if method.metered else self._unmetered_stream,
            "stream_stream": self._stream,
        }
        return _replace_behaviours(handler, lambda behaviour, kind: wrap[kind](behaviour, method, authorization))

    # -- per kind ------------------------------------------------------------

    def _begin(self, context, method: Method, authorization: list[str]) -> str:
        """Track the call until its status is sent, then run steps 1-2; returns the user."""
        context.add_done_callback(self._admission.track().done)
        user = self._admission.admit_call(method, authorization)
        current_user.set(user)
        return user

    async def _begin_or_abort(self, context, method: Method, authorization: list[str]) -> str:
        """:meth:`_begin` for calls that pass steps 1-2 only; a refusal ends the call with its status."""
        try:
            return self._begin(context, method, authorization)
        except Flux2RemoteError as exc:
            await _abort(context, exc)
            raise  # not reached: abort raises

    def _unary(self, behaviour, method: Method, authorization: list[str]):
        admission = self._admission

        async def wrapped(request, context):
            user = await self._begin_or_abort(context, method, authorization)
            response = await behaviour(request, context)
            admission.count(method, grpc.StatusCode.OK, user)
            return response

        return wrapped

    async def _admit_one(self, request, context, method: Method, authorization: list[str]) -> Ticket:
        """Every step for a call of one request (Encode, Upsample); a refusal is counted and raised."""
        user = self._begin(context, method, authorization)
        if isinstance(request, UndecodableRequest):
            exc = InvalidRequest(request.reason)
            self._admission.refused(method, user, exc)
            raise exc
        return await self._admission.admit_request(
            method,
            user,
            list(request.prompts),
            request_id=request.request_id,
            request=request,
            model=request.model,
            time_remaining_s=context.time_remaining(),
        )

    @contextlib.asynccontextmanager
    async def _ticket(self, request, context, method: Method, authorization: list[str]) -> AsyncIterator[Ticket]:
        """One request through every step of the policy (refused: the call is aborted with its status);
        the ticket is released when the block ends, however it ends."""
        try:
            ticket = await self._admit_one(request, context, method, authorization)
        except Flux2RemoteError as exc:
            await _abort(context, exc)
        try:
            yield ticket
        finally:
            ticket.release()

    def _unary_metered(self, behaviour, method: Method, authorization: list[str]):
        """Upsample: one request, one answer, through every step of the policy."""

        async def wrapped(request, context):
            async with self._ticket(request, context, method, authorization) as ticket:
                return await behaviour(ticket, context)

        return wrapped

    def _unmetered_stream(self, behaviour, method: Method, authorization: list[str]):
        """GetPadTable: steps 1-2, then the answer written like Encode's (with the write timeout)."""
        admission = self._admission

        async def wrapped(request, context):
            user = await self._begin_or_abort(context, method, authorization)
            await self._write_all(behaviour(request, context), context, method, user)
            admission.count(method, grpc.StatusCode.OK, user)

        return wrapped

    def _unary_request(self, behaviour, method: Method, authorization: list[str]):
        """Encode: one request, a stream of answer messages."""

        async def wrapped(request, context):
            async with self._ticket(request, context, method, authorization) as ticket:
                await self._write_all(behaviour(ticket, context), context, method, ticket.user)

        return wrapped

    def _stream(self, behaviour, method: Method, authorization: list[str]):
        """EncodeStream: the call holds one slot; each message passes rate, validation and quota."""
        admission = self._admission

        async def wrapped(request_iterator: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
            try:
                user = self._begin(context, method, authorization)
                slot = admission.admit_stream(method, user)
            except Flux2RemoteError as exc:
                await _abort(context, exc)
            stopped: list[Flux2RemoteError] = []
            open_tickets: dict[int, Ticket] = {}  # admitted, not yet released by the servicer
            try:
                requests = self._admitted(request_iterator, context, method, user, slot, stopped, open_tickets)
                await self._write_all(behaviour(requests, context), context, method, user)
                if stopped:
                    await _abort(context, stopped[0])
            finally:
                for ticket in list(open_tickets.values()):
                    ticket.release()  # a ticket the servicer never got to gives its quota back
                slot.release()

        return wrapped

    async def _admitted(
        self,
        requests: AsyncIterator,
        context,
        method: Method,
        user: str,
        slot: Slot,
        stopped: list[Flux2RemoteError],
        open_tickets: dict[int, Ticket],
    ) -> AsyncIterator[Ticket | Refused]:
        admission = self._admission
        async for request in requests:
            if isinstance(request, UndecodableRequest):
                exc = InvalidRequest(request.reason)
                admission.refused(method, user, exc)
                yield Refused(request.request_id, exc)
                continue
            while True:
                try:
                    await admission.check_rate(user)
                    break
                except RateLimited as exc:
                    # A stream over its rate waits instead of failing: this is
                    # backpressure on a bulk job, not an error.
                    await asyncio.sleep(exc.retry_after_s or 0.0)
            try:
                ticket = await admission.admit_request(
                    method,
                    user,
                    list(request.prompts),
                    request_id=request.request_id,
                    request=request,
                    model=request.model,
                    time_remaining_s=context.time_remaining(),
                    rate_checked=True,
                    slot=slot,
                )
            except QuotaExhausted as exc:
                # Stop reading; what was admitted is still answered, then the
                # call ends with this status.
                stopped.append(exc)
                return
            except Flux2RemoteError as exc:
                # An over-long id is not echoed: the answer must fit a message.
                echo = request.request_id if len(request.request_id) <= admission.limits.max_request_id_chars else ""
                yield Refused(echo, exc)
                continue
            open_tickets[id(ticket)] = ticket
            ticket.on_release = functools.partial(_forget, open_tickets, id(ticket))
            yield ticket

    async def _write_all(self, messages: AsyncIterator[bytes], context, method: Method, user: str) -> None:
        """Write every answer message, each within the write timeout.

        A message gRPC cannot hand to the client in time (flow control: the
        client is not reading) ends the call: raising CancelledError makes
        grpc.aio cancel it in the core (RST_STREAM), which frees its slot and
        buffers at once, where an abort would wait behind the unread data.
        """
        timeout = self._admission.limits.write_timeout_s
        async for message in messages:
            try:
                await asyncio.wait_for(context.write(message), timeout)
            except TimeoutError:
                self._admission.write_timed_out(method, user)
                raise asyncio.CancelledError() from None


def _unregistered(path: str):
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{path} is not served by this server")

    return refuse


def _replace_behaviours(handler, make: Callable):
    """``handler`` with its behaviour function replaced by ``make(behaviour, kind)``."""
    return handler._replace(
        **{kind: make(getattr(handler, kind), kind) for kind in _KINDS if getattr(handler, kind) is not None}
    )
