"""The Redis the tests start (tests/redis_server.py) and the one `make install` installs (Makefile)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests import redis_server as redis_module
from tests.redis_server import RedisServer, start_redis_server

ROOT = Path(__file__).resolve().parents[2]


def test_set_get_round_trip_on_its_own_loopback_port(redis_server):
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port != 6379  # never a system Redis
    client = redis.Redis.from_url(redis_server.url, socket_timeout=1)
    payload = os.urandom(1 << 20) + b"\x00end"
    assert client.set("k", payload)
    assert client.get("k") == payload
    # No persistence: nothing is written to disk, nothing survives a restart.
    config = client.config_get("save") | client.config_get("appendonly") | client.config_get("bind")
    assert config == {"save": "", "appendonly": "no", "bind": "127.0.0.1"}
    client.close()


def test_a_killed_server_makes_calls_fail_fast(redis_server):
    client = redis_server.client(timeout_s=1.0)
    client.set("k", b"v")
    redis_server.kill()
    assert not redis_server.running
    started = time.monotonic()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        client.get("k")
    assert time.monotonic() - started < 3.0


def test_a_hung_server_makes_calls_time_out(redis_server):
    client = redis_server.client(timeout_s=0.5)
    assert client.ping()
    with redis_server.paused():
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.get("k")
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3.0
    assert redis_server.client().ping()  # answers again once resumed


def test_restart_after_kill_9_is_the_same_url_and_empty(redis_server):
    url, pid = redis_server.url, redis_server.proc.pid
    client = redis_server.client()
    client.set("k", b"v")
    redis_server.restart()
    assert redis_server.url == url and redis_server.proc.pid != pid
    # The old connection is dead; the client reconnects to the new server on the same port.
    fresh = redis.Redis.from_url(url, socket_timeout=1)
    assert fresh.get("k") is None
    assert fresh.set("k2", b"v2") and fresh.get("k2") == b"v2"
    # Killed while nothing runs: restart() just starts it.
    redis_server.kill()
    redis_server.restart()
    assert fresh.ping()


def test_two_servers_do_not_share_a_port_or_data(tmp_path):
    with RedisServer(tmp_path / "a") as a, RedisServer(tmp_path / "b") as b:
        assert a.port != b.port
        a.client().set("k", b"a")
        assert b.client().get("k") is None


def test_a_missing_server_fails_naming_make_install_not_skips(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX2_TEST_REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(pytest.fail.Exception, match="make install"):
        start_redis_server(tmp_path)
    with pytest.raises(FileNotFoundError, match="make install"):
        RedisServer(tmp_path)
    assert "make install" in redis_module.MISSING


def test_a_server_that_cannot_start_says_why(tmp_path):
    with RedisServer(tmp_path / "a") as a:
        # Another server on a port that is taken (and stays taken): it fails with redis' own words.
        clash = RedisServer(tmp_path / "b", port=a.port, start_timeout_s=1.0)
        with pytest.raises(RuntimeError, match="did not start on redis://127.0.0.1"):
            clash.start()
        clash.stop()


# --- make install ---------------------------------------------------------------------------------


def _make(target: str, env: dict, user: str | None = None) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "-C", str(ROOT), target]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _path_without_redis(tmp_path: Path) -> str:
    """A PATH holding every command of this one except redis-server (links in a temporary folder)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = os.path.join(folder, name)
            if name != "redis-server" and not (bin_dir / name).exists() and os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    return str(bin_dir)


def test_make_install_depends_on_the_redis_server_target():
    makefile = (ROOT / "Makefile").read_text()
    install = next(line for line in makefile.splitlines() if line.startswith("install:"))
    assert "redis-server" in install.split(":", 1)[1].split()
    assert "apt-get install -y -q --no-install-recommends redis-server" in makefile
    assert "exit 101" in makefile  # policy-rc.d: the package's own service is never started


def test_make_redis_server_finds_the_one_on_path():
    if redis_module.redis_executable() is None:
        pytest.fail(redis_module.MISSING, pytrace=False)
    done = _make("redis-server", dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith("redis-server: /")


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"), reason="needs root to run make as another user"
)
def test_make_redis_server_without_root_says_how_and_does_not_fail():
    # Outside pytest's tmp_path, whose parents only root may enter.
    home = Path(tempfile.mkdtemp(prefix="flux2-make-"))
    try:
        home.chmod(0o755)
        env = {"PATH": _path_without_redis(home), "HOME": str(home)}
        done = _make("redis-server", env, user="65534")
    finally:
        shutil.rmtree(home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no redis-server on PATH" in done.stdout and "apt-get install" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
