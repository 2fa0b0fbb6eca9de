"""Logging settings shared by the command-line entry points."""

from __future__ import annotations

import logging

# Third-party loggers whose messages say nothing actionable to our users.
# bitsandbytes, on import on a CPU with AVX512-BF16, warns that an optional
# kernel package ("kernels", fetched from the Hub) is missing. flux2-remote
# never runs bitsandbytes on the CPU (NF4 needs CUDA and is refused without it),
# so the warning only alarms people running `make demo`.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_third_party_logs() -> None:
    """Raise the threshold of :data:`QUIET_LOGGERS` to ERROR; errors still show."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
