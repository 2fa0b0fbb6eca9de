"""Per-user limits: a request rate (token bucket) and a daily prompt quota, kept across restarts.

Both are steps of the request policy (encoder_server/admission.py), which calls
:meth:`UsageLimiter.take_request` for the rate (step 3) and
:meth:`UsageLimiter.reserve` for the quota (step 6). A reservation counts at
once, so concurrent requests can never pass the quota together; it is given
back with :meth:`Reservation.refund` when the request is not served, so a
refused or failed request costs the user nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common.atomic import atomic_write
from common.config import AuthConfig
from common.errors import EncoderOverloaded
from encoder_server.text_encoder import ConfigError

log = logging.getLogger(__name__)

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
    def from_config(cls, config: AuthConfig) -> UsageLimiter:
        return cls(config.rate_limit_rpm, config.quota_prompts_per_day, state_file=config.usage_file)

    def _utc_now(self) -> datetime:
        return datetime.fromtimestamp(self._wall_clock(), UTC)

    def _load(self) -> None:
        assert self.state_file is not None  # only called when there is one
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

    def _usage_of(self, user: str, now: float) -> _Usage:
        usage = self._usage.get(user)
        if usage is None:
            usage = self._usage[user] = _Usage(tokens=float(self.rpm), refilled_at=now)
        return usage

    def take_request(self, user: str) -> None:
        """Spend one request of ``user``'s per-minute rate; raise :class:`RateLimited` when none is left.

        Every request that reaches this step counts, whatever happens to it
        later: the rate bounds what a user may make the server look at.
        """
        if not self.rpm:
            return
        with self._lock:
            now = self._clock()
            usage = self._usage_of(user, now)
            usage.tokens = min(float(self.rpm), usage.tokens + (now - usage.refilled_at) * self.rpm / 60.0)
            usage.refilled_at = now
            if usage.tokens < 1.0:
                raise self.rate_limited(user, (1.0 - usage.tokens) * 60.0 / self.rpm)
            usage.tokens -= 1.0

    def rate_limited(self, user: str, wait_s: float) -> RateLimited:
        """The refusal for ``user`` over the rate, ``wait_s`` seconds before a request is free."""
        return RateLimited(
            f"user {user!r} is over the limit of {self.rpm} requests per minute; retry in {wait_s:.1f} s", wait_s
        )

    def today(self) -> str:
        """Today's UTC date, ``YYYY-MM-DD``: the day quotas count for."""
        return self._utc_now().date().isoformat()

    def quota_exhausted(self, user: str, used: int, asked: int) -> QuotaExhausted:
        """The refusal for ``user``, who has used ``used`` prompts today, asking for ``asked`` more."""
        wall = self._utc_now()
        midnight = datetime.combine(wall.date() + timedelta(days=1), datetime.min.time(), UTC)
        wait = (midnight - wall).total_seconds()
        if asked > self.prompts_per_day:
            hint = f"one request may hold at most {self.prompts_per_day} prompts"
        else:
            hint = f"the quota resets at 00:00 UTC, in {_human(wait)}"
        return QuotaExhausted(
            f"user {user!r} has used {used} of {self.prompts_per_day} prompts today "
            f"(UTC) and this request asks for {asked}; {hint}",
            wait,
        )

    def reserve(self, user: str, prompts: int) -> Reservation:
        """Count ``prompts`` against ``user``'s quota for today; raise :class:`QuotaExhausted` without counting.

        The returned reservation stays counted unless :meth:`Reservation.refund` gives it back.
        """
        if not self.prompts_per_day:
            return Reservation(self, user, "", 0)
        with self._lock:
            usage = self._usage_of(user, self._clock())
            today = self.today()
            if usage.day != today:
                usage.day, usage.prompts_today = today, 0
            if usage.prompts_today + prompts > self.prompts_per_day:
                raise self.quota_exhausted(user, usage.prompts_today, prompts)
            usage.prompts_today += prompts
            self._unsaved = True
            return Reservation(self, user, today, prompts)

    def _refund(self, reservation: Reservation) -> None:
        with self._lock:
            usage = self._usage.get(reservation.user)
            # Yesterday's reservation: today's count never held it.
            if usage is not None and usage.day == reservation.day:
                usage.prompts_today = max(0, usage.prompts_today - reservation.prompts)
                self._unsaved = True

    def used_today(self, user: str) -> int:
        """Prompts counted for ``user`` today (UTC)."""
        with self._lock:
            usage = self._usage.get(user)
            today = self._utc_now().date().isoformat()
            return usage.prompts_today if usage is not None and usage.day == today else 0


@dataclass
class Reservation:
    """Prompts counted against a user's daily quota by :meth:`UsageLimiter.reserve`."""

    limiter: UsageLimiter
    user: str
    day: str
    prompts: int

    def refund(self) -> None:
        """Give the prompts back (the request was not served); a second call does nothing."""
        if self.prompts:
            self.limiter._refund(self)
            self.prompts = 0


def _human(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m"
