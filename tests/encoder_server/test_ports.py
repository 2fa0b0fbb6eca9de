"""Ports are bound before the model loads, never shared, and a clash names the port and its flag."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from common.config import HTTPConfig, ServerConfig
from encoder_server.ports import PortInUse, listen_socket
from tests.helpers import ServerThread


@pytest.fixture()
def taken_port():
    """A port held by another listener (as another server would hold it)."""
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def serve_cli(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    # A model folder that does not exist: reaching the model load would fail
    # with another message, so the port error proves it came first.
    cmd = [sys.executable, "-m", "encoder_server.cli", "serve", "--model", str(tmp_path / "no-model"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path.parent)


def test_a_second_server_on_a_used_grpc_port_exits_before_loading(tiny_backend, tmp_path):
    with ServerThread(tiny_backend) as first:
        port = first.running.port
        proc = serve_cli(tmp_path, "--port", str(port))
        assert proc.returncode == 2, proc.stderr
        assert f"cannot listen on 127.0.0.1:{port} (--port): the address is already in use" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert "no-model" not in proc.stderr  # the model was never looked at


@pytest.mark.parametrize("flag", ["--http-port", "--metrics-port"])
def test_a_used_http_or_metrics_port_is_named_before_loading(tmp_path, taken_port, flag):
    proc = serve_cli(tmp_path, "--port", "0", flag, str(taken_port))
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{taken_port} ({flag})" in proc.stderr
    assert "Traceback" not in proc.stderr and "no-model" not in proc.stderr


def test_grpc_does_not_share_a_port_with_reuseport(tiny_backend):
    """gRPC sets SO_REUSEPORT by default; a second in-process server must be refused too."""
    with ServerThread(tiny_backend) as first:
        config = ServerConfig(port=first.running.port)
        second = ServerThread(tiny_backend)
        second.config = config
        with pytest.raises(PortInUse, match="already in use"):
            second.__enter__()
        second.stop(0)


def test_listen_socket_errors_name_the_flag(taken_port):
    with pytest.raises(PortInUse, match=r"\(--http-port\).*choose another --http-port"):
        listen_socket("127.0.0.1", taken_port, "--http-port")
    with pytest.raises(PortInUse, match="unknown host"):
        listen_socket("no-such-host.invalid", 0, "--http-port")


def test_http_and_metrics_bind_to_their_own_hosts(tiny_backend):
    config = ServerConfig(http=HTTPConfig(port=0), metrics_port=0)
    with ServerThread(tiny_backend, config) as s:
        assert s.running.metrics_endpoint.host == "127.0.0.1"
        assert s.running.http.port > 0
