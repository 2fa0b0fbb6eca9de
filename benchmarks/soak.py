"""Soak benchmark: N clients for M minutes against a real server; errors, latency and server RSS over time.

    .venv/bin/python benchmarks/soak.py                                   # 8 clients, 10 min, memory cache 64 MiB
    .venv/bin/python benchmarks/soak.py --memory-cache-mb 64 0 --json soak.json   # cache on, then off
    .venv/bin/python benchmarks/soak.py --dry-run                         # seconds: checks the logic only

Not a test: it runs for minutes and prints figures. The server is its own
process (``flux2-encoder serve --model demo --device cpu``, the random tiny
FLUX.2 model, embeddings ``[512, 48]`` bf16 = 48 KiB), on free loopback ports,
with ``--metrics-port`` on; clients are threads of this process, each with its
own :class:`~dit_client.remote.RemoteTextEncoder`, one prompt per request.

Each request is a cache hit with probability ``--hit-ratio``: a prompt from a
hot set of ``--hot-prompts`` encoded before the clock starts (with the memory
cache off these are computed again, or joined while computing); otherwise a
miss: a prompt never sent before. The run stops after ``--minutes`` or
``--max-requests``, whichever comes first.

Every ``--sample-s`` seconds the server's RSS (``VmRSS`` of
``/proc/PID/status``) and the memory cache's counted bytes and entries
(``flux2_encoder_cache_bytes{tier="memory"}`` from the metrics port) are
recorded. Reported: requests, errors by type, p50/p99 latency (all, hits,
misses), RSS at start (server ready, before the hot set), after warm-up
(``--warmup-s`` into the run) and at the end, and the RSS slope over the
second half of the run (least squares, MB/min): near 0 means RSS levelled off.

The default ``--memory-cache-mb`` is one that the misses fill: 64 MiB holds
1,344 demo entries (48 KiB plus the per-entry overhead the cache counts), full
after a minute or two of misses on 2 cores, so the second half shows the
steady state with evictions. The server's own default (2 GiB, ~43,000 demo
entries) would still be filling at the end of a 10-minute run, and RSS would
rightly keep growing.

``--server-env NAME=VALUE`` sets environment variables of the server process
only (e.g. ``MALLOC_MMAP_THRESHOLD_=131072`` or ``MALLOC_ARENA_MAX=2``), to
compare allocator settings. Results: docs/benchmarks.md, "Soak".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from dit_client.remote import RemoteTextEncoder

MB = 1e6


# -- server process ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``flux2-encoder serve`` in a subprocess on free loopback ports, metrics on, one warm-up request done."""

    def __init__(self, model: str, memory_cache_mb: float, workdir: Path, env: dict[str, str], timeout_s: float):
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / f"server-{self.port}.log"
        self.timeout_s = timeout_s
        cmd = [
            sys.executable, "-m", "encoder_server.cli", "serve", "--model", model, "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--memory-cache-mb", f"{memory_cache_mb:g}",
        ]  # fmt: skip
        self.env = env
        self.command = " ".join([*(f"{k}={v}" for k, v in env.items()), "flux2-encoder", *cmd[3:]])
        self._log = open(self.log_path, "w")  # noqa: SIM115 - open for the child's whole life, not one block
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        self._wait_ready()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> RemoteTextEncoder:
        return RemoteTextEncoder(self.target, timeout=self.timeout_s)

    def _wait_ready(self, timeout_s: float = 300) -> None:
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with self.client() as c:
                    c.info()
                    c.encode([f"warm-up {uuid.uuid4().hex}"])
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("server did not start in time")

    def rss_bytes(self) -> int:
        """Resident set size of the server process (VmRSS), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def metrics(self) -> dict[str, float]:
        """Every sample of the Prometheus text, keyed by name and labels as written."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for m in re.finditer(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- measurements -----------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` points, per minute; NaN with fewer than 2 points."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return float("nan")
    return 60 * sum((t - mx) * (v - my) for t, v in points) / var


def memory_cache_counted(metrics: dict[str, float]) -> tuple[float, float]:
    """(bytes, entries) the server's memory cache says it holds (0, 0 when it is off)."""
    return (
        metrics.get('flux2_encoder_cache_bytes{tier="memory"}', 0.0),
        metrics.get('flux2_encoder_cache_entries{tier="memory"}', 0.0),
    )


