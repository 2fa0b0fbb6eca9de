"""Client mistakes a new user makes with --encoder, TLS and --out: each one line, naming the fix, right exit code.

Servers here are loopback only: a stdlib HTTP/1.1 server (what the --http-port
speaks), and bare gRPC servers with and without TLS (no service needed: the
handshake fails or succeeds before any method is looked up).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from dit_client import cli
from dit_client.connection import DEFAULT_PORT, TargetError, TLSConfig, TLSUsageError, parse_target
from tests.certs import self_signed

ROOT = Path(__file__).resolve().parents[2]


# -- parse_target: the one place an --encoder value is read ---------------------


@pytest.mark.parametrize(
    "given,dialled",
    [
        ("gpu-box:50051", "gpu-box:50051"),
        ("gpu-box", f"gpu-box:{DEFAULT_PORT}"),  # gRPC alone would dial 443
        ("10.0.0.7", f"10.0.0.7:{DEFAULT_PORT}"),
        ("  gpu-box:7000 ", "gpu-box:7000"),
        ("[::1]:7000", "[::1]:7000"),
        ("[::1]", f"[::1]:{DEFAULT_PORT}"),
        ("::1", f"[::1]:{DEFAULT_PORT}"),
        # gRPC URI schemes pass through untouched (load balancing and unix sockets use them).
        ("dns:///gpu-box:50051", "dns:///gpu-box:50051"),
        ("ipv4:10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("unix:/run/flux2.sock", "unix:/run/flux2.sock"),
    ],
)
def test_targets_that_are_dialled(given, dialled):
    assert parse_target(given) == dialled


@pytest.mark.parametrize(
    "given,says",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("gpu-box:99999", "outside 1-65535"),
        ("gpu-box:0", "outside 1-65535"),
        ("gpu-box:http", "not a number"),
        ("gpu-box:", "not a number"),
        (":50051", "no host"),
        ("http://gpu-box:8080", "use gpu-box:8080"),
        ("https://gpu-box:8080/predict", "use gpu-box:8080"),
        ("grpc://gpu-box:50051", "use gpu-box:50051"),
        ("gpu-box:50051/predict", "not HOST:PORT"),
        ("[::1:50051", "closing ']'"),
        ("1:2:3:zz", "[ADDR]:PORT"),
    ],
)
def test_targets_that_are_refused(given, says):
    with pytest.raises(TargetError, match=says.replace("[", r"\[").replace("]", r"\]")):
        parse_target(given)


@pytest.mark.parametrize("cert,key", [("c.pem", None), (None, "k.pem")])
def test_tls_files_are_validated_in_pairs(cert, key):
    with pytest.raises(TLSUsageError, match="together"):
        TLSConfig(client_cert=cert, client_key=key)


# -- loopback servers -------------------------------------------------------------


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def http1_port():
    """An HTTP/1.1 server, like the encoder's --http-port."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def plaintext_grpc_port():
    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture()
