"""The one request policy: the steps every request passes, in one order, for every transport.

The gRPC interceptor (encoder_server/interceptor.py) and the HTTP handler
(encoder_server/http_endpoint.py) both call one :class:`Admission`, so a limit
added here holds on every way in. The steps, and what a refusal looks like:

1. **draining**: a server that is shutting down takes no new work
   (``UNAVAILABLE`` / HTTP 503);
2. **authentication**: exactly one ``authorization: Bearer KEY`` names the user
   (``UNAUTHENTICATED`` / 401);
3. **rate limit**: the user's requests per minute (``RESOURCE_EXHAUSTED`` / 429
   with a retry hint; a stream waits instead, which is backpressure);
4. **cheap validation**: counts, sizes, text, request ids, deadlines, the
   model named (``INVALID_ARGUMENT`` / 400, 413 for sizes);
5. **concurrency slots**: the user's share, then the server's total
   (``RESOURCE_EXHAUSTED`` / 429, retry in 1 s);
6. **daily quota**: the prompts are reserved (``RESOURCE_EXHAUSTED`` / 429,
   retry at midnight UTC); the reservation is kept once the embeddings are
   computed or served and given back when the request fails, so a refused
   request never costs quota.

A stream (``EncodeStream``) takes its slot once, right after step 2, and keeps
it for its whole life; steps 3, 4 and 6 then run for each of its messages.

A slot is held until the answer is written. An answer the client does not
read within ``Limits.write_timeout_s`` is cancelled and its slot freed (the
transports enforce it with :meth:`Admission.write_timed_out`), so a client that
stops reading cannot keep slots, nor the embeddings they hold.

Every outcome is counted once, in ``flux2_encoder_requests_total``: refusals
here, served or failed requests by :meth:`Ticket.charging`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.config import Limits, UpsamplingConfig, fair_share
from common.errors import EncoderOverloaded, EncoderUnavailable, Flux2RemoteError, Unauthenticated
from common.protocol import SERVICE_NAME
from encoder_server.auth import Authenticator
from encoder_server.cluster import ClusterLimits, ClusterUnavailable
from encoder_server.identity import ANONYMOUS
from encoder_server.metrics import EncoderMetrics
from encoder_server.models import resolve_model_name
from encoder_server.usage import QuotaExhausted, Reservation, UsageLimiter
from encoder_server.validation import UpsampleArgs, validate_request, validate_upsample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One way in, as the policy sees it.

    Attributes:
        name: label in metrics and logs.
        metered: costs model time, so it passes steps 3-6 (``GetInfo`` and ``GetPadTable`` pass only 1-2).
        streaming_requests: many requests in one call (steps 3, 4 and 6 run per message).
    """

    name: str
    metered: bool
    streaming_requests: bool = False
    upsample: bool = False


GET_INFO = Method("GetInfo", metered=False)
GET_PAD_TABLE = Method("GetPadTable", metered=False)
ENCODE = Method("Encode", metered=True)
ENCODE_STREAM = Method("EncodeStream", metered=True, streaming_requests=True)
# Prompt upsampling: the same steps as Encode (its prompts count against the quota); the
# generation itself then waits in its own queue (encoder_server/upsampling.py).
UPSAMPLE = Method("Upsample", metered=True, upsample=True)
HTTP_PREDICT = Method("HTTP /predict", metered=True)
HTTP_UPSAMPLE = Method("HTTP /upsample", metered=True, upsample=True)

# The one registry of gRPC methods. Services not named here (health checks,
# reflection) stay open: load balancers and grpcurl probe them without keys,
# and they reveal only SERVING/NOT_SERVING and the public schema.
GRPC_METHODS: dict[str, Method] = {
    f"/{SERVICE_NAME}/{m.name}": m for m in (GET_INFO, GET_PAD_TABLE, ENCODE, ENCODE_STREAM, UPSAMPLE)
}


class Slot:
    """One concurrency slot; :meth:`release` is idempotent."""

    def __init__(self, admission: Admission, user: str):
        self._admission = admission
        self.user = user
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release_slot(self.user)


@dataclass(frozen=True)
class Refused:
    """A message of a stream that the policy refused; it is answered with ``error`` and the stream goes on."""

    request_id: str
    error: Flux2RemoteError


