"""Serving benchmarks: concurrency sweep, compute-once, fair scheduling, batch invariance.

    .venv/bin/python benchmarks/serving.py                      # everything, a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/serving.py --section sweep      # or: compute-once, fairness, batch-invariance
    .venv/bin/python benchmarks/serving.py --section batch-invariance --device cuda --hidden 1024

The model is the tiny random FLUX.2 text encoder of ``common/demo.py``
(FLUX.2-dev's depth: 40 layers of which 30 run, 512-token padding, hidden
``--hidden``), so every prompt costs a real 30-layer forward over 512 tokens.
The server runs as its own process (``flux2-encoder serve``), exactly as
deployed; clients are threads of this process, each with its own channel.

Sections:

* ``sweep``: 1, 4, 16, 64 concurrent clients, one prompt per request, each
  request a cache miss (a fresh prompt) or a cache hit (a prompt encoded
  before); client-side latency p50/p99 and throughput in prompts/s.
* ``compute-once``: N concurrent requests for one new prompt vs for N
  different new prompts; forward passes counted by the server's
  ``flux2_encoder_prompts_computed_total``.
* ``fairness``: user ``bulk`` keeps an ``EncodeStream`` busy (requests of 4
  prompts, 4 in flight, so 16 prompts queued) while user ``artist`` sends one prompt at a time;
  the artist's latency with ``--scheduling fair`` and ``--scheduling fifo``.
* ``batch-invariance``: the backend alone (no server): is each prompt's
  embedding bit-identical whether computed alone or in a batch of 2..32?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import socket
import statistics
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
from tqdm import tqdm

from common.demo import TinyFlux2Spec, build_tiny_flux2
from dit_client.remote import RemoteTextEncoder

LEVELS = (1, 4, 16, 64)


# -- server process ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``flux2-encoder serve`` in a subprocess, on free loopback ports, with metrics on, warmed up."""

    def __init__(self, model_dir: Path, workdir: Path, *extra: str, api_key: str | None = None):
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / f"server-{self.port}.log"
        self.api_key = api_key
        cmd = [
            sys.executable, "-m", "encoder_server.cli", "serve", "--model", str(model_dir), "--device", "cpu",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port), *extra,
        ]  # fmt: skip
        self.command = " ".join(["flux2-encoder", *cmd[3:]])
        self._log = open(self.log_path, "w")  # noqa: SIM115 - open for the child's whole life, not one block
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None) -> RemoteTextEncoder:
        return RemoteTextEncoder(self.target, api_key=api_key or self.api_key, timeout=600)

    def _wait_ready(self, timeout_s: float = 300) -> None:
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with self.client() as c:
                    c.info()
                    # The first forward pass of a process pays one-off setup; keep it out of the figures.
                    c.encode([f"warm-up {uuid.uuid4().hex}"])
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("server did not start in time")

    def metric(self, name: str, **labels) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
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
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_clients(server: ServerProcess, n_clients: int, prompts_of) -> dict:
    """``n_clients`` threads, each sending ``prompts_of(client)`` one prompt per request."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients + 1)

    def client_main(i: int) -> None:
        with server.client() as enc:
            enc.info()  # connect before the clock starts
            barrier.wait()
            for prompt in prompts_of(i):
                t0 = time.perf_counter()
                try:
                    enc.encode([prompt])
                except Exception as exc:  # counted and reported, never hidden
                    with lock:
                        errors.append(exc)
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client_main, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": n_clients,
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": 1000 * pct(latencies, 50),
        "p99_ms": 1000 * pct(latencies, 99),
        "prompts_per_s": len(latencies) / wall,
        "wall_s": wall,
    }


def section_sweep(model_dir: Path, workdir: Path, levels, miss_total: int, hit_total: int) -> dict:
    out = {"miss": [], "hit": []}
    with ServerProcess(model_dir, workdir) as server:
        out["command"] = server.command
        warm = [f"warm prompt {i}: a lighthouse on a cliff, storm, oil painting" for i in range(64)]
        with server.client() as enc:
            enc.encode(warm)
        for n in tqdm(levels, desc="sweep"):
            run_id = uuid.uuid4().hex[:8]
            per_client = max(1, miss_total // n)

            def misses(i, run_id=run_id, per_client=per_client):
                return [f"miss {run_id} client {i} request {r}: a fox in snow" for r in range(per_client)]

            out["miss"].append(run_clients(server, n, misses))
            per_client = max(1, hit_total // n)
            out["hit"].append(
                run_clients(
                    server, n, lambda i, per_client=per_client: [warm[(i + r) % len(warm)] for r in range(per_client)]
                )
            )
        out["computed"] = server.metric("flux2_encoder_prompts_computed_total")
    return out


def section_compute_once(model_dir: Path, workdir: Path, n: int) -> dict:
    out = {"n": n}
    with ServerProcess(model_dir, workdir) as server:
        out["command"] = server.command
        run_id = uuid.uuid4().hex[:8]
        for label, prompts_of in (
            ("identical", lambda i: [f"{run_id} the same prompt for everyone"]),
            ("distinct", lambda i: [f"{run_id} a different prompt for client {i}"]),
        ):
            before = server.metric("flux2_encoder_prompts_computed_total")
            result = run_clients(server, n, prompts_of)
            result["computed"] = server.metric("flux2_encoder_prompts_computed_total") - before
            out[label] = result
    return out


def section_fairness(model_dir: Path, workdir: Path, samples: int) -> dict:
    keys = {"bulk": secrets.token_urlsafe(24), "artist": secrets.token_urlsafe(24)}
    key_file = workdir / "keys.txt"
    key_file.write_text("".join(f"{u}:{k}\n" for u, k in keys.items()))
    os.chmod(key_file, 0o600)
    out = {}
    for mode in ("fair", "fifo"):
        extra = ("--api-key-file", str(key_file), "--scheduling", mode, "--max-batch-prompts", "4")
        with ServerProcess(model_dir, workdir, *extra, api_key=keys["artist"]) as server:
            out["command_" + mode] = server.command
            stop = threading.Event()
            bulk_done = []

            def bulk_prompts(stop=stop):
                i = 0
                while not stop.is_set():
                    yield f"bulk caption {i}: product photo of item {uuid.uuid4().hex}"
                    i += 1

            def bulk_main(bulk_done=bulk_done):
                with server.client(keys["bulk"]) as enc:
                    for _ in enc.encode_stream(bulk_prompts(), batch_size=4, max_in_flight=4):
                        bulk_done.append(time.perf_counter())

            with server.client() as enc:  # the artist alone first: the floor
                idle = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    enc.encode([f"idle {uuid.uuid4().hex}: a watercolor heron"])
                    idle.append(time.perf_counter() - t0)
            bulk = threading.Thread(target=bulk_main)
            bulk.start()
            for _ in range(600):  # until the bulk job fills the queue
                if server.metric("flux2_encoder_queue_size") >= 12:
                    break
                time.sleep(0.05)
            latencies = []
            with server.client() as enc:
                for i in tqdm(range(samples), desc=f"fairness ({mode})"):
                    t0 = time.perf_counter()
                    enc.encode([f"artist {uuid.uuid4().hex}: a watercolor heron, take {i}"])
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.1)
            t_stop = time.perf_counter()
            bulk_window = [t for t in bulk_done if t <= t_stop]
            stop.set()
            bulk.join()
            out[mode] = {
                "samples": samples,
                "idle_p50_ms": 1000 * statistics.median(idle),
                "p50_ms": 1000 * pct(latencies, 50),
                "p99_ms": 1000 * pct(latencies, 99),
                "max_ms": 1000 * max(latencies),
                "bulk_prompts_per_s": (len(bulk_window) - 1) / (bulk_window[-1] - bulk_window[0])
                if len(bulk_window) > 1
                else 0.0,
            }
    return out


def section_batch_invariance(model_dir: Path, device: str, dtype: str) -> dict:
    from common.model_source import resolve_model
    from encoder_server.text_encoder import DTYPES, TruncatedMistral3Encoder

    source = resolve_model(str(model_dir), components=("text_encoder", "tokenizer"))
    backend = TruncatedMistral3Encoder(source, device=torch.device(device), dtype=DTYPES[dtype])
    prompts = [f"prompt {i}: " + "a fox in the snow, " * (i % 7) for i in range(32)]
    alone = [backend.encode([p]).embeddings[0] for p in tqdm(prompts, desc="alone")]
    rows = []
    for size in (2, 4, 8, 16, 32):
        differing, max_diff = 0, 0.0
        for start in range(0, len(prompts), size):
            batch = backend.encode(prompts[start : start + size]).embeddings
            for j in range(batch.shape[0]):
                ref = alone[start + j]
                if not torch.equal(batch[j], ref):
                    differing += 1
                    max_diff = max(max_diff, (batch[j].float() - ref.float()).abs().max().item())
        rows.append(
            {"batch_size": size, "prompts": len(prompts), "not_bit_identical": differing, "max_abs_diff": max_diff}
        )
    return {"device": device, "dtype": dtype, "rows": rows}


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
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def report(results: dict) -> str:
    lines = [f"machine: {results['machine']}", f"model: {results['model']}", ""]
    if "sweep" in results:
        s = results["sweep"]
        lines += [
            f"server: `{s['command']}`",
            "",
            "| requests | clients | p50 ms | p99 ms | prompts/s | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind in ("miss", "hit"):
            for r in s[kind]:
                lines.append(
                    f"| cache {kind} | {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                    f"{r['prompts_per_s']:.2f} | {r['errors']} |"
                )
        lines.append("")
    if "compute_once" in results:
        c = results["compute_once"]
        lines += [
            f"server: `{c['command']}`",
            "",
            "| N concurrent requests | wall s | forward passes (prompts computed) |",
            "|---|---:|---:|",
        ]
        for label in ("identical", "distinct"):
            r = c[label]
            lines.append(f"| {c['n']} x {label} prompt | {r['wall_s']:.2f} | {r['computed']:.0f} |")
        lines.append("")
    if "fairness" in results:
        f = results["fairness"]
        lines += [
            f"servers: `{f['command_fair']}` and the same with `--scheduling fifo`",
            "",
            "| scheduling | artist alone p50 ms | artist p50 ms | artist p99 ms | samples | bulk prompts/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for mode in ("fair", "fifo"):
            r = f[mode]
            lines.append(
                f"| {mode} | {r['idle_p50_ms']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                f"{r['samples']} | {r['bulk_prompts_per_s']:.2f} |"
            )
        lines.append("")
    if "batch_invariance" in results:
        b = results["batch_invariance"]
        lines += [
            f"device {b['device']}, {b['dtype']}",
            "",
            "| batch size | prompts | not bit-identical | max abs diff |",
            "|---:|---:|---:|---:|",
        ]
        for r in b["rows"]:
            lines.append(f"| {r['batch_size']} | {r['prompts']} | {r['not_bit_identical']} | {r['max_abs_diff']:.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--section", choices=("all", "sweep", "compute-once", "fairness", "batch-invariance"), default="all"
    )
    parser.add_argument("--hidden", type=int, default=16, help="text-encoder width of the random model")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrent clients")
    parser.add_argument(
        "--miss-total", type=int, default=32, help="cache-miss requests per level (at least 1 per client)"
    )
    parser.add_argument("--hit-total", type=int, default=256, help="cache-hit requests per level")
    parser.add_argument("--compute-once-n", type=int, default=16)
    parser.add_argument("--fair-samples", type=int, default=12, help="interactive requests per scheduling mode")
    parser.add_argument("--device", default="cpu", help="batch-invariance only: cpu or cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="flux2-serving-bench-") as tmp:
        workdir = Path(tmp)
        spec = TinyFlux2Spec(text_hidden=args.hidden, text_intermediate=2 * args.hidden, with_dit=False)
        model_dir = build_tiny_flux2(workdir / "model", spec)
        results = {
            "machine": machine(),
            "model": f"random Mistral-3 text encoder, 40 layers (30 run), hidden {args.hidden}, "
            f"embedding [512, {3 * args.hidden}] bfloat16",
        }
        want = lambda name: args.section in ("all", name)  # noqa: E731 - a one-line predicate, read where it is used
        if want("sweep"):
            results["sweep"] = section_sweep(model_dir, workdir, args.levels, args.miss_total, args.hit_total)
        if want("compute-once"):
            results["compute_once"] = section_compute_once(model_dir, workdir, args.compute_once_n)
        if want("fairness"):
            results["fairness"] = section_fairness(model_dir, workdir, args.fair_samples)
        if want("batch-invariance"):
            results["batch_invariance"] = section_batch_invariance(model_dir, args.device, args.dtype)
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
