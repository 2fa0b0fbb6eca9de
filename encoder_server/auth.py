"""API keys, per-user limits, and the gRPC interceptor that applies them.

The keys file has one ``user:key`` per line; ``#`` starts a comment line.
With a keys file every TextEncoder call must carry ``authorization: Bearer KEY``
metadata; without one every caller is the user ``anonymous``. Health checks
and reflection stay open either way (load balancers and ``grpcurl`` probe them
without credentials, and they reveal nothing but the public schema and
SERVING/NOT_SERVING). See docs/security.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc

from common.atomic import atomic_write
from common.config import AuthConfig
from common.errors import EncoderOverloaded, Flux2RemoteError, Unauthenticated, retry_metadata
from common.protocol import SERVICE_NAME
from encoder_server.identity import ANONYMOUS, current_user
from encoder_server.text_encoder import ConfigError

log = logging.getLogger(__name__)

# Long enough that guessing is hopeless; `secrets.token_urlsafe(32)` gives 43.
MIN_KEY_CHARS = 16
# User names end up in logs and metric labels: keep them short and plain.
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# Calls that cost model time count against the per-user limits; GetInfo does not.
METERED_METHODS = frozenset({f"/{SERVICE_NAME}/Encode", f"/{SERVICE_NAME}/EncodeStream"})


class KeyFileError(ConfigError):
    """The API keys file is missing, unreadable or malformed (the CLI exits with code 2)."""


# -- keys ----------------------------------------------------------------


def load_api_keys(path: str | os.PathLike) -> dict[str, str]:
    """Read ``user:key`` lines from ``path``; return ``{user: key}``.

    Blank lines and lines whose first non-blank character is ``#`` are skipped.
    The key is everything after the first ``:``. Raises :class:`KeyFileError`
    naming the file and line for anything else.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"API keys file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read API keys file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API keys file %s is readable by other local users; chmod 600 it", path)

    keys: dict[str, str] = {}
    owner_of_key: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {lineno}"
        user, sep, key = line.partition(":")
        user, key = user.strip(), key.strip()
        if not sep:
            raise KeyFileError(f"{where}: expected 'user:key', found no ':'")
        if not _USER_RE.fullmatch(user):
            raise KeyFileError(
                f"{where}: user name {user!r} must be 1-64 characters of letters, digits, '.', '_', '@' or '-', "
                "starting with a letter or digit"
            )
        if not key:
            raise KeyFileError(f"{where}: user {user!r} has an empty key")
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            raise KeyFileError(
                f"{where}: the key of {user!r} must be printable ASCII without spaces "
                "(comments go on their own line, starting with '#')"
            )
        if len(key) < MIN_KEY_CHARS:
            raise KeyFileError(
                f"{where}: the key of {user!r} has {len(key)} characters; use at least {MIN_KEY_CHARS} "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))' makes a good one)"
            )
        if user in keys:
            raise KeyFileError(f"{where}: user {user!r} appears twice")
        if key in owner_of_key:
            raise KeyFileError(f"{where}: {user!r} has the same key as {owner_of_key[key]!r}; give each user their own")
        keys[user] = key
        owner_of_key[key] = user
    if not keys:
        raise KeyFileError(f"API keys file {path} holds no 'user:key' line, so nobody could call the server")
    return keys


class KeyStore:
    """Maps API keys to user names, comparing in constant time.

    Keys are kept only as SHA-256 digests, so every comparison is between two
    32-byte strings whatever the lengths of the keys involved.
    """

    def __init__(self, keys: Mapping[str, str]):
        self._entries = [(user, hashlib.sha256(key.encode()).digest()) for user, key in keys.items()]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "KeyStore":
        return cls(load_api_keys(path))

    def __len__(self) -> int:
        return len(self._entries)

    def user_for(self, key: str) -> str | None:
        """The user whose key is ``key``, or ``None``.

        Compares against every stored key, never stopping at the first match,
        so the time taken says nothing about which key (if any) matched.
        """
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for user, stored in self._entries:
            if hmac.compare_digest(stored, digest):
                found = user
        return found