@dataclass
class Ticket:
    """A request that passed the policy: who asks, for what, and what it holds.

    Attributes:
        method: the way it came in.
        user: the authenticated caller.
        prompts: the validated prompt texts.
        request_id: echoed in the answer (EncodeStream), ``""`` otherwise.
        request: the transport's own request object (the protobuf on gRPC), for
            fields the policy does not look at (dtype, cache_only).
        model: the name of the served model that encodes it.
        upsample: an ``Upsample`` request's validated images, temperature and seed (``None`` for others).
    """

    admission: Admission
    method: Method
    user: str
    prompts: list[str]
    request_id: str = ""
    request: Any = None
    model: str = ""
    upsample: UpsampleArgs | None = None
    slot: Slot | None = None
    reservation: Reservation | ClusterReservation | None = None
    # Called once by release(): a stream forgets the ticket then, so a long
    # bulk stream does not keep every request it ever answered.
    on_release: Callable[[], None] | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)

    @contextmanager
    def charging(self) -> Iterator[None]:
        """Wrap the work that serves this ticket: quota is kept if it succeeds, given back if it raises.

        Counts the outcome once in the request metrics, whatever it is.
        """
        try:
            yield
        except BaseException as exc:
            self._settle(exc)
            raise
        self._settle(None)

    def _settle(self, exc: BaseException | None) -> None:
        if self._settled:
            return
        self._settled = True
        if exc is not None and self.reservation is not None:
            self.reservation.refund()
        if isinstance(exc, Flux2RemoteError):
            code = exc.code
        elif isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        elif exc is not None:
            code = grpc.StatusCode.INTERNAL
        else:
            code = grpc.StatusCode.OK
        self.admission.count(self.method, code, self.user)

    def release(self) -> None:
        """The answer is written (or abandoned): free the slot; quota not kept by :meth:`charging` goes back."""
        if not self._settled and self.reservation is not None:
            self.reservation.refund()
        self._settled = True
        if self.slot is not None:
            self.slot.release()
        if self.on_release is not None:
            on_release, self.on_release = self.on_release, None
            on_release()