def tls_grpc_port(cert_pair):
    cert_path, key_path = cert_pair
    server = grpc.server(futures.ThreadPoolExecutor(1))
    creds = grpc.ssl_server_credentials([(key_path.read_bytes(), cert_path.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield port
    server.stop(0)


@pytest.fixture()
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``flux2-dit`` in a fresh process, so what gRPC's C core writes to stderr is seen too."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run(
        [sys.executable, "-m", "dit_client.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("flux2-dit: ") and "Traceback" not in stderr
    return lines[0]


# -- the table of mistakes, through the command line ------------------------------


@pytest.mark.parametrize(
    "args,rc,says",
    [
        (["--encoder", ""], 2, "empty; give HOST:PORT of the gRPC port (default 50051)"),
        (["--encoder", "gpu-box:99999"], 2, "port 99999 is outside 1-65535"),
        (["--encoder", "http://gpu-box:50051"], 2, "use gpu-box:50051"),
        (["--encoder", "127.0.0.1:1", "--tls-cert", "c.pem"], 2, "--tls-cert was given without --tls-key"),
        (["--encoder", "127.0.0.1:1", "--tls-key", "k.pem"], 2, "--tls-key was given without --tls-cert"),
    ],
)
def test_usage_mistakes_exit_2_before_dialling(args, rc, says, capfd):
    assert cli.main(["info", "--timeout", "5", *args]) == rc
    err = capfd.readouterr().err  # file-descriptor level: gRPC core log lines would show here
    assert says in _one_line(err)


def test_the_http_port_is_named(http1_port, capfd):
    assert cli.main(["info", "--encoder", f"127.0.0.1:{http1_port}", "--timeout", "10"]) == 1
    line = _one_line(capfd.readouterr().err)
    assert "answers HTTP/1.1" in line and "--http-port" in line and f"default {DEFAULT_PORT}" in line


def test_nothing_listening_is_named(closed_port, capfd):
    assert cli.main(["info", "--encoder", f"127.0.0.1:{closed_port}", "--timeout", "10"]) == 1
    assert "nothing listens there" in _one_line(capfd.readouterr().err)


def test_tls_client_against_a_plaintext_server(plaintext_grpc_port):
    proc = _run_cli(["info", "--encoder", f"127.0.0.1:{plaintext_grpc_port}", "--tls", "--timeout", "10"])
    assert proc.returncode == 1
    assert "server looks like plaintext; drop --tls" in _one_line(proc.stderr)


def test_plaintext_client_against_a_tls_server(tls_grpc_port):
    proc = _run_cli(["info", "--encoder", f"127.0.0.1:{tls_grpc_port}", "--timeout", "10"])
    assert proc.returncode == 1
    assert "it may use TLS; if so connect with --tls" in _one_line(proc.stderr)


def test_tls_client_that_does_not_trust_the_certificate(tls_grpc_port):
    proc = _run_cli(["info", "--encoder", f"127.0.0.1:{tls_grpc_port}", "--tls", "--timeout", "10"])
    assert proc.returncode == 1
    assert "not trusted: pass --tls-ca" in _one_line(proc.stderr)


def test_tls_cert_without_key_is_a_usage_error_not_an_abort(cert_pair, tls_grpc_port):
    # Before the pair check, gRPC aborted the process (SIGABRT, rc 134) on a chain without a key.
    cert_path, _ = cert_pair
    proc = _run_cli(
        ["info", "--encoder", f"127.0.0.1:{tls_grpc_port}", "--tls-ca", str(cert_path), "--tls-cert", str(cert_path)]
    )
    assert proc.returncode == 2
    assert "--tls-cert was given without --tls-key" in _one_line(proc.stderr)


# -- output files: refused before the remote call -------------------------------


def test_encode_out_naming_a_folder_is_refused_before_the_encoder_is_called(tmp_path, closed_port, capfd):
    # The encoder address is dead: an error about it would mean the call came first.
    rc = cli.main(["encode", "--encoder", f"127.0.0.1:{closed_port}", "--prompt", "a red fox", "--out", str(tmp_path)])
    assert rc == 2
    assert "is a folder; name a file inside it" in _one_line(capfd.readouterr().err)


def test_encode_out_under_a_file_is_refused(tmp_path, closed_port, capfd):
    (tmp_path / "plain.txt").write_text("x")
    rc = cli.main(
        [
            "encode",
            "--encoder",
            f"127.0.0.1:{closed_port}",
            "--prompt",
            "a red fox",
            "--out",
            str(tmp_path / "plain.txt" / "e.safetensors"),
        ]
    )
    assert rc == 2
    assert "is a file, not a folder" in _one_line(capfd.readouterr().err)


def test_encode_out_in_an_unwritable_folder_is_refused(tmp_path, closed_port, capfd, monkeypatch):
    # Tests may run as root, who can write anywhere: the permission answer is what is faked here.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    rc = cli.main(
        [
            "encode",
            "--encoder",
            f"127.0.0.1:{closed_port}",
            "--prompt",
            "a red fox",
            "--out",
            str(tmp_path / "e.safetensors"),
        ]
    )
    assert rc == 2
    assert "cannot write to the folder" in _one_line(capfd.readouterr().err)


def test_generate_out_naming_a_folder_is_refused(tmp_path, closed_port, capfd):
    rc = cli.main(
        [
            "generate",
            "--encoder",
            f"127.0.0.1:{closed_port}",
            "--prompt",
            "a red fox",
            "--model",
            "demo",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "is a folder" in _one_line(capfd.readouterr().err)