def parse_bearer(authorization: str | None) -> str:
    """The KEY of an ``authorization: Bearer KEY`` value; raises :class:`Unauthenticated` otherwise."""
    if authorization is None or not authorization.strip():
        raise Unauthenticated(
            "this server needs an API key: send 'authorization: Bearer KEY' "
            "(RemoteTextEncoder(target, api_key=...), flux2-dit --api-key or $FLUX2_API_KEY)"
        )
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    # RFC 9110: the scheme is case-insensitive.
    if scheme.lower() != "bearer" or not key or " " in key:
        raise Unauthenticated("malformed authorization header: expected 'Bearer KEY'")
    return key


class Authenticator:
    """Turns an ``authorization`` value into a user name.

    Args:
        keys: the known keys; ``None`` disables authentication (everyone is ``anonymous``).
    """

    def __init__(self, keys: KeyStore | None):
        self._keys = keys

    @property
    def required(self) -> bool:
        return self._keys is not None

    def authenticate(self, authorization: str | None) -> str:
        """The caller's user name; raises :class:`Unauthenticated` for a missing, malformed or unknown key."""
        if self._keys is None:
            return ANONYMOUS
        user = self._keys.user_for(parse_bearer(authorization))
        if user is None:
            raise Unauthenticated("API key not recognised")
        return user


# -- per-user limits -----------------------------------------------------

USAGE_FORMAT = 1


class RateLimited(EncoderOverloaded):
    """The user sent more requests per minute than allowed; ``retry_after_s`` says when one is free."""


class QuotaExhausted(EncoderOverloaded):
    """The user's prompts for this UTC day are used up; ``retry_after_s`` runs to the next midnight UTC."""


@dataclass
class _Usage:
    tokens: float
    refilled_at: float
    day: str = ""
    prompts_today: int = 0