class Admission:
    """The request policy of one server, shared by every transport.

    Args:
        authenticator: API keys (open when it has none).
        limiter: per-user rate and daily quota.
        limits: request bounds, concurrency and timeouts.
        metrics: where outcomes are counted.
        upsampling: the bounds of ``Upsample`` requests (validation, step 4).
    """

    def __init__(
        self,
        authenticator: Authenticator,
        limiter: UsageLimiter,
        limits: Limits,
        metrics: EncoderMetrics,
        cluster: ClusterLimits | None = None,
        *,
        model_names: list[str] | None = None,
        upsampling: UpsamplingConfig | None = None,
    ):
        self.upsampling = upsampling or UpsamplingConfig()
        self.model_names = list(model_names or [""])
        self.authenticator = authenticator
        self.limiter = limiter
        self.cluster = cluster
        self.limits = limits
        self.metrics = metrics
        self.max_calls = limits.max_concurrent_calls
        self.max_calls_per_user = per_user_share(limits, authenticator)
        self._slots = 0
        self._slots_by_user: Counter[str] = Counter()
        self._closing = False
        self._calls = 0
        self._last_call_at = 0.0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle: draining ----------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Refuse new requests on every transport from now on (step 1); running ones go on."""
        self._closing = True

    def track(self) -> CallTracker:
        """Count one call (admitted or being refused) until its answer is sent; :meth:`wait_idle` waits for them."""
        self._calls += 1
        self._last_call_at = time.monotonic()
        self._idle.clear()
        return CallTracker(self)

    async def wait_quiet(self, quiet_s: float, at_most_s: float) -> None:
        """After the drain: wait until no call has arrived for ``quiet_s`` (at most ``at_most_s`` in all).

        gRPC's own stop cancels calls that reach it while it stops (the client
        sees CANCELLED, which no client retries); waiting for a quiet moment
        lets every late caller get its UNAVAILABLE from step 1 first.
        """
        end = time.monotonic() + at_most_s
        while (now := time.monotonic()) < end:
            if self._calls == 0 and now - self._last_call_at >= quiet_s:
                return
            await asyncio.sleep(min(quiet_s, end - now))

    def _untrack(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._idle.set()

    @property
    def calls(self) -> int:
        """Calls being answered now, refusals included."""
        return self._calls

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: for ever) until no call is left; True if none is."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- the steps ----------------------------------------------------------

    def check_open(self) -> None:
        """Step 1."""
        if self._closing:
            raise EncoderUnavailable("the server is shutting down; retry on another replica or later")

    def authenticate(self, authorization: Sequence[str]) -> str:
        """Step 2: the user named by the ``authorization`` values the request carried (header or metadata)."""
        if self.authenticator.required and len(authorization) > 1:
            raise Unauthenticated("malformed authorization: send exactly one 'authorization' header")
        return self.authenticator.authenticate(authorization[0] if authorization else None)

    async def check_rate(self, user: str) -> None:
        """Step 3: raises :class:`RateLimited`. Counted cluster-wide when replicas share Redis, else locally."""
        if not self.limiter.rpm:
            return
        if self.cluster is not None:
            try:
                wait_s = await self.cluster.take_request(user)
            except ClusterUnavailable:
                pass  # counted here until Redis is back
            else:
                if wait_s > 0:
                    raise self.limiter.rate_limited(user, wait_s)
                return
        self.limiter.take_request(user)

    def validate(self, prompts: list[str], *, request_id: str = "", time_remaining_s: float | None = None) -> list[str]:
        """Step 4 (see :func:`encoder_server.validation.validate_request`)."""
        return validate_request(prompts, self.limits, request_id=request_id, time_remaining_s=time_remaining_s)

    def validate_upsample(
        self, prompts: list[str], request: Any, *, time_remaining_s: float | None = None
    ) -> UpsampleArgs:
        """Step 4 for ``Upsample`` (see :func:`encoder_server.validation.validate_upsample`); ``request``
        is the ``pb2.UpsampleRequest`` or the HTTP handler's :class:`UpsampleArgs`."""
        return validate_upsample(prompts, UpsampleArgs.of(request), self.upsampling, time_remaining_s=time_remaining_s)

    def resolve_model(self, name: str) -> str:
        """Step 4 too: the served model a request names (``""``: the only one); InvalidRequest listing them."""
        return resolve_model_name(name, self.model_names)

    def acquire_slot(self, user: str) -> Slot:
        """Step 5: one of the user's share of slots, and one of the server's."""
        # With no share below the total (one user, or none) the total's message says more.
        if self.max_calls_per_user < self.max_calls and self._slots_by_user[user] >= self.max_calls_per_user:
            raise EncoderOverloaded(
                f"user {user!r} already has {self._slots_by_user[user]} calls running, the per-user share "
                "(--max-concurrent-calls-per-user); read the answers of the running ones first, or send "
                "bulk work through one EncodeStream",
                retry_after_s=1.0,
            )
        if self._slots >= self.max_calls:
            raise EncoderOverloaded(
                f"the encoder is serving {self._slots} calls at once, its limit (--max-concurrent-calls); "
                "retry in a moment, or send bulk work through one EncodeStream",
                retry_after_s=1.0,
            )
        self._slots += 1
        self._slots_by_user[user] += 1
        return Slot(self, user)

    def _release_slot(self, user: str) -> None:
        self._slots -= 1
        self._slots_by_user[user] -= 1
        if not self._slots_by_user[user]:
            del self._slots_by_user[user]

    async def reserve(self, user: str, prompts: int) -> Reservation | ClusterReservation:
        """Step 6: raises :class:`QuotaExhausted`. Cluster-wide with shared Redis, else local."""
        if self.cluster is not None and self.limiter.prompts_per_day:
            day = self.limiter.today()
            try:
                counted, used = await self.cluster.reserve(user, day, prompts)
            except ClusterUnavailable:
                pass
            else:
                if not counted:
                    raise self.limiter.quota_exhausted(user, used, prompts)
                return ClusterReservation(self.cluster, user, day, prompts)
        return self.limiter.reserve(user, prompts)

    # -- the steps composed, as the transports use them --------------------

    def admit_call(self, method: Method, authorization: Sequence[str]) -> str:
        """Steps 1-2 for a new call; returns the user. A refusal is counted and raised."""
        user = ANONYMOUS
        try:
            self.check_open()
            return self.authenticate(authorization)
        except Flux2RemoteError as exc:
            self.refused(method, user, exc)
            raise

    async def admit_rate(self, method: Method, user: str) -> None:
        """Step 3 on its own, for a transport that checks it before reading the request; counted when refused."""
        try:
            await self.check_rate(user)
        except Flux2RemoteError as exc:
            self.refused(method, user, exc)
            raise

    def admit_stream(self, method: Method, user: str) -> Slot:
        """Step 5 for a call that holds one slot for all its requests; a refusal is counted and raised."""
        try:
            return self.acquire_slot(user)
        except Flux2RemoteError as exc:
            self.refused(method, user, exc)
            raise

    async def admit_request(
        self,
        method: Method,
        user: str,
        prompts: list[str],
        *,
        request_id: str = "",
        request: Any = None,
        model: str = "",
        time_remaining_s: float | None = None,
        rate_checked: bool = False,
        slot: Slot | None = None,
    ) -> Ticket:
        """Steps 3-6 for one request of an admitted call; a refusal is counted and raised.

        Args:
            rate_checked: step 3 already ran (HTTP checks the rate before reading the body;
                streams wait for the rate instead of being refused).
            slot: the call's slot when it holds one already (streams); otherwise one is taken.
        """
        taken: Slot | None = None
        try:
            if not rate_checked:
                await self.check_rate(user)
            prompts = self.validate(prompts, request_id=request_id, time_remaining_s=time_remaining_s)
            upsample = None
            if method.upsample:
                upsample = self.validate_upsample(prompts, request, time_remaining_s=time_remaining_s)
            model = self.resolve_model(model)
            if slot is None:
                slot = taken = self.acquire_slot(user)
            reservation = await self.reserve(user, len(prompts))
        except Flux2RemoteError as exc:
            if taken is not None:
                taken.release()
            self.refused(method, user, exc)
            raise
        return Ticket(
            self,
            method,
            user,
            prompts,
            request_id,
            request,
            model=model,
            upsample=upsample,
            slot=taken,
            reservation=reservation,
        )

    def refused(self, method: Method, user: str, exc: Flux2RemoteError) -> None:
        """Count and log a request the policy refused."""
        self.count(method, exc.code, user)
        if isinstance(exc, (Unauthenticated, EncoderOverloaded)) and not isinstance(exc, QuotaExhausted):
            log.info("%s refused for user %s: %s", method.name, user, exc)
        elif isinstance(exc, QuotaExhausted):
            log.info("%s refused for user %s (daily quota): %s", method.name, user, exc)

    def count(self, method: Method, code: grpc.StatusCode, user: str) -> None:
        self.metrics.count_request(method.name, code.name, user)

    def write_timed_out(self, method: Method, user: str) -> None:
        """An answer was not read within ``write_timeout_s``: the transport cancels it; count and log it here."""
        self.metrics.write_timeouts.labels(method=method.name).inc()
        log.warning(
            "%s: user %s did not read the answer within %.0f s (--write-timeout); cancelled, slot freed",
            method.name,
            user,
            self.limits.write_timeout_s,
        )


