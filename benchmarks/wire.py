"""How fast one FLUX.2-dev embedding crosses the wire, against two baselines.

    .venv/bin/python benchmarks/wire.py [--repeats 30] [--server-torch-threads N]

One ``[512, 15360]`` bfloat16 tensor (15.7 MB, one FLUX.2-dev prompt) is
delivered over loopback, on the same machine in the same run, by:

1. **gRPC**: ``RemoteTextEncoder.encode`` against the real server
   (``encoder_server.server.start_server``) on a fake backend that returns the
   tensor instantly, so only the wire is measured: servicer, chunking into
   1 MiB messages, CRC-32C, HTTP/2, client reassembly into a preallocated
   tensor, CRC and fingerprint checks.
2. **memory copy**: copying the same bytes into a preallocated buffer (the floor).
3. **hosted-endpoint style**: a JSON POST ``{"prompt": ...}`` answered with
   ``torch.save`` bytes over HTTP/1.1, read with ``torch.load(weights_only=True)``,
   one connection per request, as diffusers' ``Flux2RemoteTextEncoderStep``
   and the dreambooth script call the hosted encoder.

The servers run in a second process (as on another machine; no shared GIL).
For reference it also times gRPC alone (the same 1 MiB chunks as raw bytes
through a bare ``grpc.aio`` server) and, in one process without network, the
CPU cost of each step of our path, to show where the time goes.

Effective GB/s = tensor bytes / wall time of one whole call (decimal GB).
Reported: best and median of ``--repeats`` calls after warm-up; on a shared
machine the best is the one to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.encoder_spec import FLUX2_DEV  # noqa: E402
from common.wire import TensorAssembler, WireTensor, decode_response_frame  # noqa: E402
from encoder_server.text_encoder import EncodedBatch  # noqa: E402

SEQ, HIDDEN = FLUX2_DEV.max_sequence_length, 5120  # FLUX.2-dev: [512, 3 * 5120]


class FixedTensorBackend:
    """An ``EmbeddingBackend`` that returns one fixed ``[512, 15360]`` tensor per prompt, instantly."""

    spec = FLUX2_DEV
    fingerprint = "bench-fixed-tensor"
    hidden_size = HIDDEN
    dtype = torch.bfloat16
    num_hidden_layers = 40
    quantization = "none"
    compute = "exact"
    device = torch.device("cpu")
    padding_side = "left"

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def encode(self, prompts: list[str]) -> EncodedBatch:
        n = len(prompts)
        return EncodedBatch(
            embeddings=self.tensor.unsqueeze(0).expand(n, -1, -1),
            token_counts=[SEQ] * n,
            truncated=[False] * n,
            tokenization_ns=0,
            inference_ns=0,
        )


class GrpcServerThread:
    """The real gRPC server on 127.0.0.1:0, on its own event loop in a daemon thread."""

    def __init__(self, backend, config):
        self.config = replace(config, host="127.0.0.1", port=0)
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        from encoder_server.server import start_server

        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(start_server(self.config, self.backend, model_id="bench"), self.loop)
        self.running = fut.result(60)
        return f"127.0.0.1:{self.running.port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class HostedStyleServer:
    """A stand-in for the hosted endpoint: JSON in, ``torch.save`` bytes out, over HTTP.

    This is the unsafe, pickle-based baseline being measured, run on our own
    tensor over loopback only; nothing here should be copied into real code.
    """

    def __init__(self, tensor: torch.Tensor):
        tensor_ = tensor

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                prompts = json.loads(body)["prompt"]
                prompts = [prompts] if isinstance(prompts, str) else prompts
                buf = io.BytesIO()
                torch.save(tensor_.unsqueeze(0).expand(len(prompts), -1, -1).contiguous(), buf)
                payload = buf.getbuffer()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        return self.httpd.server_address[1]

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def hosted_style_call(port: int, prompt: str) -> torch.Tensor:
    """One call as the hosted-endpoint clients make it: fresh connection, JSON POST, torch.load."""
    conn = HTTPConnection("127.0.0.1", port)
    try:
        conn.request(
            "POST",
            "/predict",
            body=json.dumps({"prompt": prompt}),
            headers={"Content-Type": "application/json", "Authorization": "Bearer bench"},
        )
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    # The unsafe deserialization this project replaces, on our own bytes.
    return torch.load(io.BytesIO(body), weights_only=True)


@dataclass
class Result:
    name: str
    times: list[float]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(name: str, fn, repeats: int, warmup: int = 2) -> Result:
    for _ in range(warmup):
        fn(-1)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return Result(name, times)


def serve_all(ports, ready, torch_threads: int) -> None:
    """Child process: the gRPC server, the hosted-style server and a raw-bytes gRPC server, until killed."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    from common.config import BatchingConfig, ServerConfig

    tensor = bench_tensor()
    backend = FixedTensorBackend(tensor)
    raw = RawGrpcServer([bytes(piece) for _, piece in WireTensor.from_tensor(tensor).spans()])
    defaults = ServerConfig()
    # The default has no batching window; for comparison, a server that lets a
    # lone prompt wait 5 ms for others to join its batch.
    no_window = replace(defaults, batching=replace(BatchingConfig(), max_queue_delay_ms=0))
    windowed = replace(defaults, batching=replace(BatchingConfig(), max_queue_delay_ms=5))
    with (
        GrpcServerThread(backend, windowed) as target,
        GrpcServerThread(backend, no_window) as target_no_window,
        HostedStyleServer(tensor) as http_port,
    ):
        ports.update(grpc=target, grpc_no_window=target_no_window, http=http_port, raw=raw.start())
        ready.set()
        threading.Event().wait()


