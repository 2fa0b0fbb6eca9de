"""Prompt upsampling on the CPU: generation speed, and other users' Encode latency while it runs.

    .venv/bin/python benchmarks/upsampling.py [--max-new-tokens 32] [--batches 1 2] [--encodes 8]
    .venv/bin/python benchmarks/upsampling.py --dry-run      # the tiny demo model: checks the logic in seconds

The model is benchmarks/encoder_forward.py's CPU-scaled FLUX.2-dev text encoder
(40 layers, vocab 131072, hidden 512: the Mistral-Small depth at 1/10 of its
width, random weights in bf16), served in-process exactly as
``flux2-encoder serve --upsampling`` serves it: one copy of the weights, the
embedding path on its first 30 layers, ``Upsample`` generating through the
whole model on a thread and queue of its own.

Measured, through gRPC with the project's client:

1. ``Upsample`` latency per batch size and generated tokens per second. Every
   prompt is padded to 2048 tokens, as the reference does; random weights rarely
   sample the end-of-sequence token, so each answer runs ``--max-new-tokens``
   (the reference's 512 would take many minutes on a CPU).
2. ``Encode`` latency (one prompt, a new one each call, so no cache hit) of
   another user: alone, then while an ``Upsample`` call is generating. The
   generator and the embedding engine run on their own threads; on a CPU they
   share the cores, so Encode slows down but is never queued behind generation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.config import ServerConfig, UpsamplingConfig
from common.model_source import resolve_model
from dit_client.remote import RemoteTextEncoder
from encoder_server.server import start_server
from encoder_server.text_encoder import TruncatedMistral3Encoder

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "two cats on a sofa", "a city street in the rain"]


class BackgroundServer:
    """``start_server`` on an event loop of its own thread (port 0)."""

    def __init__(self, backend, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.running = self._call(start_server(config, backend))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def close(self) -> None:
        self._call(self.running.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)


def encode_latencies(client: RemoteTextEncoder, n: int, tag: str) -> list[float]:
    """``n`` one-prompt Encode calls, each a prompt never sent before (no cache hit); seconds each."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        client.encode([f"{tag} prompt number {i}: a quiet harbour at dawn"])
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--encodes", type=int, default=8, help="Encode calls per measurement")
    parser.add_argument("--dry-run", action="store_true", help="the tiny demo model (hidden 16): logic, not figures")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.dry_run:
            from common.demo import TinyFlux2Spec, build_tiny_flux2

            folder = build_tiny_flux2(Path(tmp), TinyFlux2Spec(with_dit=False))
            model = "tiny demo model (40 layers, hidden 16)"
        else:
            from benchmarks.encoder_forward import build_scaled_model

            folder = build_scaled_model(Path(tmp))
            model = "CPU-scaled FLUX.2-dev text encoder (40 layers, hidden 512, vocab 131072)"
        source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
        backend = TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16, upsampling=True)
        print(f"built and loaded in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        config = ServerConfig(
            host="127.0.0.1", port=0, upsampling=UpsamplingConfig(enabled=True, max_new_tokens=args.max_new_tokens)
        )
        server = BackgroundServer(backend, config)
        try:
            rows = []
            with RemoteTextEncoder(server.target, timeout=3600) as client:
                client.upsample(PROMPTS[:1], seed=0)  # warm-up
                for batch in args.batches:
                    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
                    t = time.perf_counter()
                    result = client.upsample_with_metadata(prompts, seed=1)
                    seconds = time.perf_counter() - t
                    rows.append((batch, seconds, sum(result.generated_tokens), result.generation_time_ns / 1e9))
                    print(f"upsample batch {batch}: {seconds:.1f}s", file=sys.stderr, flush=True)
                encode_latencies(client, 2, "warm-up")
                alone = encode_latencies(client, args.encodes, "alone")
                # One user upsamples (long answers) while another encodes.
                with RemoteTextEncoder(server.target, timeout=3600) as other:
                    busy = threading.Event()
                    calls = []

                    def upsample_in_background():
                        busy.set()
                        calls.append(other.upsample_with_metadata(PROMPTS[:2], seed=2))

                    thread = threading.Thread(target=upsample_in_background)
                    thread.start()
                    busy.wait()
                    while not server.running.upsampling.queue._stops:  # generation has started
                        time.sleep(0.01)
                    t = time.perf_counter()
                    beside = encode_latencies(client, args.encodes, "beside")
                    encodes_s = time.perf_counter() - t
                    thread.join()
                    generation_s = calls[0].generation_time_ns / 1e9
        finally:
            server.close()

    print(
        f"# Prompt upsampling, {model}; {platform.node()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"torch threads), torch {torch.__version__}, bf16; 2048-token prompts, {args.max_new_tokens} new tokens "
        "per prompt (random weights never stop early)"
    )
    print()
    print("| batch | Upsample s (client) | generation s (server) | generated tokens | tokens/s |")
    print("|---:|---:|---:|---:|---:|")
    for batch, seconds, tokens, gen_s in rows:
        print(f"| {batch} | {seconds:.2f} | {gen_s:.2f} | {tokens} | {tokens / gen_s:.1f} |")
    print()
    print(f"Another user's Encode (1 prompt, never cached), {args.encodes} calls each:")
    print()
    print("| while | median ms | max ms |")
    print("|---|---:|---:|")
    print(f"| nothing else runs | {statistics.median(alone) * 1e3:.0f} | {max(alone) * 1e3:.0f} |")
    print(
        f"| an Upsample of 2 prompts generates ({generation_s:.1f} s; the Encodes took {encodes_s:.1f} s of it) | "
        f"{statistics.median(beside) * 1e3:.0f} | {max(beside) * 1e3:.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
