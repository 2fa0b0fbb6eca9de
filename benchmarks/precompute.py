"""Precompute benchmarks: throughput vs the encoder itself, client RAM at 100k captions, resume after kill -9.

    .venv/bin/python benchmarks/precompute.py throughput [--hidden 128] [--captions 16] [--rounds 4] [--batch 8]
    .venv/bin/python benchmarks/precompute.py transport  [--captions 96]
    .venv/bin/python benchmarks/precompute.py memory     [--counts 10000 100000]
    .venv/bin/python benchmarks/precompute.py resume     [--captions 20000]

throughput
    A FLUX.2-dev-shaped text encoder (40 layers, 30 computed, hidden states
    10/20/30, 512 tokens, bf16) scaled in width (``--hidden``; heads of 16),
    random weights saved and loaded through ``from_pretrained``.
    Baseline: the encoder's own batched throughput, ``TruncatedMistral3Encoder.encode``
    in this process, no gRPC, best of batch ``--batch`` and batch ``--captions``
    (the largest batch the server could form from one round). Against it: the
    same model served by a server subprocess (in-memory cache off, so every
    caption is computed) and ``precompute()`` in this process writing a store,
    captions/s end to end. The two alternate for ``--rounds`` rounds so both see
    the same background load; each round's ratio and the median are printed.
transport
    The same pipeline with a fake encoder that computes nothing and answers
    real-size FLUX.2-dev embeddings (bf16 [512, 15360], 15.7 MB): the most
    the client (receive, CRC-32C, store writes with fsync) can take, in MB/s.
memory
    A fake encoder with tiny embeddings ([512, 12] bf16), so 100k captions fit
    the machine's time; the client runs in its own process and reports its
    peak RSS (Linux VmHWM) and its RSS before the run.
resume
    Fake encoder; the client process is SIGKILLed once half the shards are
    written, then rerun; reports what was kept, what was redone, and checks that
    the store ends with every caption exactly once.

Server and client share the machine's cores; on a 2-core machine the client's
work competes with the encoder's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

SCRIPT = str(Path(__file__).resolve())


def _captions(n: int, tag: str = "") -> list[str]:
    # Distinct, realistic-length captions (~90 characters).
    return [
        f"photo {i}{tag}: a red fox standing in fresh snow at sunrise, soft light, 35mm film grain" for i in range(n)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


# -- backends ------------------------------------------------------------------


class FakeBackend:
    """Answers FLUX.2-dev-shaped embeddings without computing anything (row i is filled with i mod 251)."""

    def __init__(self, hidden: int):
        from common.encoder_spec import FLUX2_DEV

        self.spec = FLUX2_DEV
        self.hidden_size = hidden
        self.dtype = torch.bfloat16
        self.fingerprint = f"fake-bench-{hidden}"
        self.padding_side = "left"
        self.num_hidden_layers = FLUX2_DEV.computed_layers
        self.quantization = "none"
        self.compute = "exact"
        self.device = torch.device("cpu")
        self._row = torch.zeros((FLUX2_DEV.max_sequence_length, 3 * hidden), dtype=torch.bfloat16)

    def encode(self, prompts):
        from encoder_server.text_encoder import EncodedBatch

        out = self._row.expand(len(prompts), *self._row.shape).clone()
        for i, p in enumerate(prompts):
            out[i, 0, 0] = float(sum(p.encode()) % 251)
        n = len(prompts)
        return EncodedBatch(out, [self.spec.max_sequence_length] * n, [False] * n, 0, 0)


def _scaled_model_dir(hidden: int) -> Path:
    from common.demo import TinyFlux2Spec, build_tiny_flux2

    path = Path(tempfile.gettempdir()) / f"flux2-bench-precompute-h{hidden}"
    if not (path / "text_encoder" / "config.json").is_file():
        spec = TinyFlux2Spec(
            text_hidden=hidden,
            text_heads=hidden // 16,
            text_kv_heads=max(1, hidden // 64),
            text_intermediate=int(hidden * 6.4),
            with_dit=False,
        )
        tmp = Path(tempfile.mkdtemp(prefix=path.name + "-", dir=path.parent))
        build_tiny_flux2(tmp, spec)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def _real_backend(hidden: int):
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(_scaled_model_dir(hidden)), components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


# -- processes ---------------------------------------------------------------


def _serve(args) -> None:
    """Child process: serve a fake or scaled backend on --port until killed."""
    from common.config import CacheConfig, ServerConfig
    from encoder_server.server import start_server

    backend = FakeBackend(args.hidden) if args.fake else _real_backend(args.hidden)
    config = replace(
        ServerConfig(), host="127.0.0.1", port=args.port, cache=CacheConfig(memory_mb=0), metrics_port=args.metrics_port
    )

    async def main():
        running = await start_server(config, backend, model_id="bench")  # noqa: F841 - kept alive on purpose
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class Server:
    def __init__(self, *, fake: bool, hidden: int, metrics: bool = False):
        self.port = _free_port()
        self.metrics_port = _free_port() if metrics else None
        cmd = [sys.executable, SCRIPT, "_serve", "--port", str(self.port), "--hidden", str(hidden)]
        if fake:
            cmd.append("--fake")
        if metrics:
            cmd += ["--metrics-port", str(self.metrics_port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "READY" not in line:
            raise RuntimeError(f"benchmark server did not start: {line!r}")
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _client(args) -> None:
    """Child process: run precompute and print a JSON report (with peak RSS)."""
    from dit_client.remote import RemoteTextEncoder
    from dit_client.training import precompute

    rss_before = _status_kb("VmRSS")
    shard = {"shard_bytes": int(args.shard_mb * 2**20)} if args.shard_mb else {}
    with RemoteTextEncoder(args.encoder) as enc:
        report = precompute(
            enc, args.captions, args.out, concurrency=args.concurrency, batch_size=args.batch, progress=False, **shard
        )
    print(
        json.dumps(
            {
                "encoded": report.encoded,
                "already_stored": report.already_stored,
                "elapsed_s": report.elapsed_s,
                "rss_before_mib": rss_before / 1024,
                "peak_rss_mib": _status_kb("VmHWM") / 1024,
            }
        ),
        flush=True,
    )


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _run_client(
    target: str, captions: Path, out: Path, *, batch: int | None, concurrency: int | None, shard_mb: float | None
) -> dict:
    cmd = [sys.executable, SCRIPT, "_client", "--encoder", target, "--captions", str(captions), "--out", str(out)]
    if shard_mb:
        cmd += ["--shard-mb", str(shard_mb)]
    if batch:
        cmd += ["--batch", str(batch)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- benchmarks ---------------------------------------------------------------


def _server_busy() -> dict[str, float]:
    """Seconds the server's encoder spent tokenizing + computing, and prompts computed (Prometheus counters)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{_server_busy.port}/metrics", timeout=10).read().decode()
    values = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    return {
        "busy_s": values["flux2_encoder_tokenize_duration_seconds_sum"]
        + values["flux2_encoder_inference_duration_seconds_sum"],
        "prompts": values["flux2_encoder_prompts_computed_total"],
        "batches": values["flux2_encoder_batch_size_count"],
    }


