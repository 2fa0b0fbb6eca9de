"""Training store size, version 1 (full [512, D] per caption) vs version 2 (real rows + pad count + CRC-32C).

    PYTHONPATH=/path/to/mistral-common .venv/bin/python benchmarks/store_size.py [--captions 10000] [--dim 15360]

What is measured and what is computed:

1. Token counts (measured): every caption of ``CAPTIONS`` below is counted with the
   Tekken tokenizer that ``mistral-common`` ships (``mistral_common/data/tekken_240911.json``;
   FLUX.2-dev's own tokenizer cannot be downloaded here). Rows an embedding fills
   = caption tokens + ``PROMPT_OVERHEAD`` (the FLUX.2 system message, 28 tokens, plus BOS
   and the chat template, 5: 33 in all, as docs/benchmarks.md and FLUX2_FACTS.md
   calibrate it: "a red fox sitting in fresh snow, golden hour" = 10 tokens = 43 rows).
2. Sample stores (measured): one real version 1 store (the version 1 layout:
   ``"embeddings" [N, 512, D]`` per shard, written with safetensors exactly as the
   version 1 writer did) and one real version 2 store (:class:`StoreWriter`, a
   random ``[512, D]`` pad table, embeddings = the table's first ``512 - rows`` rows then
   random rows), of the ``CAPTIONS`` once each, at the real row width ``D`` in bf16.
   Their files are summed: shard bytes (header + rows), index, pad table.
3. 10,000 captions (computed): the sample's caption lengths are repeated
   (``--captions`` in all). Row bytes are exact (rows x D x 2); the rest (shard
   headers per caption, index per shard, the pad table) is the sample's measured
   overhead scaled per caption, plus the pad table once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dit_client.training.store import (  # noqa: E402
    DEFAULT_SHARD_BYTES,
    FORMAT,
    INDEX_NAME,
    EmbeddingStore,
    StoreInfo,
    StoreWriter,
)

PROMPT_OVERHEAD = 33
ROWS = 512

# Training captions of three common kinds, ten each: trigger-word / DreamBooth style,
# one-sentence BLIP/COCO-style captions, and the detailed paragraphs a VLM recaptioner writes.
CAPTIONS = [
    # short
    "a photo of sks dog",
    "sks person, portrait",
    "a photo of a tok teapot on a table",
    "ohwx woman smiling",
    "a plush toy of zwx bear in a garden",
    "sks style painting of a lighthouse",
    "a product photo of a red sneaker",
    "a cat on a windowsill",
    "tok logo, flat vector",
    "a photo of sks backpack on a mountain trail",
    # one sentence
    "a man in a blue jacket riding a bicycle down a wet city street at night",
    "two children building a sandcastle on a sunny beach with waves in the background",
    "a bowl of ramen with a soft boiled egg, green onions and slices of pork on a wooden table",
    "an old stone bridge over a calm river surrounded by autumn trees",
    "a close up photograph of a hummingbird drinking from a red flower",
    "a modern living room with a grey sofa, a large window and a potted plant",
    "a vintage red car parked in front of a small diner in the desert",
    "a woman reading a book in a cafe, warm light coming through the window",
    "a snowy mountain peak at sunrise reflected in a still alpine lake",
    "a golden retriever puppy playing with a tennis ball on green grass",
    # detailed paragraph
    "The image shows a narrow cobblestone street in an old European town at dusk. Warm yellow light spills from "
    "the windows of three-story houses painted in pastel colors, and flower boxes with red geraniums hang below "
    "the windows. A lone cyclist in a dark coat rides away from the viewer, slightly blurred by motion. Wet "
    "stones reflect the lamps, suggesting it has just rained.",
    "A studio product shot of a matte black wireless headphone set resting on a light grey concrete pedestal. "
    "Soft diffused lighting from the left creates a gentle gradient on the background and a subtle shadow to "
    "the right. The ear cushions are made of brown leather with visible stitching, and a small silver logo is "
    "embossed on the headband.",
    "This is a detailed illustration in a watercolor style of a fox curled up asleep under a large oak tree in "
    "a snowy forest. The fox's orange fur contrasts with the blue and white tones of the snow, and small "
    "birds perch on the branches above. Loose brush strokes and splashes of paint give the scene a soft, "
    "dreamlike quality.",
    "A candid photograph of an elderly fisherman mending a net on a wooden dock early in the morning. He wears a "
    "knitted cap and a yellow raincoat, and his weathered hands hold a wooden needle. Behind him, several small "
    "boats are moored in a harbor covered by light fog, and seagulls stand on the posts.",
    "The picture is an aerial view of a winding river cutting through a dense green rainforest. The water is "
    "brown with sediment and forms several tight meanders, and a thin layer of mist hangs over the canopy. In "
    "the lower right corner a small clearing with a few thatched huts is visible.",
    "A cozy bedroom interior photographed with natural light: an unmade bed with white linen sheets, a knitted "
    "throw in mustard yellow, a wooden nightstand with a ceramic lamp and a stack of books. A large window on "
    "the left looks out onto green trees, and a cat sleeps at the foot of the bed.",
    "A digital painting of a futuristic city at night, with tall glass towers covered in neon signs in pink and "
    "cyan. Flying vehicles leave light trails between the buildings, and a crowd with umbrellas fills the "
    "street below. The style is highly detailed, with a cinematic wide-angle composition and rain in the air.",
    "A macro photograph of a dew-covered spider web stretched between two blades of grass. Each droplet is "
    "sharply in focus and refracts the morning sun, while the background is a smooth green and gold bokeh. "
    "A small brown spider sits slightly off center at the top of the web.",
    "The image depicts a traditional Japanese tea ceremony in a tatami room. A woman in a pale blue kimono kneels "
    "beside a low table and whisks matcha in a black ceramic bowl. Sliding paper doors are partly open to a "
    "garden with a stone lantern and a maple tree with red leaves.",
    "A fashion editorial photo of a young man standing on a rooftop at golden hour, wearing an oversized beige "
    "trench coat, a white t-shirt and dark trousers. The city skyline is softly out of focus behind him, his "
    "hair is moved by the wind, and the warm sunlight creates a rim light on his shoulders.",
]


def count_tokens() -> list[int]:
    try:
        import mistral_common
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError:
        sys.exit(
            "needs mistral-common (pip install --target DIR mistral-common; PYTHONPATH=DIR) for the Tekken tokenizer"
        )
    tokenizer = Tekkenizer.from_file(str(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"))
    return [len(tokenizer.encode(c, bos=False, eos=False)) for c in CAPTIONS]


def _dir_bytes(path: Path) -> dict[str, int]:
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != ".lock"}
    return {
        "shards": sum(v for k, v in files.items() if k.startswith("shard-")),
        "index": files.get(INDEX_NAME, 0),
        "pad_table": files.get("pad-table.safetensors", 0),
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

    tokens = count_tokens()
    rows = [min(ROWS, t + PROMPT_OVERHEAD) for t in tokens]
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
    med, p90 = statistics.median(rows), sorted(rows)[int(0.9 * (n - 1))]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, D={args.dim} bf16")
    print(f"caption tokens (Tekken): {sorted(tokens)}")
    print(f"rows per embedding (+{PROMPT_OVERHEAD}): min {min(rows)}, median {med}, p90 {p90}, max {max(rows)}")
    print(f"sample of {n} captions, measured on disk:")
    for name, m, t in (("v1", m1, t_v1), ("v2", m2, t_v2)):
        print(
            f"  {name}: {m['total']:,} B total = shards {m['shards']:,} B in {m['shard_files']} files "
            f"+ index {m['index']:,} B + pad table {m['pad_table']:,} B; written in {t:.1f} s"
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
