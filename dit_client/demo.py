"""``make demo``: start the encoder on the random demo model, encode a few prompts, stop it.

Everything printed here says it plainly: the demo weights are random, so the
numbers prove the plumbing, not the quality.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.demo import DEMO_NOTICE, ensure_demo_model
from dit_client.remote import RemoteTextEncoder

PROMPTS = [
    "a red fox sitting in fresh snow, golden hour",
    "a poster that says \"FLUX.2\" in bold letters",
    "",
]


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


def main() -> int:
    print(f"flux2-remote demo — {DEMO_NOTICE}")
    t0 = time.perf_counter()
    folder = ensure_demo_model()
    print(f"demo model folder: {folder} ({time.perf_counter() - t0:.1f}s)")
    with demo_server() as target, RemoteTextEncoder(target) as enc:
        info = enc.info()
        print(f"encoder at {target}: model={info.model_id} fingerprint={info.fingerprint} "
              f"layers={list(info.hidden_states_layers)} ({info.computed_layers} of {info.num_hidden_layers} computed) "
              f"dtype={str(info.dtype).removeprefix('torch.')} demo={info.demo}")
        t1 = time.perf_counter()
        embeds, meta = enc.encode_with_metadata(PROMPTS)
        wall = time.perf_counter() - t1
        print(f"prompt_embeds: shape={list(embeds.shape)} dtype={str(embeds.dtype).removeprefix('torch.')} "
              f"in {wall * 1e3:.0f} ms")
        for prompt, m in zip(PROMPTS, meta):
            print(f"  {m.token_count:4d} tokens  inference {m.inference_time_ns / 1e6:7.1f} ms  "
                  f"total {m.total_time_ns / 1e6:7.1f} ms  {prompt!r}")
    print(f"done — remember: {DEMO_NOTICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