def bench_throughput(args) -> None:
    import statistics

    from dit_client.remote import RemoteTextEncoder
    from dit_client.training import EmbeddingStore, precompute

    n = args.captions
    print(
        f"# throughput: scaled FLUX.2-dev encoder, hidden {args.hidden}, embedding [512, {3 * args.hidden}] bf16, "
        f"{args.rounds} rounds of {n} captions; {_machine()}"
    )
    backend = _real_backend(args.hidden)
    sizes = sorted({args.batch, n})
    in_situ, standalone = [], []
    with tempfile.TemporaryDirectory() as tmp, Server(fake=False, hidden=args.hidden, metrics=True) as server:
        _server_busy.port = server.metrics_port
        with RemoteTextEncoder(server.target) as enc:
            for bs in sizes:  # warm-up both sides
                backend.encode(_captions(bs, " warm"))
            precompute(enc, _captions(n, " warm"), Path(tmp) / "store", batch_size=args.batch, progress=False)
            for r in range(args.rounds):
                # (a) The encoder alone in this process, same caption count, best of the batch sizes
                #     the server could form; alternating with (b) so both see the same background load.
                alone = 0.0
                for bs in sizes:
                    prompts = _captions(n, f" alone{r}-{bs}")
                    t0 = time.perf_counter()
                    for i in range(0, n, bs):
                        backend.encode(prompts[i : i + bs])
                    alone = max(alone, n / (time.perf_counter() - t0))
                # (b) precompute end to end; the server's own counters say how long its encoder was busy.
                before = _server_busy()
                report = precompute(
                    enc, _captions(n, f" run{r}"), Path(tmp) / "store", batch_size=args.batch, progress=False
                )
                after = _server_busy()
                busy = after["busy_s"] - before["busy_s"]
                computed = after["prompts"] - before["prompts"]
                batches = after["batches"] - before["batches"]
                assert computed == n, (computed, n)
                own_rate = computed / busy  # the encoder's batched throughput during this very run
                in_situ.append(report.captions_per_s / own_rate)
                standalone.append(report.captions_per_s / alone)
                print(
                    f"round {r}: precompute {report.captions_per_s:6.2f} captions/s; encoder busy {busy:.1f}s of "
                    f"{report.elapsed_s:.1f}s ({computed / batches:.0f} prompts/batch) -> its own rate "
                    f"{own_rate:.2f}/s, precompute = {100 * in_situ[-1]:.0f}% of it; encoder alone in-process "
                    f"{alone:.2f}/s (best of batch {sizes}) -> {100 * standalone[-1]:.0f}%"
                )
        assert len(EmbeddingStore(Path(tmp) / "store")) == n * (args.rounds + 1)
    print(
        f"median: precompute = {100 * statistics.median(in_situ):.0f}% of the encoder's own throughput during "
        f"the run; {100 * statistics.median(standalone):.0f}% of the encoder alone in-process (noisier: "
        f"measured at other moments)"
    )


