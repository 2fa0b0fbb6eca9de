"""``make demo``: encoder in the background, one picture through the client, encoder stopped.

Runs on any machine after a plain clone: the demo model is a tiny random
FLUX.2 folder built locally (nothing is downloaded), the encoder serves it on
a free loopback port, and ``DiTClient`` makes ``demo.png`` on the CPU. Every
line printed says it plainly: the weights are random, so the picture is noise
that proves the plumbing, not the quality.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.demo import DEMO_NOTICE, ensure_demo_model
from common.logs import quiet_third_party_logs
from dit_client.generate import DiTClient, DiTConfig
from dit_client.remote import RemoteTextEncoder

PROMPT = "a red fox sitting in fresh snow, golden hour"
# Small and few steps: the whole demo takes seconds on two CPU cores.
DEMO_SIZE = 64
DEMO_STEPS = 4
DEMO_SEED = 42
DEMO_OUT = Path("demo.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(target: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    """Poll grpc.health.v1 until SERVING; raise if the server process dies first."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"encoder exited with code {proc.returncode} before serving")
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"encoder at {target} not serving after {timeout_s:.0f}s")


@contextlib.contextmanager
def demo_server(extra_args: list[str] = ()):
    """Run ``flux2-encoder serve --model demo`` on a free loopback port; yield its address."""
    port = free_port()
    cmd = [sys.executable, "-m", "encoder_server.cli", "serve", "--model", "demo", "--port", str(port),
           "--device", "cpu", *extra_args]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(target, proc)
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description="encoder + client on the random demo model")
    parser.add_argument("--out", type=Path, default=DEMO_OUT, help="where to write the picture (default demo.png)")
    args = parser.parse_args(argv)
    quiet_third_party_logs()

    print(f"flux2-remote demo: {DEMO_NOTICE}")
    t0 = time.perf_counter()
    folder = ensure_demo_model()
    print(f"demo model folder: {folder} ({time.perf_counter() - t0:.1f}s)")
    config = DiTConfig(model="demo", device="cpu", dtype="float32", quantization="none")
    with demo_server() as target, RemoteTextEncoder(target) as enc:
        info = enc.info()
        print(f"encoder at {target} (background process): fingerprint={info.fingerprint} "
              f"embeddings {info.max_sequence_length}x{info.embedding_dim} "
              f"{str(info.dtype).removeprefix('torch.')} demo={info.demo}")
        with DiTClient(enc, config) as client:
            result = client.generate(PROMPT, height=DEMO_SIZE, width=DEMO_SIZE, steps=DEMO_STEPS, seed=DEMO_SEED)
        paths = result.save(args.out)
    print("encoder stopped")
    print(f"prompt: {PROMPT!r}  seed {result.seed}, {DEMO_STEPS} steps, {DEMO_SIZE}x{DEMO_SIZE}; "
          f"embedding {result.encode_s * 1e3:.0f} ms, denoise + decode {result.denoise_s:.1f} s")
    print(f"picture: {paths[0].resolve()}")
    print(f"remember: {DEMO_NOTICE}. With a real model: flux2-dit generate --encoder HOST:PORT --prompt ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
