"""``make demo``: encoder in the background, one picture through the client, encoder stopped.

Runs on any machine after a plain clone: the demo model is a tiny random
FLUX.2 folder built locally (nothing is downloaded), the encoder serves it on
a free loopback port, and ``DiTClient`` makes ``demo.png`` on the CPU. Every
line printed says it plainly: the weights are random, so the picture is noise
that proves the plumbing, not the quality.

``--klein`` (``make demo-klein``) shows a studio's encoder box: ONE server with
two models, ``--model dev=demo --model klein=demo-klein``; the client reads
the tiny [klein] folder's pipeline class and picks the ``klein`` model by
itself, and the ``dev`` model answers on the same port.
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
from collections.abc import Sequence
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
KLEIN_OUT = Path("demo-klein.png")
# What `make demo-klein`'s one server serves: both tiny models, named as a studio would.
STUDIO_MODELS = ("dev=demo", "klein=demo-klein")


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
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            time.sleep(0.2)
    raise TimeoutError(f"encoder at {target} not serving after {timeout_s:.0f}s")


@contextlib.contextmanager
def demo_server(extra_args: Sequence[str] = (), models: tuple[str, ...] = ("demo",)):
    """Run ``flux2-encoder serve --model demo`` (one ``--model`` per entry of ``models``) on a free
    loopback port; yield its address."""
    port = free_port()
    model_args = [arg for model in models for arg in ("--model", model)]
    cmd = [
        sys.executable,
        "-m",
        "encoder_server.cli",
        "serve",
        *model_args,
        "--port",
        str(port),
        "--device",
        "cpu",
        *extra_args,
    ]
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
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write the picture (default {DEMO_OUT}, with --klein {KLEIN_OUT})",
    )
    parser.add_argument(
        "--klein",
        action="store_true",
        help="FLUX.2 [klein]: one server with both demo models (dev=demo, klein=demo-klein); "
        "the picture comes from the klein one",
    )
    args = parser.parse_args(argv)
    quiet_third_party_logs()
    if args.klein:
        return main_klein(args.out or KLEIN_OUT)
    args.out = args.out or DEMO_OUT

    print(f"flux2-remote demo: {DEMO_NOTICE}")
    t0 = time.perf_counter()
    folder = ensure_demo_model()
    print(f"demo model folder: {folder} ({time.perf_counter() - t0:.1f}s)")
    config = DiTConfig(model="demo", device="cpu", dtype="float32", quantization="none")
    with demo_server() as target, RemoteTextEncoder(target) as enc:
        info = enc.info()
        print(
            f"encoder at {target} (background process): fingerprint={info.fingerprint} "
            f"embeddings {info.max_sequence_length}x{info.embedding_dim} "
            f"{str(info.dtype).removeprefix('torch.')} demo={info.demo}"
        )
        with DiTClient(enc, config) as client:
            result = client.generate(PROMPT, height=DEMO_SIZE, width=DEMO_SIZE, steps=DEMO_STEPS, seed=DEMO_SEED)
        paths = result.save(args.out)
    print("encoder stopped")
    print(
        f"prompt: {PROMPT!r}  seed {result.seed}, {DEMO_STEPS} steps, {DEMO_SIZE}x{DEMO_SIZE}; "
        f"embedding {result.encode_s * 1e3:.0f} ms, denoise + decode {result.denoise_s:.1f} s"
    )
    print(f"picture: {paths[0].resolve()}")
    print(f"remember: {DEMO_NOTICE}. With a real model: flux2-dit generate --encoder HOST:PORT --prompt ...")
    return 0


def main_klein(out: Path) -> int:
    """``make demo-klein``: one encoder serving [dev] and [klein], a [klein] picture through the client."""
    print(f"flux2-remote demo ([klein], one server for two models): {DEMO_NOTICE}")
    t0 = time.perf_counter()
    for variant in ("dev", "klein"):
        folder = ensure_demo_model(variant=variant)
    print(f"demo model folders: {folder.parent} ({time.perf_counter() - t0:.1f}s)")
    config = DiTConfig(model="demo-klein", device="cpu", dtype="float32", quantization="none")
    with demo_server(models=STUDIO_MODELS) as target, RemoteTextEncoder(target) as enc:
        info = enc.info()
        print(
            f"encoder at {target} (background process, {' '.join('--model ' + m for m in STUDIO_MODELS)}) "
            f"serves {len(info.models)} models:"
        )
        for m in info.models:
            print(
                f"  {m.name:<6} {m.family:<12} {m.model_id:<11} fingerprint={m.fingerprint} "
                f"embeddings {m.max_sequence_length}x{m.embedding_dim} layers {','.join(map(str, m.hidden_states_layers))}"
                f" of {m.num_hidden_layers} demo={m.demo}"
            )
        with DiTClient(enc, config) as client:
            result = client.generate(PROMPT, height=DEMO_SIZE, width=DEMO_SIZE, steps=DEMO_STEPS, seed=DEMO_SEED)
        paths = result.save(out)
        # The [dev] model answers on the same port: the client names it per call.
        dev = enc.encode_with_metadata([PROMPT], model="dev")[1][0]
    print("encoder stopped")
    print(
        f"[klein] DiT ({result.parameters['pipeline']}) used server model {result.encoder_model!r}; "
        f"the same server's 'dev' model answered too (fingerprint {dev.model_fingerprint})"
    )
    print(
        f"prompt: {PROMPT!r}  seed {result.seed}, {DEMO_STEPS} steps, {DEMO_SIZE}x{DEMO_SIZE}; "
        f"embedding {result.encode_s * 1e3:.0f} ms, denoise + decode {result.denoise_s:.1f} s"
    )
    print(f"picture: {paths[0].resolve()}")
    print(
        f"remember: {DEMO_NOTICE}. With real models: flux2-encoder serve --model dev=black-forest-labs/FLUX.2-dev "
        "--model klein=black-forest-labs/FLUX.2-klein-4B, then flux2-dit generate --model "
        "black-forest-labs/FLUX.2-klein-4B --encoder HOST:PORT --prompt ..."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