class UsageLimiter:
    """Per-user request rate (token bucket) and daily prompt quota.

    Args:
        requests_per_minute: bucket size and refill rate; a user may burst this
            many requests, then one more every ``60 / rpm`` seconds. 0: no limit.
        prompts_per_day: prompts per user per UTC calendar day. 0: no limit.
        clock: monotonic seconds (tests pass a fake).
        wall_clock: POSIX seconds, for the UTC day (tests pass a fake).
        state_file: where today's prompt counts are kept across restarts (JSON,
            written atomically by :meth:`save`); ``None`` keeps them in memory only.
            Rate-limit buckets are not kept: they refill within a minute anyway.

    State grows with the number of distinct users, which the keys file bounds.
    """

    def __init__(
        self,
        requests_per_minute: int = 0,
        prompts_per_day: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        state_file: str | os.PathLike | None = None,
    ):
        if requests_per_minute < 0 or prompts_per_day < 0:
            raise ConfigError("rate limit and daily quota must be 0 (off) or positive")
        self.rpm = requests_per_minute
        self.prompts_per_day = prompts_per_day
        self._clock = clock
        self._wall_clock = wall_clock
        self._usage: dict[str, _Usage] = {}
        # gRPC and HTTP share one limiter on one loop; the lock keeps it correct
        # should it ever be called from another thread.
        self._lock = threading.Lock()
        self.state_file = Path(state_file) if state_file is not None else None
        self._unsaved = False
        if self.state_file is not None:
            self._load()

    @classmethod
    def from_config(cls, config: AuthConfig) -> "UsageLimiter":
        return cls(config.rate_limit_rpm, config.quota_prompts_per_day, state_file=config.usage_file)

    def _utc_now(self) -> datetime:
        return datetime.fromtimestamp(self._wall_clock(), timezone.utc)

    def _load(self) -> None:
        try:
            raw = self.state_file.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(f"cannot read the usage file {self.state_file}: {exc}") from None
        try:
            state = json.loads(raw)
            if state.get("format") != USAGE_FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {USAGE_FORMAT}")
            day, counts = state["day"], state["prompts_today"]
            restored = {str(user): int(n) for user, n in counts.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"the usage file {self.state_file} is not one this server wrote ({exc}); "
                "move it away to start today's counts from zero"
            ) from None
        if day != self._utc_now().date().isoformat():
            return  # yesterday's counts: today starts at zero anyway
        now = self._clock()
        for user, n in restored.items():
            self._usage[user] = _Usage(tokens=float(self.rpm), refilled_at=now, day=day, prompts_today=n)

    def save(self) -> bool:
        """Write today's prompt counts to ``state_file`` if they changed; True if it wrote.

        Atomic: a crash leaves the previous file. Safe to call from a worker thread.
        """
        if self.state_file is None or not self._unsaved:
            return False
        with self._lock:
            today = self._utc_now().date().isoformat()
            counts = {u: usage.prompts_today for u, usage in self._usage.items() if usage.day == today}
            self._unsaved = False
        body = json.dumps({"format": USAGE_FORMAT, "day": today, "prompts_today": counts}, indent=1).encode()
        try:
            atomic_write(self.state_file, lambda tmp: tmp.write_bytes(body))
        except OSError:
            self._unsaved = True  # try again next time
            raise
        return True

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.prompts_per_day)

    def admit(self, user: str, prompts: int) -> None:
        """Count one request of ``prompts`` prompts for ``user``, or raise without counting anything.

        Raises:
            RateLimited: no request is left in the user's bucket.
            QuotaExhausted: the prompts would pass today's quota.
        """
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            usage = self._usage.get(user)
            if usage is None:
                usage = self._usage[user] = _Usage(tokens=float(self.rpm), refilled_at=now)
            if self.rpm:
                usage.tokens = min(float(self.rpm), usage.tokens + (now - usage.refilled_at) * self.rpm / 60.0)
                usage.refilled_at = now
                if usage.tokens < 1.0:
                    wait = (1.0 - usage.tokens) * 60.0 / self.rpm
                    raise RateLimited(
                        f"user {user!r} is over the limit of {self.rpm} requests per minute; retry in {wait:.1f} s",
                        wait,
                    )
            if self.prompts_per_day:
                wall = self._utc_now()
                today = wall.date().isoformat()
                if usage.day != today:
                    usage.day, usage.prompts_today = today, 0
                if usage.prompts_today + prompts > self.prompts_per_day:
                    midnight = datetime.combine(wall.date() + timedelta(days=1), datetime.min.time(), timezone.utc)
                    wait = (midnight - wall).total_seconds()
                    if prompts > self.prompts_per_day:
                        hint = f"one request may hold at most {self.prompts_per_day} prompts"
                    else:
                        hint = f"the quota resets at 00:00 UTC, in {_human(wait)}"
                    raise QuotaExhausted(
                        f"user {user!r} has used {usage.prompts_today} of {self.prompts_per_day} prompts today "
                        f"(UTC) and this request asks for {prompts}; {hint}",
                        wait,
                    )
                usage.prompts_today += prompts
                self._unsaved = True
            if self.rpm:
                usage.tokens -= 1.0


