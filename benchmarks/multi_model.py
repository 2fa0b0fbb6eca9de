"""Two models on one encoder server against two servers: memory and throughput under a mixed load.

    .venv/bin/python benchmarks/multi_model.py                    # 4 clients, 60 s per setup
    .venv/bin/python benchmarks/multi_model.py --seconds 120 --clients 8 --json multi.json
    .venv/bin/python benchmarks/multi_model.py --dry-run          # seconds: checks the logic only

The question a studio asks before it serves FLUX.2 [dev] and [klein] from one
box: one ``flux2-encoder serve --model dev=... --model klein=...`` or one server
per model? Each setup runs the tiny random demo models on the CPU, with the
same flags, on free loopback ports:

- ``one``: ``flux2-encoder serve --model dev=demo --model klein=demo-klein``;
- ``two``: ``flux2-encoder serve --model demo`` and ``... --model demo-klein``.

The memory caches are off (``--memory-cache-mb 0``), so RSS is the models and
the runtime, not cached answers. After each server answered one request per
model, the RSS of the server process(es) (``VmRSS``, summed for ``two``) is
taken: "RSS ready". Then ``--clients`` threads of this process, each with its
own :class:`~dit_client.remote.RemoteTextEncoder`, send one prompt per request
for ``--seconds``: every request a prompt never sent before, to [dev] or
[klein] by turns (client ``i`` starts with model ``i % 2``), so both models
compute all the time. Reported per setup: RSS ready and the highest RSS sampled
every second under load, prompts per second per model and in all, p50/p99
latency, errors. The demo models are tiny, so RSS is mostly the runtime
(Python, torch, gRPC) that a second process duplicates; with real weights
each model's weights add the same to both setups. Results: docs/benchmarks.md,
"Two models: one server or two".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import free_port, machine, pct

from dit_client.remote import RemoteTextEncoder

MB = 1e6
MODELS = {"dev": "demo", "klein": "demo-klein"}


class Server:
    """``flux2-encoder serve`` with ``models`` (``--model`` values) in a subprocess, ready once each model answered."""

    def __init__(self, models: list[str], workdir: Path, timeout_s: float):
        self.port = free_port()
        self.timeout_s = timeout_s
        model_args = [a for m in models for a in ("--model", m)]
        cmd = [
            sys.executable,
            "-m",
            "encoder_server.cli",
            "serve",
            *model_args,
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--memory-cache-mb",
            "0",
        ]
        self.command = " ".join(["flux2-encoder", *cmd[3:]])
        self._log = open(workdir / f"server-{self.port}.log", "w")  # noqa: SIM115 - open for the child's whole life, not one block
        self.log_path = Path(self._log.name)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.names = self._wait_ready()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_ready(self, timeout_s: float = 300) -> list[str]:
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with RemoteTextEncoder(self.target, timeout=self.timeout_s) as c:
                    names = list(c.info().model_names)
                    for name in names:
                        c.encode([f"warm-up {uuid.uuid4().hex}"], model=name)
                return names
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("server did not start in time")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def start(setup: str, workdir: Path, timeout_s: float) -> tuple[list[Server], dict[str, tuple[str, str]]]:
    """The servers of ``setup`` and, per model, ``(target, name on that server)``."""
    if setup == "one":
        server = Server([f"{k}={v}" for k, v in MODELS.items()], workdir, timeout_s)
        return [server], {k: (server.target, k) for k in MODELS}
    servers, routes = [], {}
    for key, source in MODELS.items():
        server = Server([source], workdir, timeout_s)
        servers.append(server)
        routes[key] = (server.target, server.names[0])
    return servers, routes


def run_setup(setup: str, args, workdir: Path) -> dict:
    t0 = time.perf_counter()
    servers, routes = start(setup, workdir, args.timeout)
    try:
        started_s = time.perf_counter() - t0
        rss_ready = sum(s.rss_bytes() for s in servers)
        latencies: dict[str, list[float]] = {k: [] for k in MODELS}
        errors: dict[str, int] = {}
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds
        peak = [rss_ready]

        def client_main(i: int) -> None:
            clients = {k: RemoteTextEncoder(target, timeout=args.timeout) for k, (target, _) in routes.items()}
            keys = list(MODELS)
            n = i % 2
            try:
                while time.monotonic() < stop_at:
                    key = keys[n % 2]
                    n += 1
                    t = time.perf_counter()
                    try:
                        clients[key].encode([f"client {i} prompt {n} {uuid.uuid4().hex}"], model=routes[key][1])
                    except Exception as exc:  # counted, reported
                        with lock:
                            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                        continue
                    with lock:
                        latencies[key].append(time.perf_counter() - t)
            finally:
                for c in clients.values():
                    c.close()

        threads = [threading.Thread(target=client_main, args=(i,), daemon=True) for i in range(args.clients)]
        t_load = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], sum(s.rss_bytes() for s in servers))
            time.sleep(1.0)
        elapsed = time.perf_counter() - t_load
        every = [x for v in latencies.values() for x in v]
        return {
            "setup": setup,
            "commands": [s.command for s in servers],
            "start_s": started_s,
            "rss_ready_mb": rss_ready / MB,
            "rss_peak_mb": peak[0] / MB,
            "seconds": elapsed,
            "prompts_per_s": {k: len(v) / elapsed for k, v in latencies.items()},
            "total_per_s": len(every) / elapsed,
            "p50_ms": pct(every, 50) * 1e3,
            "p99_ms": pct(every, 99) * 1e3,
            "errors": errors,
        }
    finally:
        for s in servers:
            s.close()


def report(results: list[dict], args) -> str:
    lines = [
        f"# Two models, one server or two: {machine()}",
        f"# {args.clients} clients, {args.seconds:g} s per setup, a new prompt per request, [dev] and [klein] by "
        "turns; memory cache off" + ("; DRY RUN: not a measurement" if args.dry_run else ""),
        "",
    ]
    for r in results:
        lines.append(f"{r['setup']}: " + " ; ".join(r["commands"]))
    lines += [
        "",
        "| setup | processes | RSS ready MB | RSS peak under load MB | dev prompts/s | klein prompts/s "
        "| total prompts/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        errors = sum(r["errors"].values())
        lines.append(
            f"| {r['setup']} | {len(r['commands'])} | {r['rss_ready_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
            f"{r['prompts_per_s']['dev']:.2f} | {r['prompts_per_s']['klein']:.2f} | {r['total_per_s']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {errors} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="load per setup (default 60)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--setups", nargs="+", choices=["one", "two"], default=["one", "two"])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--dry-run", action="store_true", help="a few seconds per setup: checks the logic only")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seconds, args.clients = min(args.seconds, 3.0), min(args.clients, 2)
    with tempfile.TemporaryDirectory(prefix="flux2-multi-model-") as tmp:
        results = [run_setup(setup, args, Path(tmp)) for setup in args.setups]
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(not r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
