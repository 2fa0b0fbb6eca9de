"""Server cache entries, whole vs compact: bytes per prompt on disk and in memory, and what a hit costs.

    PYTHONPATH=/tmp/tekken .venv/bin/python benchmarks/cache_size.py [--dim 15360] [--repeats 20]

mistral-common (the Tekken tokenizer) is installed beside the project as the docstring of
benchmarks/realistic_prompts.py says; without it rows are estimated, and the output says so.

What is measured and what is computed:

1. Rows per prompt (measured): every prompt of benchmarks/realistic_prompts.py counted
   with the Tekken tokenizer (its :func:`row_counter`). The median and p90 prompt of the
   whole set are the ones reported.
2. Entry sizes (measured): for each of those row counts, one entry made as the engine
   makes it (:meth:`CachedEmbedding.compact`) from a ``[512, dim]`` bf16 embedding whose
   first ``512 - rows`` rows are a random pad table's, once without a table (whole, as a
   server without one or before compact entries stores it) and once with it; the disk
   cache writes it (``DiskCache.put``: the file's size) and the memory cache counts it
   (``MemoryCache.nbytes``). Each read back is checked bit-identical to the embedding.
3. Hit cost (measured): a memory-cache hit (``MemoryCache.get``: the CRC-32C check on
   every hit) and the rebuild of the full ``[512, dim]`` tensor from a compact entry
   (what an answer to a client without the pad table costs; an elided answer skips it:
   :func:`encoder_server.cache.rebuild_rows`, and next to it ``common.pad_table.rebuild``'s
   ``torch.cat``, which runs in torch's thread pool), best of ``--repeats``, torch's default threads.
4. Prompts per cache (computed): ``--memory-cache-mb 2048`` and ``--cache-max-gb 50``
   divided by the measured sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from benchmarks.realistic_prompts import MAX_ROWS, PROMPT_SET, percentile, row_counter
from common.pad_table import pad_table_id, rebuild
from encoder_server.cache import CachedEmbedding, DiskCache, MemoryCache
from encoder_server.engine import EncodedPrompt


def best_of(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=15360, help="embedding width (FLUX.2-dev: 15360)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    rows_of, counted_by = row_counter()
    rows = sorted(rows_of(p) for prompts in PROMPT_SET.values() for p in prompts)
    median, p90 = round(percentile(rows, 50)), round(percentile(rows, 90))
    print(
        f"# Cache entries, whole vs compact: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"bf16 rows of {args.dim}; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"\n{len(rows)} prompts, rows counted with {counted_by}: {rows[0]} to {rows[-1]}, median {median}, p90 {p90}.\n"
    )

    g = torch.Generator().manual_seed(0)
    table = torch.randn(MAX_ROWS, args.dim, generator=g).to(torch.bfloat16)
    table_id = pad_table_id("bench:0000000000000000", table)
    print(
        "| prompt | rows | disk file, whole | disk file, compact | compact / whole | memory counted, whole | "
        "memory counted, compact | memory hit, whole | memory hit, compact | rebuild [512, D] | same with torch.cat |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="flux2-cache-size-") as tmp:
        for name, n in (("median", median), ("p90", p90)):
            embedding = torch.cat([table[: MAX_ROWS - n], torch.randn(n, args.dim, generator=g).to(torch.bfloat16)])
            row = {}
            for form, with_table in (("whole", False), ("compact", True)):
                entry = CachedEmbedding.compact(embedding, n, False, table if with_table else None, table_id)
                assert entry.pad_count == (MAX_ROWS - n if with_table else 0)
                disk = DiskCache(Path(tmp) / f"{name}-{form}", 2**40)
                key = f"{form}{name}".ljust(64, "0")
                disk.put(key, entry)
                back = disk.get(key)
                assert torch.equal(back.full(table), embedding)
                memory = MemoryCache(2**40)
                memory.put(key, entry)
                hit_s = best_of(lambda m=memory, k=key: m.get(k), args.repeats)
                row[form] = (disk.path_of(key).stat().st_size, memory.nbytes, hit_s)
                if with_table:
                    answer = EncodedPrompt(
                        entry.embedding, n, False, 0, 0, 0, 0, True, entry.pad_count, table, table_id
                    )
                    assert torch.equal(answer.embedding, embedding)
                    rebuild_s = best_of(lambda e=entry: e.full(table), args.repeats)
                    cat_s = best_of(lambda e=entry: rebuild(e.embedding, e.pad_count, table), args.repeats)
            (dw, mw, hw), (dc, mc, hc) = row["whole"], row["compact"]
            sizes[name] = row
            print(
                f"| {name} | {n} | {dw:,} B | {dc:,} B | {dc / dw:.3f} | {mw:,} B | {mc:,} B | "
                f"{hw * 1e3:.2f} ms | {hc * 1e3:.2f} ms | {rebuild_s * 1e3:.2f} ms | {cat_s * 1e3:.2f} ms |"
            )
    print("\nPrompts per cache at the median prompt (computed from the sizes above):\n")
    print("| cache | whole | compact |")
    print("|---|---:|---:|")
    (dw, mw, _), (dc, mc, _) = sizes["median"]["whole"], sizes["median"]["compact"]
    print(f"| memory, --memory-cache-mb 2048 | {2048 * 2**20 // mw:,} | {2048 * 2**20 // mc:,} |")
    print(f"| disk, --cache-max-gb 50 | {50 * 2**30 // dw:,} | {50 * 2**30 // dc:,} |")
    print(f"\nLoad average at end {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
