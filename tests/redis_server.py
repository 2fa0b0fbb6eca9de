"""A real Redis-compatible server for the tests: its own process on a free loopback port.

``make install`` installs Debian's ``redis-server`` package when none is on PATH
(Makefile, target ``redis-server``). The tests never use a system Redis: each
fixture starts ``redis-server`` in a temporary folder, on a port of its own,
with no persistence, and kills it at the end.

    def test_something(redis_server):
        client = redis_server.client()          # redis.Redis with short timeouts
        url = redis_server.url                  # redis://127.0.0.1:PORT/0, for --shared-cache
        redis_server.kill()                     # kill -9: the server is gone, clients fail fast
        redis_server.restart()                  # kill -9 (if running) and start again on the same port, empty
        with redis_server.paused():             # SIGSTOP: a server that accepts nothing and answers nothing
            ...

A missing ``redis-server`` fails the test with a message naming ``make install``;
it is never skipped, so a machine without it cannot pass the Redis-backed tests
by accident. ``FLUX2_TEST_REDIS_SERVER`` names another executable (say
``valkey-server``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ENV_EXECUTABLE = "FLUX2_TEST_REDIS_SERVER"
MISSING = (
    "redis-server is not on PATH: run `make install` (as root it installs Debian's redis-server package; "
    "otherwise `sudo apt-get install --no-install-recommends redis-server`), or set "
    f"{ENV_EXECUTABLE} to a Redis or Valkey 7+ server"
)


def redis_executable() -> str | None:
    """The server executable the tests start: ``$FLUX2_TEST_REDIS_SERVER``, else ``redis-server`` on PATH."""
    named = os.environ.get(ENV_EXECUTABLE)
    if named:
        return shutil.which(named)
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1 on ``port``, without persistence.

    ``start()`` waits until it answers PING; ``kill()`` sends SIGKILL and waits for
    the process; ``restart()`` starts a new, empty one on the same port.
    """

    def __init__(
        self, workdir: Path, *, executable: str | None = None, port: int | None = None, start_timeout_s: float = 10.0
    ):
        executable = executable or redis_executable()
        if executable is None:
            raise FileNotFoundError(MISSING)
        self.executable = executable
        self.workdir = Path(workdir)
        self.port = port or _free_port()
        # A port we chose ourselves may be taken by someone else before the first start: then take
        # another. Once started (or when the caller named it), the port stays: restart() keeps the URL.
        self._port_is_fixed = port is not None
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def command(self) -> list[str]:
        return [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]

    def start(self) -> RedisServer:
        """Start it on ``self.port`` and wait until it answers PING (a port taken by now is retried briefly)."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self._spawn()
            failure = self._wait_for_ping(deadline)
            if failure is None:
                self._port_is_fixed = True
                return self
            if "Address already in use" in failure and time.monotonic() < deadline:
                if not self._port_is_fixed:
                    self.port = _free_port()
                time.sleep(0.1)  # else: our own port, a moment after the last server on it died
                continue
            raise RuntimeError(f"{self.executable} did not start on {self.url}: {failure}")

    def _spawn(self) -> None:
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the child's whole life, not one block
        self.proc = subprocess.Popen(
            self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _wait_for_ping(self, deadline: float) -> str | None:
        """None once the server answers PING; else why it did not (its exit and log, or a timeout)."""
        import redis

        client = self.client(timeout_s=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    return f"exited with code {self.proc.returncode}: {self.log_tail()}"
                try:
                    # Our process, not another server that holds the port (ours then exits at once).
                    if client.ping() and client.info("server")["process_id"] == self.proc.pid:
                        return None
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    return f"no answer to PING within {self.start_timeout_s:.0f} s: {self.log_tail()}"
                time.sleep(0.02)
        finally:
            client.close()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9`` the server and wait for the process to be gone (a paused one too)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> RedisServer:
        """Kill it (SIGKILL) if it runs and start a new one on the same port: same URL, no data."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    @contextlib.contextmanager
    def paused(self):
        """SIGSTOP the server for the block: connections open, nothing answered (a hung or overloaded Redis)."""
        assert self.running, "the server is not running"
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield self
        finally:
            if self.running:
                self.proc.send_signal(signal.SIGCONT)

    def client(self, *, timeout_s: float = 1.0, **kwargs):
        """A ``redis.Redis`` on this server whose calls fail after ``timeout_s`` (connect and read), once.

        Without ``retry=``, redis-py 6+ retries a timed-out or refused call 3 times with
        exponential backoff (about 10 s in all for a 0.5 s timeout); this client does not,
        unless the caller passes its own ``retry``.
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        kwargs.setdefault("socket_timeout", timeout_s)
        kwargs.setdefault("socket_connect_timeout", timeout_s)
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host=self.host, port=self.port, db=0, **kwargs)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_redis_server(workdir: Path | None = None, **kwargs) -> RedisServer:
    """Start one, or fail the calling test with a message naming ``make install`` when there is no server."""
    if redis_executable() is None:
        pytest.fail(MISSING, pytrace=False)
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="flux2-redis-"))
    return RedisServer(workdir, **kwargs).start()


@pytest.fixture()
def redis_server(tmp_path_factory):
    """A fresh, empty ``redis-server`` on its own loopback port for one test; killed at the end."""
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
