"""How fast one FLUX.2-dev embedding crosses the wire, against two baselines.

    .venv/bin/python benchmarks/wire.py [--repeats 30] [--server-torch-threads N]
    .venv/bin/python benchmarks/wire.py --elision [--repeats 30] [--dry-run]

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

``--elision``: the pad-free wire instead. A prompt fills only its last ``n``
of the 512 rows; a client holding the model's pad table receives those ``n``
rows and puts the pad rows back. Over a realistic prompt set
(``benchmarks/realistic_prompts.py``, rows counted with the Tekken tokenizer when
``mistral-common`` is importable) it reports the bytes per prompt, full versus
compact, at the median and p90 prompt: computed from the row counts, then
measured through ``RemoteTextEncoder`` against the real server (whose backend
returns left-padded embeddings of those row counts instantly, and which checks
every row it leaves out against its table), with every rebuilt embedding
compared to the full answer. Then the one-prompt ``Encode`` wall time, full
versus elided, at the median and p90 prompt. ``--dry-run``: a narrow tensor and
2 repeats, to check the script, not the figures.
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

import grpc
import numpy as np
import torch

from common.encoder_spec import FLUX2_DEV
from common.wire import TensorAssembler, WireTensor, decode_response_frame
from encoder_server.text_encoder import EncodedBatch

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


class PaddedTensorBackend(FixedTensorBackend):
    """Left-padded embeddings, as FLUX.2-dev makes them, instantly: pad rows from one table, then the prompt's rows.

    A prompt ``"ROWS:anything"`` fills its last ``ROWS`` rows; the rows before are
    the table's, position by position, as a left pad row is for every prompt.
    """

    fingerprint = "bench-padded-tensor"
    pad_rows_shared = True

    def __init__(self, table: torch.Tensor, real: torch.Tensor, min_rows: int):
        self.table = table[: SEQ - min_rows].clone()  # [P, D]: P = the pad rows of the shortest prompt
        self.real = real  # [512, D]
        self.hidden_size = real.shape[1] // 3
        self._by_rows: dict[int, torch.Tensor] = {}

    def pad_rows(self) -> torch.Tensor:
        return self.table.clone()

    def embedding(self, rows: int) -> torch.Tensor:
        """The ``[512, D]`` embedding of a prompt that fills ``rows`` rows."""
        if rows not in self._by_rows:
            self._by_rows[rows] = torch.cat([self.table[: SEQ - rows], self.real[SEQ - rows :]])
        return self._by_rows[rows]

    def encode(self, prompts: list[str]) -> EncodedBatch:
        rows = [int(p.split(":", 1)[0]) for p in prompts]
        return EncodedBatch(
            embeddings=torch.stack([self.embedding(n) for n in rows]),
            token_counts=rows,
            truncated=[n >= SEQ for n in rows],
            tokenization_ns=0,
            inference_ns=0,
        )


class GrpcServerThread:
    """The real gRPC server on 127.0.0.1:0, on its own event loop in a daemon thread.

    ``pad_table``: serve ``backend`` with its pad table (``backend.pad_rows()``), as ``serve`` does.
    """

    def __init__(self, backend, config, *, pad_table: bool = False):
        self.config = replace(config, host="127.0.0.1", port=0)
        self.backend = backend
        self.pad_table = pad_table
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        from encoder_server.models import served_pad_table
        from encoder_server.server import LoadedModel, start_server

        self.thread.start()
        models = None
        if self.pad_table:
            name = self.config.served_models()[0].name
            models = [LoadedModel(name, self.backend, "bench", pad_table=served_pad_table(self.backend))]
        fut = asyncio.run_coroutine_threadsafe(
            start_server(self.config, self.backend, models=models, model_id="bench"), self.loop
        )
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


def bench_tensor(width: int = 3 * HIDDEN, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(SEQ, width).to(torch.bfloat16)  # [512, 15360]


def serve_padded(ports, ready, torch_threads: int, width: int, min_rows: int) -> None:
    """Child process: the gRPC server on :class:`PaddedTensorBackend`, with its pad table, until killed."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    from common.config import ServerConfig

    backend = PaddedTensorBackend(bench_tensor(width, seed=0), bench_tensor(width, seed=1), min_rows)
    with GrpcServerThread(backend, ServerConfig(), pad_table=True) as target:
        ports.update(grpc=target)
        ready.set()
        threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--server-torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads in the server process (0: torch's default)",
    )
    parser.add_argument(
        "--elision",
        action="store_true",
        help="the pad-free wire: bytes per realistic prompt and one-prompt Encode time, full vs elided",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --elision: a narrow tensor, 2 repeats")
    args = parser.parse_args(argv)
    if args.elision:
        return main_elision(args)

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


def main_elision(args) -> int:
    """``--elision``: see the module docstring."""
    import tempfile

    from realistic_prompts import MAX_ROWS, PROMPT_SET, percentile, row_counter

    width = 3 * 64 if args.dry_run else 3 * HIDDEN
    repeats = 2 if args.dry_run else args.repeats
    row_bytes = width * 2  # bf16
    full_bytes = MAX_ROWS * row_bytes
    rows_of, counted_by = row_counter()
    rows = {kind: [rows_of(p) for p in prompts] for kind, prompts in PROMPT_SET.items()}
    every = [n for kind in rows.values() for n in kind]
    min_rows = min(rows_of(""), *every)

    print(
        f"# Pad-free wire: [{MAX_ROWS}, {width}] bf16 per prompt ({full_bytes / 1e6:.2f} MB whole); "
        f"{len(every)} prompts, rows counted by {counted_by}; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, grpcio {grpc.__version__}; load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print("Bytes per prompt, computed from the row counts (compact = real rows x row bytes):")
    print()
    print("| prompts | n | rows median | rows p90 | full MB | compact MB, median | compact MB, p90 | median / full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, ns in [*rows.items(), ("all", every)]:
        med, p90 = statistics.median(ns), percentile(ns, 90)
        print(
            f"| {kind} | {len(ns)} | {med:.0f} | {p90:.0f} | {full_bytes / 1e6:.2f} | "
            f"{med * row_bytes / 1e6:.2f} | {p90 * row_bytes / 1e6:.2f} | {med / MAX_ROWS:.3f} |"
        )
    med_rows, p90_rows = round(statistics.median(every)), round(percentile(every, 90))

    from dit_client.remote import RemoteTextEncoder

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, tempfile.TemporaryDirectory() as tables:
        ports, ready = manager.dict(), manager.Event()
        server = ctx.Process(
            target=serve_padded, args=(ports, ready, args.server_torch_threads, width, min_rows), daemon=True
        )
        server.start()
        try:
            if not ready.wait(120):
                raise SystemExit("the benchmark server did not start")
            target = ports["grpc"]
            check = PaddedTensorBackend(bench_tensor(width, seed=0), bench_tensor(width, seed=1), min_rows)
            with (
                RemoteTextEncoder(target, timeout=60, pad_table_dir=tables) as elided,
                RemoteTextEncoder(target, timeout=60, elide=False) as whole,
            ):
                # 1. Every prompt of the set, both ways: bytes from the rows each answer carried.
                t0 = time.perf_counter()
                held = elided.pad_table_for(elided.info())
                fetch_s = time.perf_counter() - t0
                if held is None:
                    raise SystemExit("the server named no pad table")
                sent = {"full": [], "elided": []}
                exact = True
                for i, n in enumerate(every):
                    for label, client in (("full", whole), ("elided", elided)):
                        out, meta = client.encode_with_metadata([f"{n}:set {i}"])
                        sent[label].append((MAX_ROWS - meta[0].pad_rows_elided) * row_bytes)
                        exact &= torch.equal(out[0], check.embedding(n))
                if sent["elided"] != [n * row_bytes for n in every]:
                    raise SystemExit("the server sent other rows than the prompts fill")

                # 2. One-prompt Encode wall time, full vs elided, at the median and p90 prompt. The two
                # alternate call by call (order swapped every call), so a busy machine slows both alike.
                timed = []
                clients = {"full": whole, "elided": elided}
                for n in (med_rows, p90_rows):
                    times: dict[str, list[float]] = {"full": [], "elided": []}
                    for i in range(-2, repeats):  # i < 0: warm-up
                        for label in ("full", "elided") if i % 2 == 0 else ("elided", "full"):
                            t0 = time.perf_counter()
                            clients[label].encode([f"{n}:{label} {i}"])
                            if i >= 0:
                                times[label].append(time.perf_counter() - t0)
                    timed += [(label, n, Result(label, ts)) for label, ts in times.items()]
        finally:
            server.kill()
            server.join()

    print()
    print(
        "Measured: every prompt of the set through `RemoteTextEncoder.encode` against the real server, "
        "embedding bytes received per prompt ((512 - PromptMetadata.pad_rows_elided) x row bytes):"
    )
    print()
    print("| client | median MB | p90 MB | total MB, all prompts |")
    print("|---|---:|---:|---:|")
    for label, values in sent.items():
        name = "`elide=False` (whole)" if label == "full" else "default (elided)"
        print(
            f"| {name} | {statistics.median(values) / 1e6:.2f} | {percentile(values, 90) / 1e6:.2f} | "
            f"{sum(values) / 1e6:.1f} |"
        )
    ratio = statistics.median(sent["elided"]) / statistics.median(sent["full"])
    print()
    print(
        f"Every rebuilt embedding bit-identical to the server's: {'yes' if exact else 'NO'}. "
        f"Pad table ({held.rows.shape[0]} rows, {held.rows.numel() * 2 / 1e6:.2f} MB) fetched once "
        f"in {fetch_s * 1e3:.0f} ms. Goal: median compact <= 1/3 of full: "
        f"{'met' if ratio <= 1 / 3 else 'MISSED'} ({ratio:.3f})."
    )
    print()
    print(
        f"One-prompt Encode, wall time of `RemoteTextEncoder.encode` ({repeats} calls each after warm-up, "
        "full and elided alternating):"
    )
    print()
    print("| wire | prompt rows | MB received | best ms | median ms |")
    print("|---|---:|---:|---:|---:|")
    for label, n, r in timed:
        mb = (MAX_ROWS if label == "full" else n) * row_bytes / 1e6
        print(f"| {label} | {n} | {mb:.2f} | {r.best * 1e3:.1f} | {r.median * 1e3:.1f} |")
    return 0 if exact else 1


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