def bench_transport(args) -> None:
    from dit_client.remote import RemoteTextEncoder
    from dit_client.training import EmbeddingStore, precompute

    hidden = 5120  # FLUX.2-dev: [512, 15360] bf16
    print(f"# transport: fake encoder, real-size embeddings [512, 15360] bf16 (15.7 MB); {_machine()}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, Server(fake=True, hidden=hidden) as server:
        with RemoteTextEncoder(server.target) as enc:
            precompute(enc, _captions(8, " warm"), Path(tmp) / "warm", progress=False)
        captions = Path(tmp) / "captions.txt"
        captions.write_text("\n".join(_captions(args.captions, " run")) + "\n")
        # The client in its own process, so its peak RSS is its own.
        r = _run_client(server.target, captions, Path(tmp) / "store", batch=None, concurrency=None, shard_mb=None)
        store_bytes = sum(p.stat().st_size for p in (Path(tmp) / "store").glob("shard-*"))
        assert len(EmbeddingStore(Path(tmp) / "store")) == args.captions
    mb = r["encoded"] * 512 * 15360 * 2 / 1e6
    print(
        f"precompute (default batch, concurrency and shard size): {r['encoded'] / r['elapsed_s']:.1f} "
        f"captions/s = {mb / r['elapsed_s']:.0f} MB/s ({r['encoded']} captions, {store_bytes / 1e9:.2f} GB of "
        f"shards, {r['elapsed_s']:.1f}s); client RSS before {r['rss_before_mib']:.0f} MiB, peak "
        f"{r['peak_rss_mib']:.0f} MiB (+{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB)"
    )


def bench_memory(args) -> None:
    print(
        f"# client memory: fake encoder, embeddings [512, 12] bf16 (12 KiB), default batch/concurrency/shards; {_machine()}"
    )
    with Server(fake=True, hidden=4) as server:
        for n in args.counts:
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                captions = Path(tmp) / "captions.txt"
                captions.write_text("\n".join(_captions(n, " mem")) + "\n")
                r = _run_client(
                    server.target, captions, Path(tmp) / "store", batch=None, concurrency=None, shard_mb=None
                )
            print(
                f"{n:7d} captions: {r['encoded'] / r['elapsed_s']:7.0f} captions/s, client RSS before "
                f"{r['rss_before_mib']:.0f} MiB, peak {r['peak_rss_mib']:.0f} MiB "
                f"(+{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB)"
            )


def bench_resume(args) -> None:
    from dit_client.training import EmbeddingStore

    n = args.captions
    shard_mb = 1.0  # 85 rows of 12 KiB
    print(f"# resume after kill -9: fake encoder, {n} captions, [512, 12] bf16, {shard_mb} MiB shards; {_machine()}")
    with Server(fake=True, hidden=4) as server, tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        captions = Path(tmp) / "captions.txt"
        captions.write_text("\n".join(_captions(n, " resume")) + "\n")
        out = Path(tmp) / "store"
        cmd = [
            sys.executable,
            SCRIPT,
            "_client",
            "--encoder",
            server.target,
            "--captions",
            str(captions),
            "--out",
            str(out),
            "--shard-mb",
            str(shard_mb),
        ]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shards_total = -(-n // int(shard_mb * 2**20 // (512 * 12 * 2)))
        while len(list(out.glob("shard-*.safetensors"))) < shards_total // 2:
            if proc.poll() is not None:
                raise RuntimeError("the client finished before it could be killed; use more captions")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_after = time.perf_counter() - t0
        kept = len(EmbeddingStore(out))
        leftovers = len(list(out.glob(".*.tmp")))
        t1 = time.perf_counter()
        r = _run_client(server.target, captions, out, batch=None, concurrency=None, shard_mb=shard_mb)
        rerun = time.perf_counter() - t1
        store = EmbeddingStore(out)
        assert len(store) == n and r["already_stored"] + r["encoded"] == n
    print(
        f"killed after {killed_after:.1f}s with {kept} captions in the index ({leftovers} unfinished temp files); "
        f"rerun kept {r['already_stored']}, encoded {r['encoded']}, took {rerun:.1f}s (process start included); "
        f"store ends with {n} captions, each once"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--captions", type=int, default=16, help="captions per round")
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--batch", type=int, default=8)
    tr = sub.add_parser("transport")
    tr.add_argument("--captions", type=int, default=96)
    tr.add_argument("--tmp", default=None, help="folder for the temporary store (needs ~1.6 GB)")
    m = sub.add_parser("memory")
    m.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    m.add_argument("--tmp", default=None)
    r = sub.add_parser("resume")
    r.add_argument("--captions", type=int, default=20_000)
    r.add_argument("--tmp", default=None)
    s = sub.add_parser("_serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--hidden", type=int, required=True)
    s.add_argument("--fake", action="store_true")
    s.add_argument("--metrics-port", type=int, default=None)
    c = sub.add_parser("_client")
    c.add_argument("--encoder", required=True)
    c.add_argument("--captions", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--batch", type=int, default=None)
    c.add_argument("--concurrency", type=int, default=None)
    c.add_argument("--shard-mb", type=float, default=None, help="default: the library's")
    args = p.parse_args()
    {
        "throughput": bench_throughput,
        "transport": bench_transport,
        "memory": bench_memory,
        "resume": bench_resume,
        "_serve": _serve,
        "_client": _client,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
