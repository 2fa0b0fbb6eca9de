"""What the HF-compatible ``POST /predict`` costs next to gRPC, for real-size embeddings.

    .venv/bin/python benchmarks/http_endpoint.py [--repeats 10]

Both paths run against the same real server (``start_server`` with
``--http-port``) on a fake backend that returns a fixed ``[512, 15360]``
bfloat16 tensor per prompt instantly, so only serving and transport are
measured, on loopback, in one process:

1. **gRPC**: ``RemoteTextEncoder.encode`` (1 MiB chunks, CRC-32C, reassembly).
2. **HTTP /predict**: ``requests.post`` as diffusers' ``Flux2RemoteTextEncoderStep``
   sends it, until the whole ``torch.save`` body has arrived. The body is not
   unpickled here (what the client's ``torch.load`` then costs is not counted).
3. **serializer alone**: ``embeddings_to_torch_save`` (stack + ``torch.save``), the
   part of (2) that gRPC does not have.
4. **HTTP transport alone**: an aiohttp handler on the same loop answering the
   same number of bytes (zeros, prepared once) to the same ``requests`` session.

Every call uses new prompts, so no answer comes from the cache. Reported:
best and median wall time per call after one warm-up call.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests
import torch
from aiohttp import web

from benchmarks.wire import HIDDEN, SEQ, FixedTensorBackend
from common.config import HTTPConfig, ServerConfig
from dit_client.remote import RemoteTextEncoder
from encoder_server.http_endpoint import embeddings_to_torch_save
from encoder_server.server import start_server

_counter = itertools.count()


def fresh_prompts(n: int) -> list[str]:
    return [f"benchmark prompt {next(_counter)}" for _ in range(n)]


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()

    tensor = torch.randn(SEQ, 3 * HIDDEN).to(torch.bfloat16)
    backend = FixedTensorBackend(tensor)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = ServerConfig(host="127.0.0.1", port=0, http=HTTPConfig(port=0))
    running = asyncio.run_coroutine_threadsafe(start_server(config, backend, model_id="bench"), loop).result(60)
    target, url = f"127.0.0.1:{running.port}", f"http://127.0.0.1:{running.http.port}/predict"

    # (4): the same bytes through aiohttp -> requests, with nothing else to do.
    bodies: dict[int, bytes] = {}

    async def raw_bytes(request: web.Request) -> web.Response:
        return web.Response(body=bodies[int(request.query["b"])], content_type="application/octet-stream")

    raw_app = web.Application()
    raw_app.router.add_post("/raw", raw_bytes)
    raw_runner = web.AppRunner(raw_app)
    asyncio.run_coroutine_threadsafe(raw_runner.setup(), loop).result(30)
    asyncio.run_coroutine_threadsafe(web.TCPSite(raw_runner, "127.0.0.1", 0).start(), loop).result(30)
    raw_url = f"http://127.0.0.1:{raw_runner.addresses[0][1]}/raw"

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"{'path':<22}{'prompts':>8}{'MB':>8}{'best ms':>10}{'median ms':>11}")
    try:
        with RemoteTextEncoder(target) as enc, requests.Session() as http:
            for b in args.batches:
                mb = b * tensor.numel() * 2 / 1e6

                def grpc_call(b=b):
                    enc.encode(fresh_prompts(b))

                def http_call(b=b):
                    reply = http.post(url, json={"prompt": fresh_prompts(b)}, timeout=120)
                    reply.raise_for_status()
                    assert len(reply.content) > b * tensor.numel() * 2

                def serialize(b=b):
                    embeddings_to_torch_save([tensor] * b)

                bodies[b] = bytes(len(embeddings_to_torch_save([tensor] * b)))

                def transport(b=b):
                    http.post(raw_url, params={"b": b}, json={}, timeout=120).raise_for_status()

                for name, fn in (
                    ("gRPC Encode", grpc_call),
                    ("HTTP /predict", http_call),
                    ("torch.save alone", serialize),
                    ("HTTP transport alone", transport),
                ):
                    best, median = timed(fn, args.repeats)
                    print(f"{name:<22}{b:>8}{mb:>8.1f}{best * 1e3:>10.1f}{median * 1e3:>11.1f}")
    finally:
        asyncio.run_coroutine_threadsafe(raw_runner.cleanup(), loop).result(30)
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