def bench_tensor() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(SEQ, 3 * HIDDEN).to(torch.bfloat16)  # [512, 15360]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--server-torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads in the server process (0: torch's default)",
    )
    args = parser.parse_args(argv)

    from dit_client.remote import RemoteTextEncoder

    tensor = bench_tensor()
    nbytes = tensor.numel() * tensor.element_size()

    # The servers run in their own process, as they would on another machine:
    # client and server do not share a GIL.
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        ports, ready = manager.dict(), manager.Event()
        server = ctx.Process(target=serve_all, args=(ports, ready, args.server_torch_threads), daemon=True)
        server.start()
        try:
            if not ready.wait(120):
                raise SystemExit("the benchmark servers did not start")
            ports = dict(ports)
            results = run_all(tensor, ports, args.repeats, RemoteTextEncoder)
        finally:
            server.kill()
            server.join()

    print(
        f"# Wire: one [{SEQ}, {3 * HIDDEN}] bf16 tensor ({nbytes / 1e6:.1f} MB) over loopback; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, grpcio {grpc.__version__}; "
        f"servers in a second process (torch threads: {args.server_torch_threads or 'default'}); "
        f"{args.repeats} calls each after warm-up; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print(
        "| path | best ms | median ms | effective GB/s (best / median) "
        "| time vs gRPC Encode, no window (best / median) |"
    )
    print("|---|---:|---:|---:|---:|")
    grpc_result, hosted = results["grpc_no_window"], results["hosted"]
    for r in results.values():
        print(
            f"| {r.name} | {r.best * 1e3:.1f} | {r.median * 1e3:.1f} | "
            f"{nbytes / r.best / 1e9:.2f} / {nbytes / r.median / 1e9:.2f} | "
            f"{r.best / grpc_result.best:.2f}x / {r.median / grpc_result.median:.2f}x |"
        )
    gbps = nbytes / grpc_result.best / 1e9
    vs_hosted = hosted.best / grpc_result.best
    print()
    print(
        f"gRPC Encode, server defaults: goal >= 1.5 GB/s effective: {'met' if gbps >= 1.5 else 'MISSED'} "
        f"({gbps:.2f} GB/s best); goal >= 5x faster than hosted style: {'met' if vs_hosted >= 5 else 'MISSED'} "
        f"({vs_hosted:.2f}x best)."
    )
    print()
    print_breakdown(tensor, args.repeats)
    return 0


