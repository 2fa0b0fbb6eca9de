"""The one table from errors to gRPC status codes and HTTP statuses, used by both sides.

The server raises these exceptions from library code; each class names its gRPC
status (``code``), and :func:`http_status_of` maps that status to HTTP for the
``/predict`` endpoint. The client turns a status back into the same exception
class through :func:`error_from_code`, so callers catch ``EncoderOverloaded``
rather than inspecting ``grpc.RpcError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import grpc

# Trailing metadata (gRPC) and EncodeError field (streams) saying when to come back.
RETRY_AFTER_METADATA = "retry-after-ms"


class Flux2RemoteError(Exception):
    """Base class of every error flux2-remote raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(Flux2RemoteError):
    """The request breaks a documented rule (too many prompts, prompt too long, bad dtype...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLarge(InvalidRequest):
    """Too many prompts, a prompt or a body too long: INVALID_ARGUMENT on gRPC, 413 on HTTP."""

    http_status = 413


class NotCached(Flux2RemoteError):
    """``cache_only`` was set and an embedding is not in the cache."""

    code = grpc.StatusCode.NOT_FOUND


class EncoderOverloaded(Flux2RemoteError):
    """The server's queue or a per-user quota is full; retry later.

    Attributes:
        retry_after_s: when the server expects room (seconds from now), if it said; the
            queue's estimate, the next free request of a rate limit, or the next UTC
            midnight for a daily quota.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(Flux2RemoteError):
    """Missing or wrong API key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(Flux2RemoteError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(Flux2RemoteError):
    """The deadline ran out, or was too short to start the work."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class EncoderUnavailable(Flux2RemoteError):
    """The server is unreachable, starting or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(Flux2RemoteError):
    code = grpc.StatusCode.CANCELLED


class UpsamplingUnavailable(Flux2RemoteError):
    """The model cannot upsample prompts: the server runs without ``--upsampling``, the model
    is one diffusers has no upsampling for ([klein]), or it has no image processor for images."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class IntegrityError(Flux2RemoteError):
    """Bytes arrived damaged or inconsistent (checksum, size, shape or fingerprint mismatch)."""

    code = grpc.StatusCode.DATA_LOSS


class ServerError(Flux2RemoteError):
    """A bug or an unexpected failure on the server."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[Flux2RemoteError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        NotCached,
        EncoderOverloaded,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        EncoderUnavailable,
        Cancelled,
        UpsamplingUnavailable,
        IntegrityError,
        ServerError,
    )
}


# The standard gRPC -> HTTP mapping (google.rpc.Code); 499 is the de-facto
# "client closed request".
_HTTP_STATUS_OF_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_of(exc: BaseException) -> int:
    """The HTTP status the ``/predict`` endpoint answers ``exc`` with."""
    explicit = getattr(exc, "http_status", None)
    if explicit is not None:
        return explicit
    return _HTTP_STATUS_OF_CODE.get(status_of(exc)[0], 500)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a server sends for ``exc``."""
    if isinstance(exc, Flux2RemoteError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def retry_after_ms(exc: BaseException) -> int | None:
    """The retry hint of ``exc`` in whole milliseconds (at least 1), or ``None`` when it has none."""
    retry_after_s = getattr(exc, "retry_after_s", None)
    return None if retry_after_s is None else max(1, math.ceil(retry_after_s * 1000))


def retry_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling a gRPC caller when to retry, for errors that know it."""
    ms = retry_after_ms(exc)
    return () if ms is None else ((RETRY_AFTER_METADATA, str(ms)),)


def retry_after_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | Iterable[Any] | None) -> float | None:
    """Seconds from the server's ``retry-after-ms`` trailing metadata, or ``None``."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_METADATA:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


def error_from_code(
    code: grpc.StatusCode | int, message: str, *, retry_after_s: float | None = None
) -> Flux2RemoteError:
    """The exception a client raises for a status ``code`` (a StatusCode or its integer value).

    ``retry_after_s`` is the server's hint; it is kept on ``EncoderOverloaded``.
    """
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code, ServerError)
    if issubclass(cls, EncoderOverloaded):
        return cls(message, retry_after_s=retry_after_s)
    return cls(message)