def _human(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"


# -- gRPC interceptor ----------------------------------------------------


def _metadata_values(metadata: Iterable | None, key: str) -> list[str]:
    return [value for k, value in (metadata or ()) if k == key]


async def _abort(context: grpc.aio.ServicerContext, exc: Flux2RemoteError) -> None:
    await context.abort(exc.code, str(exc), trailing_metadata=retry_metadata(exc))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every TextEncoder call, sets ``current_user`` for it, and applies the per-user limits.

    The user is set inside the handler's own execution (the behaviour
    functions are wrapped), because a ContextVar set in ``intercept_service``
    does not reach the task that runs the handler.

    Args:
        authenticator: key checking (open when it has no keys).
        limiter: per-user limits shared with the HTTP endpoint.
        max_prompts_per_request: requests above this are refused by validation
            anyway, so they are not charged to the daily quota.
    """

    def __init__(self, authenticator: Authenticator, limiter: UsageLimiter, *, max_prompts_per_request: int):
        self._authenticator = authenticator
        self._limiter = limiter
        self._max_prompts = max_prompts_per_request

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        values = _metadata_values(handler_call_details.invocation_metadata, "authorization")
        try:
            if len(values) > 1:
                raise Unauthenticated("malformed authorization: send exactly one 'authorization' header")
            user = self._authenticator.authenticate(values[0] if values else None)
        except Unauthenticated as exc:
            refuse = _refusing(exc, method)
            return _replace_behaviours(handler, lambda behaviour, kind: refuse)
        metered = method in METERED_METHODS and self._limiter.enabled
        return _replace_behaviours(handler, lambda behaviour, kind: self._as_user(behaviour, kind, user, metered))

    def _charge(self, request) -> int:
        prompts = len(getattr(request, "prompts", ()))
        return prompts if prompts <= self._max_prompts else 0

    def _as_user(self, behaviour, kind: str, user: str, metered: bool):
        limiter = self._limiter
        streaming_response = kind in ("unary_stream", "stream_stream")
        streaming_request = kind in ("stream_unary", "stream_stream")

        async def metered_requests(requests: AsyncIterator, stopped: list[QuotaExhausted]) -> AsyncIterator:
            async for request in requests:
                while True:
                    try:
                        limiter.admit(user, self._charge(request))
                        break
                    except RateLimited as exc:
                        # A stream over its rate waits instead of failing: this
                        # is backpressure on a bulk job, not an error.
                        await asyncio.sleep(exc.retry_after_s)
                    except QuotaExhausted as exc:
                        # Stop reading; what was admitted is still answered,
                        # then the call ends with this status (see finish()).
                        log.info("user %s stream stopped: %s", user, exc)
                        stopped.append(exc)
                        return
                yield request

        async def prepare(request, context, stopped: list[QuotaExhausted]):
            current_user.set(user)
            if not metered:
                return request
            if streaming_request:
                return metered_requests(request, stopped)
            try:
                limiter.admit(user, self._charge(request))
            except EncoderOverloaded as exc:
                log.info("user %s refused: %s", user, exc)
                await _abort(context, exc)
            return request

        async def finish(context, stopped: list[QuotaExhausted]) -> None:
            if stopped:
                await _abort(context, stopped[0])

        if streaming_response:

            async def wrapped(request, context):
                stopped: list[QuotaExhausted] = []
                result = behaviour(await prepare(request, context, stopped), context)
                if inspect.isasyncgen(result):
                    async for message in result:
                        yield message
                else:  # the handler writes with context.write()
                    await result
                await finish(context, stopped)

        else:

            async def wrapped(request, context):
                stopped: list[QuotaExhausted] = []
                response = await behaviour(await prepare(request, context, stopped), context)
                await finish(context, stopped)
                return response

        return wrapped


def _refusing(exc: Unauthenticated, method: str):
    async def refuse(request, context):
        log.warning("unauthenticated call to %s from %s: %s", method, context.peer(), exc)
        await _abort(context, exc)

    return refuse


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _replace_behaviours(handler, make: Callable):
    """``handler`` with its behaviour function replaced by ``make(behaviour, kind)``."""
    return handler._replace(
        **{kind: make(getattr(handler, kind), kind) for kind in _KINDS if getattr(handler, kind) is not None}
    )


class UserLogFilter(logging.Filter):
    """Adds ``%(user)s`` to every log record: the caller of the current request, ``-`` outside one."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.user = current_user.get("-")
        return True
