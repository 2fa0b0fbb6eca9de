"""Training store size, version 1 (full [512, D] per caption) vs version 2 (real rows + pad count + CRC-32C).

    PYTHONPATH=/tmp/tekken .venv/bin/python benchmarks/store_size.py [--captions 10000] [--dim 15360]

mistral-common (the Tekken tokenizer) is installed beside the project as the docstring of
benchmarks/realistic_prompts.py says; without it rows are estimated, and the output says so.

What is measured and what is computed:

1. Rows per caption (measured): the training captions of benchmarks/realistic_prompts.py
   (``CAPTIONS``: alt-text, trigger-word and dense VLM captions), counted by its
   :func:`row_counter` (Tekken: system message + caption + the chat template's 5 tokens;
   "a red fox sitting in fresh snow, golden hour" = 43 rows).
2. Sample stores (measured): one real version 1 store (the version 1 layout:
   ``"embeddings" [N, 512, D]`` per shard, written with safetensors exactly as the
   version 1 writer did) and one real version 2 store (:class:`StoreWriter`, a
   random ``[512, D]`` pad table, embeddings = the table's first ``512 - rows`` rows then
   random rows), of the ``CAPTIONS`` once each, at the real row width ``D`` in bf16.
   Their files are summed: shard bytes (header + rows), index, pad table (both copies).
3. 10,000 captions (computed): the sample's caption lengths are repeated
   (``--captions`` in all). Row bytes are exact (rows x D x 2); the rest (shard
   headers per caption, index per shard) is the sample's measured overhead scaled
   per caption, plus the pad table's two copies once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from safetensors.torch import save_file

from benchmarks.realistic_prompts import CAPTIONS, MAX_ROWS, percentile, row_counter
from dit_client.training.store import (
    DEFAULT_SHARD_BYTES,
    FORMAT,
    INDEX_NAME,
    PAD_TABLE_NAMES,
    EmbeddingStore,
    StoreInfo,
    StoreWriter,
)

ROWS = MAX_ROWS


def _dir_bytes(path: Path) -> dict[str, int]:
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != ".lock"}
    return {
        "shards": sum(v for k, v in files.items() if k.startswith("shard-")),
        "index": files.get(INDEX_NAME, 0),
        "pad_table": sum(files.get(name, 0) for name in PAD_TABLE_NAMES),
        "total": sum(files.values()),
        "shard_files": sum(1 for k in files if k.startswith("shard-")),
    }


def write_v1(path: Path, info: StoreInfo, embeddings: list[torch.Tensor], captions: list[str]) -> None:
    """The version 1 layout, as its writer made it: [N, 512, D] per shard of at most 128 MiB."""
    path.mkdir()
    per_shard = max(1, DEFAULT_SHARD_BYTES // info.row_bytes)
    shards = []
    for k in range(0, len(captions), per_shard):
        name = f"shard-{k // per_shard:06d}-00000000.safetensors"
        part = captions[k : k + per_shard]
        meta = {"format": FORMAT, "fingerprint": info.fingerprint, "captions": json.dumps(part, ensure_ascii=False)}
        save_file({"embeddings": torch.stack(embeddings[k : k + per_shard])}, str(path / name), metadata=meta)
        shards.append({"file": name, "count": len(part), "bytes": (path / name).stat().st_size})
    index = {"format": FORMAT, "version": 1, **info.to_json(), "count": len(captions), "shards": shards}
    del index["pad_table"]
    (path / INDEX_NAME).write_text(json.dumps(index, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=10_000, help="store size to extrapolate to")
    parser.add_argument("--dim", type=int, default=15360, help="row width D (FLUX.2-dev: 15360)")
    args = parser.parse_args()

    rows_of, counted_by = row_counter()
    rows = [rows_of(c) for c in CAPTIONS]
    captions = [f"{i:02d} {c}" for i, c in enumerate(CAPTIONS)]  # distinct even if two were alike
    info = StoreInfo("flux2-dev:benchmark", torch.bfloat16, (ROWS, args.dim), "store-size-benchmark")
    g = torch.Generator().manual_seed(0)
    table = torch.randn((ROWS, args.dim), generator=g).to(torch.bfloat16)
    embeddings = [
        torch.cat([table[: ROWS - n], torch.randn((n, args.dim), generator=g).to(torch.bfloat16)]) for n in rows
    ]
    row_bytes = args.dim * 2

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        v1_dir, v2_dir = Path(tmp) / "v1", Path(tmp) / "v2"
        t0 = time.perf_counter()
        write_v1(v1_dir, info, embeddings, captions)
        t_v1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        with StoreWriter(v2_dir, info, pad_table=table) as writer:
            for c, e in zip(captions, embeddings, strict=True):
                writer.add(c, e)
        t_v2 = time.perf_counter() - t0
        store = EmbeddingStore(v2_dir)
        for c, e in zip(captions, embeddings, strict=True):  # lossless, and compact as counted
            assert torch.equal(store.get(c).view(torch.int16), e.view(torch.int16))
            assert store.get(c, compact=True)[1] == ROWS - rows[captions.index(c)]
        m1, m2 = _dir_bytes(v1_dir), _dir_bytes(v2_dir)

    n = len(CAPTIONS)
    v1_rows_sample = n * ROWS * row_bytes
    v2_rows_sample = sum(rows) * row_bytes
    v1_header_per_caption = (m1["shards"] - v1_rows_sample) / n
    v2_header_per_caption = (m2["shards"] - v2_rows_sample) / n
    index_per_caption_v1 = m1["index"] / n
    index_per_caption_v2 = m2["index"] / n
    big = args.captions
    reps = [rows[i % n] for i in range(big)]
    v1_total = big * ROWS * row_bytes + big * (v1_header_per_caption + index_per_caption_v1)
    v2_total = sum(reps) * row_bytes + big * (v2_header_per_caption + index_per_caption_v2) + m2["pad_table"]

    def per_caption_v2(r: int) -> float:
        return r * row_bytes + v2_header_per_caption

    per_caption_v1 = ROWS * row_bytes + v1_header_per_caption
    med, p90 = round(percentile(rows, 50)), round(percentile(rows, 90))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, D={args.dim} bf16")
    print(f"rows per embedding, counted with {counted_by}: {sorted(rows)}")
    print(f"  min {min(rows)}, median {med}, p90 {p90}, max {max(rows)}")
    print(f"sample of {n} captions, measured on disk:")
    for name, m, t in (("v1", m1, t_v1), ("v2", m2, t_v2)):
        print(
            f"  {name}: {m['total']:,} B total = shards {m['shards']:,} B in {m['shard_files']} files "
            f"+ index {m['index']:,} B + pad table (both copies) {m['pad_table']:,} B; written in {t:.1f} s"
        )
    print(
        f"  overhead per caption: v1 shard header {v1_header_per_caption:.0f} B + index {index_per_caption_v1:.0f} B; "
        f"v2 shard header {v2_header_per_caption:.0f} B + index {index_per_caption_v2:.0f} B"
    )
    print("per caption (rows exact, header measured):")
    print(
        f"  median caption: v1 {per_caption_v1 / 1e6:.2f} MB, v2 {per_caption_v2(med) / 1e6:.2f} MB "
        f"({per_caption_v2(med) / per_caption_v1:.3f} of v1)"
    )
    print(
        f"  p90 caption:    v1 {per_caption_v1 / 1e6:.2f} MB, v2 {per_caption_v2(p90) / 1e6:.2f} MB "
        f"({per_caption_v2(p90) / per_caption_v1:.3f} of v1)"
    )
    print(f"{big:,} captions (computed from the above):")
    print(f"  v1 {v1_total / 1e9:.1f} GB, v2 {v2_total / 1e9:.2f} GB ({v2_total / v1_total:.3f} of v1)")


if __name__ == "__main__":
    main()
