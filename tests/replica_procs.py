"""Encoder replicas as real processes, for tests that ``kill -9`` them and start them again.

    with ReplicaProcess(tmp_path, shared_cache=redis_server.url) as replica:
        replica.target              # 127.0.0.1:PORT (gRPC)
        replica.metric("flux2_encoder_prompts_computed_total")   # scraped from its --metrics-port
        replica.kill()              # SIGKILL: no drain, no goodbye, its counters are gone
        replica.start()             # a fresh process on the same ports

Each process is ``python -m encoder_server.cli serve --model demo`` (the tiny random
model, CPU), its output in ``tmp_path/replica-PORT.log``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import requests

from dit_client.demo import free_port, wait_until_serving

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


class ReplicaProcess:
    """``flux2-encoder serve --model demo`` in a subprocess on fixed ports that survive restarts."""

    def __init__(
        self,
        workdir: Path,
        *,
        shared_cache: str | None = None,
        extra_args: tuple[str, ...] = (),
        grace_s: float = 1.0,
    ):
        self.workdir = Path(workdir)
        self.grace_s = grace_s
        self.port = free_port()
        self.metrics_port = free_port()
        self.shared_cache = shared_cache
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._served = False  # once it has served, its ports are the test's: never picked again

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"replica-{self.port}.log"

    def spawn(self) -> ReplicaProcess:
        """Start the process; :meth:`wait` for it to serve (several replicas load their models in parallel)."""
        cmd = [
            sys.executable,
            "-m",
            "encoder_server.cli",
            "serve",
            "--model",
            "demo",
            "--device",
            "cpu",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--grace-period",
            f"{self.grace_s:g}",
            *(("--shared-cache", self.shared_cache) if self.shared_cache else ()),
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the child's whole life, not one block
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        return self

    def wait(self, timeout_s: float = 300.0) -> ReplicaProcess:
        try:
            wait_until_serving(self.target, self.proc, timeout_s)
        except BaseException as exc:
            log = self.log()
            self.close()  # a process that never served is not left behind
            raise RuntimeError(f"replica {self.target} did not start ({exc}); log:\n{log}") from None
        self._served = True
        return self

    def start(self) -> ReplicaProcess:
        """:meth:`spawn` and :meth:`wait`. Before the first serve only, ports that another process
        took meanwhile are picked again (``free_port`` can only say a port was free a moment ago)."""
        for attempt in range(3):
            try:
                return self.spawn().wait()
            except RuntimeError as exc:
                if self._served or attempt == 2 or "address is already in use" not in str(exc):
                    raise
                self.port, self.metrics_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def exit_code(self, timeout_s: float) -> int:
        """Wait for the process to exit by itself and return its code; fails, with the log, if it does not."""
        assert self.proc is not None, "never started"
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running {timeout_s:g} s later; log:\n{self.log()}") from None

    def kill(self) -> None:
        """``kill -9``, and wait until the process is gone (its ports are free again)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ReplicaProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str, **labels: str) -> float:
        """The sum of every series of ``name`` whose labels include ``labels``, scraped now."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if not match or match.group(1) != name:
                continue
            if all(f'{k}="{v}"' in (match.group(2) or "") for k, v in labels.items()):
                total += float(match.group(3))
        return total