def soak(server: ServerProcess, args, cache_mb: float) -> dict:
    run_id = uuid.uuid4().hex[:8]
    hot = [f"soak hot prompt {i}: a lighthouse on a cliff in a storm, oil painting" for i in range(args.hot_prompts)]
    rss_start = server.rss_bytes()
    with server.client() as enc:  # the hot set, so hits are hits (when the memory cache is on)
        for start in range(0, len(hot), 16):
            enc.encode(hot[start : start + 16])

    duration = 60 * args.minutes
    lock = threading.Lock()
    lat = {"hit": [], "miss": []}
    errors: collections.Counter[str] = collections.Counter()
    issued = 0
    stop = threading.Event()
    barrier = threading.Barrier(args.clients + 1)
    t_zero = 0.0

    def client_main(i: int) -> None:
        nonlocal issued
        rng = random.Random(args.seed * 1000 + i)
        with server.client() as enc:
            enc.info()  # connect before the clock starts
            barrier.wait()
            r = 0
            while not stop.is_set():
                with lock:
                    if args.max_requests and issued >= args.max_requests:
                        break
                    issued += 1
                kind = "hit" if rng.random() < args.hit_ratio else "miss"
                prompt = rng.choice(hot) if kind == "hit" else f"soak {run_id} client {i} request {r}: a fox in snow"
                r += 1
                t0 = time.perf_counter()
                try:
                    enc.encode([prompt])
                except Exception as exc:  # counted by type and reported, never hidden
                    with lock:
                        errors[type(exc).__name__] += 1
                    continue
                with lock:
                    lat[kind].append(time.perf_counter() - t0)

    samples: list[dict] = []

    def sample() -> None:
        m = server.metrics()
        cache_bytes, cache_entries = memory_cache_counted(m)
        with lock:
            done = len(lat["hit"]) + len(lat["miss"]) + sum(errors.values())
        samples.append({
            "t_s": round(time.perf_counter() - t_zero, 2),
            "rss_mb": server.rss_bytes() / MB,
            "cache_counted_mb": cache_bytes / MB,
            "cache_entries": int(cache_entries),
            "requests_done": done,
            "prompts_computed": int(m.get("flux2_encoder_prompts_computed_total", 0)),
        })  # fmt: skip

    threads = [threading.Thread(target=client_main, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t_zero = time.perf_counter()
    sample()
    t_end = t_zero + duration
    next_sample = t_zero + args.sample_s
    while time.perf_counter() < t_end and any(t.is_alive() for t in threads):
        time.sleep(max(0.0, min(next_sample, t_end) - time.perf_counter()))
        if time.perf_counter() >= next_sample:
            sample()
            next_sample += args.sample_s
    stop.set()
    for t in threads:
        t.join(args.timeout_s + 30)
    wall = time.perf_counter() - t_zero
    sample()
    final_metrics = server.metrics()

    def rss_at(t: float) -> float:
        return min(samples, key=lambda s: abs(s["t_s"] - t))["rss_mb"]

    half = [(s["t_s"], s["rss_mb"]) for s in samples if s["t_s"] >= wall / 2]
    counted_half = [(s["t_s"], s["cache_counted_mb"]) for s in samples if s["t_s"] >= wall / 2]
    both = lat["hit"] + lat["miss"]
    end = samples[-1]
    return {
        "memory_cache_mb": cache_mb,
        "command": server.command,
        "clients": args.clients,
        "minutes": args.minutes,
        "hit_ratio": args.hit_ratio,
        "hot_prompts": args.hot_prompts,
        "wall_s": wall,
        "requests": len(both),
        "hits": len(lat["hit"]),
        "misses": len(lat["miss"]),
        "errors": dict(errors),
        "requests_per_s": len(both) / wall,
        "p50_ms": 1000 * pct(both, 50),
        "p99_ms": 1000 * pct(both, 99),
        "hit_p50_ms": 1000 * pct(lat["hit"], 50),
        "hit_p99_ms": 1000 * pct(lat["hit"], 99),
        "miss_p50_ms": 1000 * pct(lat["miss"], 50),
        "miss_p99_ms": 1000 * pct(lat["miss"], 99),
        "prompts_computed": final_metrics.get("flux2_encoder_prompts_computed_total", 0.0),
        "server_memory_hits": final_metrics.get('flux2_encoder_cache_hits_total{tier="memory"}', 0.0),
        "evictions": final_metrics.get('flux2_encoder_cache_evictions_total{tier="memory"}', 0.0),
        "rss_start_mb": rss_start / MB,
        "rss_warm_mb": rss_at(args.warmup_s),
        "rss_end_mb": end["rss_mb"],
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "rss_slope_second_half_mb_per_min": slope_per_min(half),
        "counted_slope_second_half_mb_per_min": slope_per_min(counted_half),
        "cache_counted_end_mb": end["cache_counted_mb"],
        "cache_entries_end": end["cache_entries"],
        "rss_growth_per_counted_mb": (end["rss_mb"] - rss_start / MB) / end["cache_counted_mb"]
        if end["cache_counted_mb"]
        else None,
        "samples": samples,
    }


# -- report -----------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.1f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, torch {torch.__version__}, Python {platform.python_version()}"


def report(results: dict) -> str:
    lines = [f"machine: {results['machine']}", ""]
    runs = results["runs"]
    cols = [("memory cache", lambda r: f"{r['memory_cache_mb']:g} MiB" if r["memory_cache_mb"] else "off"),
            ("requests", lambda r: f"{r['requests']}"),
            ("hits / misses sent", lambda r: f"{r['hits']} / {r['misses']}"),
            ("prompts computed", lambda r: f"{r['prompts_computed']:.0f}"),
            ("errors", lambda r: ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"),
            ("req/s", lambda r: f"{r['requests_per_s']:.1f}"),
            ("p50 / p99 ms (all)", lambda r: f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"),
            ("p50 / p99 ms (hits)", lambda r: f"{r['hit_p50_ms']:.1f} / {r['hit_p99_ms']:.1f}"),
            ("p50 / p99 ms (misses)", lambda r: f"{r['miss_p50_ms']:.1f} / {r['miss_p99_ms']:.1f}"),
            ("RSS start / warm / end MB", lambda r: f"{r['rss_start_mb']:.0f} / {r['rss_warm_mb']:.0f} / {r['rss_end_mb']:.0f}"),
            ("RSS max MB", lambda r: f"{r['rss_max_mb']:.0f}"),
            ("RSS slope, 2nd half, MB/min", lambda r: f"{r['rss_slope_second_half_mb_per_min']:+.2f}"),
            ("cache counted MB (entries) at end", lambda r: f"{r['cache_counted_end_mb']:.1f} ({r['cache_entries_end']})"),
            ("RSS growth / counted bytes", lambda r: f"{r['rss_growth_per_counted_mb']:.2f}"
             if r["rss_growth_per_counted_mb"] is not None else "-")]  # fmt: skip
    for r in runs:
        lines.append(f"server: `{r['command']}`")
    lines += ["", "| | " + " | ".join(cols[0][1](r) for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    for name, fmt in cols[1:]:
        lines.append(f"| {name} | " + " | ".join(fmt(r) for r in runs) + " |")
    for r in runs:
        label = f"{r['memory_cache_mb']:g} MiB" if r["memory_cache_mb"] else "off"
        lines += [
            "",
            f"RSS over time, memory cache {label}:",
            "",
            "| t s | RSS MB | cache counted MB | entries | requests done |",
            "|---:|---:|---:|---:|---:|",
        ]
        step = max(1, len(r["samples"]) // 10)
        shown = r["samples"][::step]
        if shown[-1] is not r["samples"][-1]:
            shown.append(r["samples"][-1])
        for s in shown:
            lines.append(
                f"| {s['t_s']:.0f} | {s['rss_mb']:.0f} | {s['cache_counted_mb']:.1f} | "
                f"{s['cache_entries']} | {s['requests_done']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each run")
    parser.add_argument("--max-requests", type=int, default=0, help="stop a run after this many requests (0: no bound)")
    parser.add_argument(
        "--memory-cache-mb",
        type=float,
        nargs="+",
        default=[64.0],
        help="one run per value, one after another; 0 turns the memory cache off",
    )
    parser.add_argument("--hit-ratio", type=float, default=0.5, help="share of requests for a hot-set prompt")
    parser.add_argument("--hot-prompts", type=int, default=64, help="prompts in the hot set")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="'after warm-up' RSS is the sample nearest this")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="client deadline per request")
    parser.add_argument("--model", default="demo", help="what the server serves (default: the random demo model)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the server process only (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results (with every sample) here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="2 clients, a few seconds, small cache: checks the logic, gives no figure worth recording",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.clients, args.minutes, args.sample_s, args.warmup_s, args.hot_prompts = 2, 0.1, 1.0, 2.0, 4
        args.memory_cache_mb = [1.0, 0.0]
    env = dict(item.split("=", 1) for item in args.server_env)

    results = {"machine": machine(), "model": args.model, "runs": []}
    with tempfile.TemporaryDirectory(prefix="flux2-soak-") as tmp:
        for cache_mb in args.memory_cache_mb:
            with ServerProcess(args.model, cache_mb, Path(tmp), env, args.timeout_s) as server:
                results["runs"].append(soak(server, args, cache_mb))
            if args.json is not None:  # after each run, so a long run that dies later keeps what it measured
                args.json.write_text(json.dumps(results, indent=2))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
