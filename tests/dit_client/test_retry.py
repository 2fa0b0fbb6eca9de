"""``dit_client.retry``: the one retry policy, used by unary calls and streams alike."""

from __future__ import annotations

import pytest

from common.errors import EncoderOverloaded, EncoderUnavailable, Unauthenticated
from dit_client.retry import RetryPolicy, call_with_retries, human_seconds


class Flaky:
    """Fails with the given exceptions in turn, then answers "ok"."""

    def __init__(self, *failures):
        self.failures = list(failures)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def test_transient_failures_are_retried_with_waits_that_honour_the_hint():
    waits = []
    fn = Flaky(EncoderUnavailable("restarting"), EncoderOverloaded("busy", retry_after_s=2.5))
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=10)
    assert call_with_retries(fn, policy, sleep=waits.append) == "ok"
    assert fn.calls == 3
    assert 0.05 <= waits[0] <= 0.1  # jittered backoff
    assert waits[1] >= 2.5  # never sooner than the server asked


def test_gives_up_after_max_attempts_with_the_last_error():
    fn = Flaky(*[EncoderUnavailable(f"down {i}") for i in range(5)])
    with pytest.raises(EncoderUnavailable, match="down 2"):
        call_with_retries(fn, RetryPolicy(max_attempts=3, initial_backoff_s=0.01), sleep=lambda s: None)
    assert fn.calls == 3


def test_other_errors_are_not_retried():
    fn = Flaky(Unauthenticated("API key not recognised"))
    with pytest.raises(Unauthenticated):
        call_with_retries(fn, RetryPolicy(), sleep=lambda s: pytest.fail("slept"))
    assert fn.calls == 1


def test_a_hint_longer_than_the_policy_waits_fails_at_once():
    fn = Flaky(EncoderOverloaded("daily quota used up", retry_after_s=3 * 3600))
    with pytest.raises(EncoderOverloaded, match="retry in 3.0 h, longer than this client waits") as err:
        call_with_retries(fn, RetryPolicy(max_backoff_s=30), sleep=lambda s: pytest.fail("slept"))
    assert err.value.retry_after_s == 3 * 3600 and fn.calls == 1


@pytest.mark.parametrize("seconds,text", [(42, "42 s"), (900, "15 min"), (12600, "3.5 h")])
def test_human_seconds(seconds, text):
    assert human_seconds(seconds) == text


def test_at_least_one_attempt():
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(max_attempts=0)
