"""The one table from errors to gRPC status codes, used by both sides.

The server raises these exceptions from library code; the servicer turns them
into statuses through ``STATUS_OF``. The client turns a status back into the
same exception class through ``error_from_status``, so callers catch
``EncoderOverloaded`` rather than inspecting ``grpc.RpcError``.
"""

from __future__ import annotations

import grpc


class Flux2RemoteError(Exception):
    """Base class of every error flux2-remote raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(Flux2RemoteError):
    """The request breaks a documented rule (too many prompts, prompt too long, bad dtype...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotCached(Flux2RemoteError):
    """``cache_only`` was set and an embedding is not in the cache."""

    code = grpc.StatusCode.NOT_FOUND


class EncoderOverloaded(Flux2RemoteError):
    """The server's queue or a per-user quota is full; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


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
        IntegrityError,
        ServerError,
    )
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a server sends for ``exc``."""
    if isinstance(exc, Flux2RemoteError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def error_from_code(code: grpc.StatusCode | int, message: str) -> Flux2RemoteError:
    """The exception a client raises for a status ``code`` (a StatusCode or its integer value)."""
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code, ServerError)
    return cls(message)