class ClusterReservation:
    """Prompts counted against a user's quota in Redis; :meth:`refund` gives them back (in the background)."""

    def __init__(self, cluster: ClusterLimits, user: str, day: str, prompts: int):
        self._cluster = cluster
        self.user, self.day, self.prompts = user, day, prompts

    def refund(self) -> None:
        if not self.prompts:
            return
        prompts, self.prompts = self.prompts, 0
        task = asyncio.get_running_loop().create_task(self._refund(prompts))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def _refund(self, prompts: int) -> None:
        try:
            await self._cluster.refund(self.user, self.day, prompts)
        except ClusterUnavailable:
            log.warning(
                "could not give %d prompts back to %s's quota: the shared state is unavailable", prompts, self.user
            )


# Refund tasks in flight (the loop keeps only weak references to tasks).
_BACKGROUND: set[asyncio.Task] = set()


class CallTracker:
    """One counted call; :meth:`done` (idempotent) ends it."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._open = True

    def done(self, *_ignored) -> None:
        if self._open:
            self._open = False
            self._admission._untrack()


def per_user_share(limits: Limits, authenticator: Authenticator) -> int:
    """Slots one user may hold: ``max_concurrent_calls_per_user``, or the automatic share when it is 0
    (:func:`common.config.fair_share`, the rule the generation queue uses too)."""
    return fair_share(limits.max_concurrent_calls, limits.max_concurrent_calls_per_user, authenticator.users)


def resolve_cache_scope(scope: str, authenticator: Authenticator) -> str:
    """``shared`` or ``user`` for the ``--cache-scope`` flag's value (``auto``, ``shared`` or ``user``).

    ``auto`` is ``user`` when the keys file names several users: an operator who
    hands out keys to several people expects them not to see each other's
    prompts, and sharing is then a choice to make on purpose. With one user or
    none, there is nobody to hide anything from, and sharing costs nothing.
    """
    if scope == "auto":
        return "user" if authenticator.users > 1 else "shared"
    if scope not in ("shared", "user"):
        raise ValueError(f"cache scope must be auto, shared or user, not {scope!r}")
    return scope
