"""Replicas benchmark: throughput with 1, 2 and 3 replicas behind one client target, shared against
local cache hits, and how long clients notice a replica killed with ``kill -9``.

    .venv/bin/python benchmarks/replicas.py                 # about two minutes on 2 cores
    .venv/bin/python benchmarks/replicas.py --json r.json   # also the raw figures
    .venv/bin/python benchmarks/replicas.py --dry-run       # seconds: checks the logic only

Not a test: it prints figures (docs/benchmarks.md, "Replicas").

1. **Throughput.** In-process servers (this process, loopback) whose backend takes a fixed
   time per prompt (``--compute-ms`` times the prompts of each forward pass: the tiny demo
   model computes, then the backend sleeps the rest, like a GPU whose batches cost in
   proportion to their size; a sleep holds no core, so 2 cores can show what N GPUs would),
   caches off, every prompt new. Each replica has its own backend object (a Hugging Face
   fast tokenizer must not be used by two threads at once). One
   :class:`~dit_client.remote.RemoteTextEncoder` names all N replicas in one target
   (round_robin); ``--clients`` threads send one prompt per ``Encode`` call.
2. **Hit latency.** Two replicas sharing a real ``redis-server`` (started here on a free
   port). Prompts are computed on replica B; replica A then answers each one twice: first
   from the shared cache (Redis, then copied into A's memory), then from A's memory cache.
   The demo embeddings are 48 KiB; FLUX.2-dev's are 15.7 MB, whose shared hits also pay the
   transfer from Redis.
3. **Recovery.** Two replicas as processes (``flux2-encoder serve --model demo``, no shared
   cache), ``--clients`` threads sending without pause through one target; one replica is
   killed with SIGKILL. Reported: failed requests, the slowest request in flight across the
   kill, and the time from the kill until every client thread has had a request sent after
   the kill answered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from common.config import CacheConfig, ServerConfig
from common.model_source import resolve_model
from dit_client.remote import RemoteTextEncoder
from tests.helpers import ServerThread  # noqa: E402  (in-process servers on port 0)
from tests.redis_server import RedisServer
from tests.replica_procs import ReplicaProcess


class FixedTimeBackend:
    """The demo backend, padded with a sleep so every forward pass takes ``compute_s`` per prompt."""

    def __init__(self, backend, compute_s: float):
        self._backend = backend
        self.compute_s = compute_s

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def encode(self, prompts):
        t0 = time.perf_counter()
        out = self._backend.encode(prompts)
        time.sleep(max(0.0, self.compute_s * len(prompts) - (time.perf_counter() - t0)))
        return out


def demo_backend():
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model("demo", components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(enc: RemoteTextEncoder, prompts: list[str], clients: int) -> tuple[float, list[str]]:
    """Send ``prompts`` one per call from ``clients`` threads; (seconds, the failures' messages)."""
    todo = iter(prompts)
    lock = threading.Lock()
    failures: list[str] = []

    def worker():
        while True:
            with lock:
                prompt = next(todo, None)
            if prompt is None:
                return
            try:
                enc.encode([prompt])
            except Exception as exc:  # counted, not raised: the figure is the point
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, failures


def throughput(backends, args) -> list[dict]:
    config = ServerConfig(cache=CacheConfig(memory_mb=0))
    rows = []
    for n in args.replicas:
        servers = [
            ServerThread(FixedTimeBackend(backends[i], args.compute_ms / 1000), config).__enter__() for i in range(n)
        ]
        try:
            with RemoteTextEncoder(",".join(s.target for s in servers), timeout=120) as enc:
                enc.info()
                drive(enc, [f"warm-up {n} {i}" for i in range(2 * n)], n)  # connect every subchannel
                prompts = [f"throughput {n} replicas, prompt {i}" for i in range(args.requests)]
                seconds, failures = drive(enc, prompts, args.clients)
        finally:
            for s in servers:
                s.stop(0)
        rows.append(
            {
                "replicas": n,
                "requests": args.requests,
                "seconds": seconds,
                "prompts_per_s": args.requests / seconds,
                "failures": len(failures),
                "errors": failures,
            }
        )
    return rows


def hit_latency(backends, args, workdir: Path) -> dict:
    redis = RedisServer(workdir / "redis").start()
    try:
        config = ServerConfig(cache=CacheConfig(shared_url=redis.url, memory_mb=64))
        with (
            ServerThread(backends[0], config) as a,
            ServerThread(backends[1], config) as b,
            RemoteTextEncoder(a.target) as on_a,
            RemoteTextEncoder(b.target) as on_b,
        ):
            prompts = [f"hit latency prompt {i}" for i in range(args.hit_prompts)]
            for p in prompts:
                on_b.encode([p])  # computed on B, stored in Redis
            on_a.info()
            shared, local = [], []
            for p in prompts:
                t0 = time.perf_counter()
                _, meta = on_a.encode_with_metadata([p])
                shared.append(time.perf_counter() - t0)
                assert meta[0].cache_hit
                t0 = time.perf_counter()
                on_a.encode([p])
                local.append(time.perf_counter() - t0)
            shared_hits = a.running.metrics.sample("flux2_encoder_cache_hits_total", {"tier": "shared"})
            memory_hits = a.running.metrics.sample("flux2_encoder_cache_hits_total", {"tier": "memory"})
    finally:
        redis.kill()
    return {
        "prompts": len(prompts),
        "shared_hits": shared_hits,
        "memory_hits": memory_hits,
        "shared_p50_ms": 1e3 * statistics.median(shared),
        "shared_p99_ms": 1e3 * percentile(shared, 0.99),
        "local_p50_ms": 1e3 * statistics.median(local),
        "local_p99_ms": 1e3 * percentile(local, 0.99),
    }


def recovery(args, workdir: Path) -> dict:
    replicas = [ReplicaProcess(workdir) for _ in range(2)]
    for r in replicas:
        r.spawn()
    try:
        for r in replicas:
            r.wait()
        stop = threading.Event()
        killed_at: list[float] = []
        log: list[tuple[float, float, bool]] = []  # (sent, answered, ok) per request
        lock = threading.Lock()
        with RemoteTextEncoder(",".join(r.target for r in replicas), timeout=120) as enc:
            enc.info()

            def worker(k: int):
                i = 0
                while not stop.is_set():
                    sent = time.perf_counter()
                    try:
                        enc.encode([f"recovery client {k} request {i}"])
                        ok = True
                    except Exception:
                        ok = False
                    with lock:
                        log.append((sent, time.perf_counter(), ok))
                    i += 1

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(args.recovery_before_s)  # steady traffic on both replicas
            killed_at.append(time.perf_counter())
            replicas[1].kill()
            time.sleep(args.recovery_after_s)
            stop.set()
            for t in threads:
                t.join(150)
        kill = killed_at[0]
        failures = sum(1 for _, _, ok in log if not ok)
        across = [done - sent for sent, done, _ in log if sent <= kill <= done]
        after = sorted(done for sent, done, ok in log if sent > kill and ok)
        # Every thread had a post-kill request answered by the time the clients'th such answer came in.
        recovered = (after[args.clients - 1] - kill) if len(after) >= args.clients else float("nan")
        before = [done - sent for sent, done, _ in log if done < kill]
        return {
            "requests": len(log),
            "failures": failures,
            "in_flight_at_kill": len(across),
            "slowest_across_kill_s": max(across, default=0.0),
            "recovered_s": recovered,
            "p50_before_ms": 1e3 * statistics.median(before) if before else float("nan"),
        }
    finally:
        for r in replicas:
            r.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts to measure")
    parser.add_argument("--compute-ms", type=float, default=250.0, help="fixed time of one forward pass")
    parser.add_argument("--requests", type=int, default=120, help="prompts per throughput run (one per call)")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--hit-prompts", type=int, default=100, help="prompts for the hit-latency part")
    parser.add_argument("--recovery-before-s", type=float, default=5.0, help="traffic before the kill")
    parser.add_argument("--recovery-after-s", type=float, default=5.0, help="traffic after the kill")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("throughput", "hits", "recovery"),
        default=["throughput", "hits", "recovery"],
        help="which measurements to run",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: checks the logic, not the figures")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.replicas, args.compute_ms, args.requests, args.clients = [1, 2], 20.0, 16, 4
        args.hit_prompts, args.recovery_before_s, args.recovery_after_s = 5, 1.0, 1.0

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    backends = [demo_backend() for _ in range(max(2, *args.replicas))]
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "throughput": throughput(backends, args) if "throughput" in args.parts else [],
            "hit_latency": hit_latency(backends, args, Path(tmp)) if "hits" in args.parts else None,
            "recovery": recovery(args, Path(tmp)) if "recovery" in args.parts else None,
        }

    if results["throughput"]:
        print_throughput(results, args)
    if results["hit_latency"]:
        print_hits(results)
    if results["recovery"]:
        print_recovery(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    return 0


def print_throughput(results: dict, args) -> None:
    base = results["throughput"][0]["prompts_per_s"]
    print(f"\n### Throughput: {args.compute_ms:g} ms per prompt, {args.clients} client threads, one target\n")
    print("| replicas | prompts | seconds | prompts/s | vs 1 replica | failed |")
    print("|---|---|---|---|---|---|")
    for row in results["throughput"]:
        print(
            f"| {row['replicas']} | {row['requests']} | {row['seconds']:.2f} | {row['prompts_per_s']:.1f} | "
            f"{row['prompts_per_s'] / base:.2f}x | {row['failures']} |"
        )
    for row in results["throughput"]:
        for error in row["errors"]:
            print(f"\n{row['replicas']} replicas, failed: {error}")


def print_hits(results: dict) -> None:
    hit = results["hit_latency"]
    print(f"\n### Hit latency, {hit['prompts']} prompts (demo embeddings, 48 KiB)\n")
    print("| from | p50 ms | p99 ms | hits counted |")
    print("|---|---|---|---|")
    print(
        f"| shared cache (Redis) | {hit['shared_p50_ms']:.2f} | {hit['shared_p99_ms']:.2f} | {hit['shared_hits']:.0f} |"
    )
    print(f"| local memory cache | {hit['local_p50_ms']:.2f} | {hit['local_p99_ms']:.2f} | {hit['memory_hits']:.0f} |")


def print_recovery(results: dict, args) -> None:
    rec = results["recovery"]
    print(f"\n### Recovery: 2 replica processes, one killed with SIGKILL, {args.clients} client threads\n")
    print(
        "| requests | failed | in flight at the kill | slowest of those | every client served again after | p50 before |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {rec['requests']} | {rec['failures']} | {rec['in_flight_at_kill']} | {rec['slowest_across_kill_s']:.3f} s | "
        f"{rec['recovered_s']:.3f} s | {rec['p50_before_ms']:.1f} ms |"
    )


if __name__ == "__main__":
    sys.exit(main())
