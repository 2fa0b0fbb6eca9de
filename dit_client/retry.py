"""The one retry policy of the client: backoff with jitter, honouring the server's retry hint.

Used by unary calls (:func:`call_with_retries`, e.g. ``DiTClient``'s
interactive encode) and by the stream machinery in :mod:`dit_client.stream`,
which needs the same waits but schedules them itself.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from common.errors import EncoderOverloaded, EncoderUnavailable, Flux2RemoteError

log = logging.getLogger(__name__)

# Failures that a later try can cure: a busy server, or one that is (re)starting or unreachable for a moment.
RETRYABLE: tuple[type[Flux2RemoteError], ...] = (EncoderUnavailable, EncoderOverloaded)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``, stalls) are retried.

    Attributes:
        max_attempts: tries per request (and consecutive stream reopenings
            without progress) before the error is raised; 1 disables retries.
        initial_backoff_s: wait before the first retry, in seconds.
        max_backoff_s: cap on any single wait, in seconds.
        multiplier: growth of the wait per attempt.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based); jittered so clients do not retry in lockstep."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)

    def wait_before_retry(self, attempt: int, exc: Flux2RemoteError) -> float:
        """Seconds to wait before retry number ``attempt`` after ``exc``, honouring the server's hint.

        Raises ``exc`` (with the hint in its message) at once when the server asks
        for a longer wait than ``max_backoff_s``, e.g. a daily quota used up: a
        few quick retries could not succeed, and a job should say so now.
        """
        hint = getattr(exc, "retry_after_s", None)
        if hint is not None and hint > self.max_backoff_s:
            same_kind: Any = type(exc)  # every error that carries a hint takes retry_after_s
            raise same_kind(
                f"{exc} (the server asks to retry in {human_seconds(hint)}, longer than this client waits: "
                f"RetryPolicy.max_backoff_s={self.max_backoff_s:g})",
                retry_after_s=hint,
            ) from None
        return max(self.backoff(attempt), hint or 0.0)


def human_seconds(seconds: float) -> str:
    """``42 s``, ``15 min`` or ``3.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def call_with_retries(
    fn: Callable[[], T], policy: RetryPolicy, *, what: str = "encoder", sleep: Callable[[float], None] = time.sleep
) -> T:
    """``fn()``, tried up to ``policy.max_attempts`` times while it raises one of :data:`RETRYABLE`.

    Each retry waits :meth:`RetryPolicy.wait_before_retry` (logged as a warning);
    the last failure, or a server hint longer than the policy waits, is raised.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except RETRYABLE as exc:
            attempt += 1
            if attempt >= policy.max_attempts:
                raise
            wait = policy.wait_before_retry(attempt, exc)
            log.warning(
                "%s: %s; retrying in %.1f s (attempt %d of %d)", what, exc, wait, attempt + 1, policy.max_attempts
            )
            sleep(wait)