def run_all(tensor: torch.Tensor, ports: dict, repeats: int, client_cls) -> dict[str, Result]:
    results: dict[str, Result] = {}
    src = tensor.view(torch.int16).numpy()
    dst = np.empty_like(src)
    results["copy"] = measure("(a) memory copy into a preallocated buffer", lambda i: np.copyto(dst, src), repeats)

    for key, label in [
        ("grpc", "--max-queue-delay-ms 5 (a 5 ms batching window)"),
        ("grpc_no_window", "server defaults (--max-queue-delay-ms 0)"),
    ]:
        with client_cls(ports[key], timeout=60) as client:
            if not torch.equal(client.encode(["check"])[0], tensor):
                raise SystemExit("gRPC path returned different bytes")
            server_ns: list[int] = []

            def call(i: int, client=client, server_ns=server_ns) -> None:
                # A new prompt per call: no server-side cache or dedupe can skip the send path.
                _, meta = client.encode_with_metadata([f"prompt {i}"])
                if i >= 0:  # i < 0: warm-up
                    server_ns.append(meta[0].total_time_ns)

            results[key] = measure(
                f"gRPC Encode, {label}: RemoteTextEncoder.encode, 1 MiB chunks, CRC-32C", call, repeats
            )
            # total_time_ns: request received -> embedding ready, before the first byte is sent.
            results[key + "_wire"] = Result(
                f"  of which after the server had the embedding (wall - server-reported total_time_ns), {label}",
                [t - ns / 1e9 for t, ns in zip(results[key].times, server_ns, strict=True)],
            )

    if not torch.equal(hosted_style_call(ports["http"], "check")[0], tensor):
        raise SystemExit("hosted-style path returned different bytes")
    results["hosted"] = measure(
        "(b) hosted style: JSON POST, torch.save body, torch.load(weights_only=True)",
        lambda i: hosted_style_call(ports["http"], f"prompt {i}"),
        repeats,
    )

    channel = grpc.insecure_channel(f"127.0.0.1:{ports['raw']}", options=RAW_OPTIONS)
    stream = channel.unary_stream(RAW_METHOD)
    results["raw"] = measure(
        "for reference: gRPC transport alone (same 1 MiB chunks as raw bytes, no protobuf, no CRC)",
        lambda i: sum(len(c) for c in stream(b"")),
        repeats,
    )
    channel.close()
    return results


RAW_METHOD = "/bench.Raw/Stream"
RAW_OPTIONS = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]


class RawGrpcServer:
    """gRPC with nothing of ours: pre-cut bytes chunks streamed with identity (de)serializers."""

    def __init__(self, chunks: tuple[bytes, ...]):
        self.chunks = chunks

    def start(self) -> int:
        started = threading.Event()
        box = {}

        async def run():
            async def stream(request, context):
                for c in self.chunks:
                    yield c

            handler = grpc.method_handlers_generic_handler(
                "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
            )
            server = grpc.aio.server(options=RAW_OPTIONS)
            server.add_generic_rpc_handlers((handler,))
            box["port"] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            started.set()
            await server.wait_for_termination()

        threading.Thread(target=lambda: asyncio.run(run()), daemon=True).start()
        started.wait(60)
        return box["port"]


def print_breakdown(tensor: torch.Tensor, repeats: int) -> None:
    """CPU cost of each step of the gRPC path, one process, no network (best of ``repeats``)."""
    from common.protocol import pb2

    def best(fn) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts) * 1e3

    wire = WireTensor.from_tensor(tensor)
    frames = list(wire.frames(request_id="", prompt_index=0, metadata=pb2.PromptMetadata()))
    out = torch.empty_like(tensor)

    def protobuf_messages():  # what protobuf-python alone would do: build + serialize (copies each chunk 3x)
        msgs = []
        for off, piece in wire.spans():
            m = pb2.EncodeResponse(prompt_index=0)
            m.chunk.offset, m.chunk.data = off, bytes(piece)
            msgs.append(m.SerializeToString())
        return msgs

    def assemble():  # the client: split each frame, copy into the tensor, CRC-32C
        a = None
        for raw in frames:
            msg, offset, data = decode_response_frame(raw)
            a = a or TensorAssembler(out, msg.header)
            a.add_bytes(offset, data)
        a.finish()

    def hosted_codec():
        buf = io.BytesIO()
        torch.save(tensor.unsqueeze(0), buf)
        return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    steps = [
        (
            "server",
            "`WireTensor.from_tensor`: view of the tensor's bytes + CRC-32C",
            lambda: WireTensor.from_tensor(tensor),
        ),
        (
            "server",
            "frame the 1 MiB chunks as serialized `EncodeResponse` messages (one copy)",
            lambda: list(wire.frames(request_id="", prompt_index=0, metadata=None)),
        ),
        ("server", "for comparison: the same with protobuf messages (build + serialize)", protobuf_messages),
        ("client", "split frames, copy into the preallocated tensor, CRC-32C", assemble),
        ("(b)", "hosted style, serialization alone: `torch.save` + `torch.load(weights_only=True)`", hosted_codec),
    ]
    print("CPU cost per 15.7 MB embedding, one process, no network (best of the runs):")
    print()
    print("| side | step | ms |")
    print("|---|---|---:|")
    for side, name, fn in steps:
        print(f"| {side} | {name} | {best(fn):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
