"""Reference text-encoder forward vs the server's truncated forward, on CPU.

    .venv/bin/python benchmarks/encoder_forward.py [--family dev|klein] [--batches 1 4] [--repeats 3]
    .venv/bin/python benchmarks/encoder_forward.py --compute packed [--rows 127] [--batches 1 8 32]

``--compute exact`` (the default) is the comparison below. ``--compute packed``
times the server's two compute modes against each other instead (see
:func:`packed_main`): ``compute="exact"`` (512 tokens per prompt) and
``compute="packed"`` (only the real tokens), on prompts of realistic length, and
reports packed's fidelity next to the reference's own noise.

The model is FLUX.2-dev's text encoder at the Mistral-Small depth and vocab
(40 layers, vocab 131072, 32 query / 8 KV heads) scaled down in width
(hidden 512, head_dim 16, intermediate 3276, i.e. 1/10 of 5120 / 32768), with
random weights saved in bf16 and loaded through ``from_pretrained`` exactly as
real weights are. Both sides get the same 512-token inputs:

- reference: ``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` on a full
  ``Mistral3ForConditionalGeneration`` (all 40 layers, lm_head on every position);
- ours: ``encoder_server.text_encoder.TruncatedMistral3Encoder.encode``
  (embedding + 30 layers, no lm_head, no vision tower).

Reported per batch size: time per batch (best of ``--repeats`` runs after one
warm-up, the two sides alternating; both include tokenization), speed ratio
(ratio of the best times), bit-exact flag
(``torch.equal``), and memory, each variant measured in its own subprocess:
parameter bytes of the loaded model, process RSS after one warm-up forward
(the weights are memory-mapped and paged in on first use), and the peak RSS
of the next forward (Linux VmHWM, reset before it), both relative to the RSS
of the process before the model was loaded.

At this width the 131072-row embedding and lm_head weigh far more, relative
to the layers, than at full width, so the measured ratios are not the
full-scale ones; the full-scale figures are computed from parameter and FLOP
counts of the real config (encoder_server/memory.py) and printed at the end.

``--family klein`` runs the same comparison for FLUX.2 [klein] 4B's text
encoder: Qwen3-4B's depth, heads and vocab (36 layers, 32 query / 8 KV heads,
vocab 151936, tied embeddings; common/configs/qwen3_4b_text_encoder.json)
scaled to 1/10 of the width (hidden 256, head_dim 8, intermediate 973), with
the demo's Qwen chat-template tokenizer. Reference:
``Flux2KleinPipeline._get_qwen3_prompt_embeds`` on the full ``Qwen3ForCausalLM``
(36 layers, lm_head on every position); ours: ``TruncatedTextEncoder``
(embedding + 27 layers, no lm_head), which picks the Qwen3 recipe from the folder.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

WIDTH = dict(hidden_size=512, head_dim=16, intermediate_size=3276, num_attention_heads=32, num_key_value_heads=8)
# Qwen3-4B (hidden 2560, intermediate 9728) at 1/10 width; 32 x 8 = hidden, as 32 x 16 is for [dev].
KLEIN_WIDTH = dict(hidden_size=256, head_dim=8, intermediate_size=973, num_attention_heads=32, num_key_value_heads=8)
KLEIN_CONFIG = "qwen3_4b_text_encoder.json"
PROMPTS = [
    "a red fox in fresh snow, morning light",
    "Isometric illustration of a tiny bakery at night, warm windows, rain on the cobblestones, 35mm film grain",
    "ünïcödé ☃ [INST] literal tags [/INST] and an empty line\n\nafter it",
    "A very long prompt. " * 60,  # past 512 tokens: truncated like the reference
]


# -- model ----------------------------------------------------------------


def build_scaled_model(folder: Path, seed: int = 0) -> Path:
    """Write ``text_encoder/`` (bf16, random) and ``tokenizer/`` at the scaled Mistral-Small shape."""
    from transformers import Mistral3ForConditionalGeneration

    from common.demo import TinyFlux2Spec, build_tiny_flux2
    from encoder_server.memory import load_config

    # The demo tokenizer (byte-level, Mistral control tokens, chat template):
    # its ids are all valid in a 131072-row vocab.
    build_tiny_flux2(folder / "tok", TinyFlux2Spec(with_dit=False))
    (folder / "tok" / "tokenizer").rename(folder / "tokenizer")

    config = load_config()  # the real FLUX.2-dev config, then narrowed
    config.text_config.update({**WIDTH, "pad_token_id": 11, "bos_token_id": 1, "eos_token_id": 2})
    # Vision tower narrowed 8x too: it is never run, only loaded by the reference.
    config.vision_config.update(dict(hidden_size=128, intermediate_size=512, head_dim=8))
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder / "text_encoder")
    return folder


def build_scaled_klein_model(folder: Path, seed: int = 0) -> Path:
    """Write ``text_encoder/`` (bf16, random) and ``tokenizer/`` at the scaled Qwen3-4B shape."""
    from transformers import Qwen3ForCausalLM

    from common.demo import TinyKleinSpec, build_tiny_klein
    from encoder_server.memory import default_config_path, load_config

    # The demo [klein] tokenizer (byte-level, Qwen control tokens, Qwen-style chat
    # template): its ids are all valid in a 151936-row vocab.
    build_tiny_klein(folder / "tok", TinyKleinSpec(with_dit=False))
    (folder / "tok" / "tokenizer").rename(folder / "tokenizer")
    from encoder_server.text_encoder import load_tokenizer

    tok = load_tokenizer(folder / "tokenizer")
    config = load_config(default_config_path(KLEIN_CONFIG))  # the real Qwen3-4B config, then narrowed
    config.update(
        {
            **KLEIN_WIDTH,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        }
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folder / "text_encoder")
    return folder


# -- measurement helpers --------------------------------------------------


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed arenas mapped; hand them back so RSS means "live"
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def load_reference(folder: Path, family: str = "dev"):
    import transformers

    from encoder_server.text_encoder import load_tokenizer

    cls = getattr(transformers, FAMILIES[family].reference_class)
    model = cls.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16).eval()
    return model, load_tokenizer(folder / "tokenizer")


def load_truncated(folder: Path, family: str = "dev"):
    from common.model_source import resolve_model
    from encoder_server import text_encoder

    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    cls = getattr(text_encoder, FAMILIES[family].truncated_class)
    return cls(source, device=torch.device("cpu"), dtype=torch.bfloat16)


def run_reference(model_and_tok, prompts: list[str], family: str = "dev", **kwargs) -> torch.Tensor:
    import diffusers

    pipeline_class, function = FAMILIES[family].reference_function.split(".")
    model, tok = model_and_tok
    with torch.inference_mode():
        return getattr(getattr(diffusers, pipeline_class), function)(model, tok, prompts, **kwargs)


def run_truncated(backend, prompts: list[str]) -> torch.Tensor:
    return backend.encode(prompts).embeddings


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def batch_prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def child(variant: str, folder: Path, batch: int, family: str = "dev") -> dict:
    """Memory of one variant, alone in this process (run via ``--child``)."""
    from functools import partial

    import diffusers.pipelines.flux2.pipeline_flux2  # noqa: F401  (import cost is part of the baseline)
    import transformers  # noqa: F401 - imported for its load time

    if family == "klein":
        import diffusers.pipelines.flux2.pipeline_flux2_klein  # noqa: F401 - imported for its load time

    _release_freed_memory()
    base = _proc_status_kb("VmRSS")
    if variant == "reference":
        loaded = load_reference(folder, family)
        weights = param_bytes(loaded[0])
        run = partial(run_reference, family=family)
    else:
        loaded = load_truncated(folder, family)
        weights = param_bytes(loaded._lm)
        run = run_truncated
    prompts = batch_prompts(batch)
    # safetensors weights are memory-mapped and paged in on first use, so
    # "resident" is measured after one warm-up forward, as a serving process sees it.
    run(loaded, prompts)
    _release_freed_memory()
    steady = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    run(loaded, prompts)
    forward_peak = _proc_status_kb("VmHWM")
    return {
        "weights_bytes": weights,
        "resident_bytes": steady - base,
        "forward_peak_bytes": forward_peak - base,
    }


def measure_memory(variant: str, folder: Path, batch: int, family: str = "dev") -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--model-dir",
            str(folder),
            "--batches",
            str(batch),
            "--family",
            family,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_pair(fn_a, fn_b, repeats: int):
    """Time two callables alternately (a, b, a, b, ...) after one warm-up call each.

    Alternating spreads background load on a shared machine over both sides.
    Returns per side the best wall time (seconds) and the last output.
    """
    outs = [fn_a(), fn_b()]
    walls: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            outs[i] = fn()
            walls[i].append(time.perf_counter() - t0)
    return [(min(walls[i]), outs[i]) for i in range(2)]


# -- --compute packed ------------------------------------------------------

# Real-token rows of realistic FLUX.2-dev prompts, counted with the Tekken tokenizer
# (docs/benchmarks.md, FLUX2_FACTS.md): a short prompt, a structured JSON prompt, the
# model card's hermit-crab prompt. Their median, 127, is the goal's prompt.
REALISTIC_ROWS = (43, 127, 132)
CAPTION = (
    "a hermit crab in a shell made of a tiny glass terrarium, moss and ferns inside, on wet sand at low tide, "
    "soft morning light, shallow depth of field, macro photograph, waves in the background, "
)


def load_compute(folder: Path, compute: str, dtype=torch.bfloat16):
    """The server's encoder in one compute mode, without the system message (see :func:`prompts_with_rows`)."""
    from dataclasses import replace

    from common.encoder_spec import FLUX2_DEV
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(
        source, device=torch.device("cpu"), dtype=dtype, spec=replace(FLUX2_DEV, system_message=""), compute=compute
    )


def prompts_with_rows(backend, rows: list[int]) -> list[str]:
    """Distinct prompts whose templated token counts are exactly ``rows`` under ``backend``'s tokenizer.

    The demo tokenizer makes one token per byte, so FLUX.2-dev's 500-character system
    message alone would fill 173 rows; the benchmark drops it (``system_message=""``,
    in both the server and the reference) and sizes plain-text prompts so that each fills
    as many rows as the realistic prompt does with the real tokenizer, system message included.
    """
    overhead = backend.encode([""]).token_counts[0]
    prompts = []
    for i, n in enumerate(rows):
        text = f"{i}: " + CAPTION * (1 + n // len(CAPTION))
        prompts.append(text[: n - overhead])
    counts = backend.tokenize(prompts)[0]["attention_mask"].sum(dim=1).tolist()
    if counts != list(rows):
        raise RuntimeError(f"prompt sizing failed: wanted {rows}, got {counts}")
    return prompts


def image_difference() -> list[str]:
    """Pixels of a tiny FLUX.2 pipeline (fixed seed) fed packed vs exact embeddings, per dtype.

    The tiny demo model (hidden 16, random weights), because the scaled model has no DiT;
    the embeddings are cast to the pipeline's float32, 64x64, 4 steps.
    """
    import numpy as np
    from diffusers import Flux2Pipeline

    from common.demo import TinyFlux2Spec, build_tiny_flux2
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedTextEncoder

    lines = [
        "| embeddings dtype | embeddings max abs diff | image max abs diff before 8-bit rounding (0-1) | "
        "8-bit pixels differing | 8-bit max abs diff (0-255) |",
        "|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="flux2-tiny-") as tmp:
        folder = build_tiny_flux2(Path(tmp), TinyFlux2Spec())
        pipe = Flux2Pipeline.from_pretrained(folder, text_encoder=None, tokenizer=None, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
        prompts = [PROMPTS[0], PROMPTS[1]]
        for dtype in (torch.float32, torch.bfloat16):
            images, embeds = [], []
            for compute in ("exact", "packed"):
                enc = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=dtype, compute=compute)
                embeds.append(enc.encode(prompts).embeddings.to(torch.float32))
                out = pipe(
                    prompt_embeds=embeds[-1],
                    height=64,
                    width=64,
                    num_inference_steps=4,
                    guidance_scale=4.0,
                    generator=torch.Generator("cpu").manual_seed(0),
                    output_type="np",
                ).images
                images.append(np.asarray(out, dtype=np.float64))
            as_8bit = [np.round(image * 255).astype(np.int16) for image in images]
            diff8 = np.abs(as_8bit[0] - as_8bit[1])
            lines.append(
                f"| {str(dtype).removeprefix('torch.')} | {(embeds[0] - embeds[1]).abs().max():.3g} | "
                f"{np.abs(images[0] - images[1]).max():.3g} | {100 * (diff8 > 0).mean():.2f}% | "
                f"{diff8.max()} |"
            )
    return lines


def packed_main(args) -> int:
    """``--compute packed``: exact vs packed throughput at ``--rows``, and fidelity next to the noise floor."""
    from encoder_server.fidelity import compare

    with tempfile.TemporaryDirectory(prefix="flux2-bench-") as tmp:
        folder = args.model_dir
        if folder is None or not (folder / "text_encoder").is_dir():
            folder = folder or Path(tmp)
            t0 = time.perf_counter()
            build_scaled_model(folder)
            print(f"built the scaled model in {time.perf_counter() - t0:.0f}s at {folder}", file=sys.stderr)
        exact, packed = load_compute(folder, "exact"), load_compute(folder, "packed")
        print(
            f"# Encoder forward, exact vs packed: {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, bf16, scaled model (40 layers, 30 run, "
            f"hidden 512), {args.repeats} alternating runs each; load average at start {os.getloadavg()[0]:.2f}"
        )
        print()
        print(f"Throughput, every prompt {args.rows} real rows of 512 (best of the runs):")
        print()
        print("| batch | exact s/batch | packed s/batch | exact prompts/s | packed prompts/s | packed / exact |")
        print("|---:|---:|---:|---:|---:|---:|")
        for batch in args.batches:
            prompts = prompts_with_rows(exact, [args.rows] * batch)
            (t_exact, _), (t_packed, _) = time_pair(
                lambda p=prompts: exact.encode(p).embeddings,
                lambda p=prompts: packed.encode(p).embeddings,
                args.repeats,
            )
            print(
                f"| {batch} | {t_exact:.2f} | {t_packed:.2f} | {batch / t_exact:.2f} | {batch / t_packed:.2f} | "
                f"{t_exact / t_packed:.2f}x |",
                flush=True,
            )

        # Fidelity on one batch of 8 mixed realistic prompts (43, 127, 132 rows, cycled).
        rows = [REALISTIC_ROWS[i % len(REALISTIC_ROWS)] for i in range(8)]
        prompts = prompts_with_rows(exact, rows)
        mask = exact.tokenize(prompts)[0]["attention_mask"].bool()
        e_exact = exact.encode(prompts).embeddings
        e_packed = packed.encode(prompts).embeddings
        reference = run_reference(load_reference(folder), prompts, system_message="")
        e_alone = torch.cat([exact.encode([p]).embeddings for p in prompts])
        p_alone = torch.cat([packed.encode([p]).embeddings for p in prompts])
        exact32 = load_compute(folder, "exact", torch.float32)
        e32 = exact32.encode(prompts).embeddings
        del exact32
        print()
        print(
            f"Fidelity, batch of 8 prompts of {', '.join(map(str, rows))} real rows, bf16, over the "
            f"{int(mask.sum())} real rows (pad rows: see below):"
        )
        print()
        print(
            "| compared | max abs diff | mean abs diff | max diff in ulps of the row's largest element | "
            "min cosine per row | bit-identical rows |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, a, b in [
            ("exact vs reference (diffusers `_get_mistral_3_small_prompt_embeds`)", e_exact, reference),
            ("packed vs reference", e_packed, reference),
            ("noise floor 1: reference at batch 1 vs batch 8 (exact path, bit-exact with it)", e_alone, e_exact),
            ("packed at batch 1 vs packed at batch 8", p_alone, e_packed),
            ("noise floor 2: bf16 reference vs fp32 reference (exact path)", e_exact, e32),
            ("packed bf16 vs fp32 reference", e_packed, e32),
        ]:
            print(f"| {name} | {compare(a, b, mask).cells()} |")
        pads_equal = torch.equal(e_packed[~mask], reference[~mask])
        print(
            f"\nPad rows (the other {int((~mask).sum())} rows): packed's, from the pad table, are "
            f"{'bit-identical to' if pads_equal else 'NOT equal to'} the reference's."
        )
        print(f"Load average at end {os.getloadavg()[0]:.2f}.")
    if args.images:
        print()
        print("Images from packed vs exact embeddings (tiny demo pipeline, seed 0, 64x64, 4 steps, 2 prompts):")
        print()
        print("\n".join(image_difference()))
    return 0


# -- main -----------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What differs between the [dev] and [klein] comparisons; everything else is shared."""

    build: object  # (folder) -> folder: the scaled model's text_encoder/ and tokenizer/
    reference_class: str  # in transformers
    reference_function: str  # "Pipeline.method" in diffusers
    truncated_class: str  # in encoder_server.text_encoder
    config_name: str  # the bundled real config (encoder_server/memory.py)
    full_scale_label: str
    goals: bool  # print the FLUX.2-dev goal column
    title: str  # after "# Encoder forward" in the header


FAMILIES = {
    "dev": Family(
        build_scaled_model,
        "Mistral3ForConditionalGeneration",
        "Flux2Pipeline._get_mistral_3_small_prompt_embeds",
        "TruncatedMistral3Encoder",
        "flux2_dev_text_encoder.json",
        "FLUX.2-dev config",
        True,
        "",
    ),
    "klein": Family(
        build_scaled_klein_model,
        "Qwen3ForCausalLM",
        "Flux2KleinPipeline._get_qwen3_prompt_embeds",
        "TruncatedTextEncoder",
        KLEIN_CONFIG,
        "FLUX.2 [klein] 4B's Qwen3-4B config",
        False,
        ", FLUX.2 [klein] (Qwen3, 36 layers, 27 run, hidden 256, vocab 151936)",
    ),
}


def scaled_prediction(folder: Path) -> str:
    """What parameter and FLOP counts predict for the scaled model itself (to check the measurement)."""
    from encoder_server.memory import bf16_bytes, count_parameters, forward_flops, load_config

    config = load_config(folder / "text_encoder" / "config.json")
    counts = count_parameters(config)
    flops = forward_flops(counts, config)
    return (
        f"Predicted by FLOP and parameter counts for this scaled model: {flops.speedup:.2f}x speed, "
        f"{bf16_bytes(counts.truncated) / bf16_bytes(counts.full):.2f}x weights."
    )


def full_scale_lines(family: str = "dev") -> list[str]:
    from encoder_server.memory import bf16_bytes, count_parameters, default_config_path, forward_flops, load_config

    fam = FAMILIES[family]
    config = load_config(default_config_path(fam.config_name))
    counts = count_parameters(config)
    flops = forward_flops(counts, config)
    ratio = bf16_bytes(counts.truncated) / bf16_bytes(counts.full)
    goals = (
        (
            f" | >= 1.35x: {'met' if flops.speedup >= 1.35 else 'MISSED'}",
            f" | <= 0.73x: {'met' if ratio <= 0.73 else 'MISSED'}",
        )
        if fam.goals
        else ("", "")
    )
    return [
        "",
        f"Full scale ({fam.full_scale_label} on the meta device, encoder_server/memory.py; computed, not timed):",
        "",
        "| | reference | truncated | ratio |" + (" goal |" if fam.goals else ""),
        "|---|---:|---:|---:|" + ("---|" if fam.goals else ""),
        f"| forward FLOPs per prompt (512 tokens) | {flops.reference / 1e12:.2f} T | {flops.truncated / 1e12:.2f} T "
        f"| {flops.speedup:.3f}x throughput{goals[0]} |",
        f"| bf16 weights | {bf16_bytes(counts.full) / 1e9:.2f} GB | {bf16_bytes(counts.truncated) / 1e9:.2f} GB "
        f"| {ratio:.3f}x{goals[1]} |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="dev",
        help="dev: scaled Mistral-Small (FLUX.2-dev); klein: scaled Qwen3-4B (FLUX.2 [klein] 4B)",
    )
    parser.add_argument(
        "--compute",
        choices=["exact", "packed"],
        default="exact",
        help="exact: reference vs the server's exact forward; packed: exact vs packed compute",
    )
    parser.add_argument("--rows", type=int, default=127, help="--compute packed: real rows per prompt (median: 127)")
    parser.add_argument("--images", action="store_true", help="--compute packed: also the tiny pipeline's pixels")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's). On a machine shared with other jobs, 1 avoids "
        "OpenMP threads waiting for each other at every op while the CPUs are taken",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 4 (exact), 1 8 32 (packed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a folder built by an earlier run")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--child", choices=["reference", "truncated"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = [1, 8, 32] if args.compute == "packed" else [1, 4]
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.batches[0], args.family)))
        return 0
    if args.compute == "packed":
        if args.family != "dev":
            parser.error("--compute packed runs the dev model only")
        return packed_main(args)
    fam = FAMILIES[args.family]

    with tempfile.TemporaryDirectory(prefix="flux2-bench-") as tmp:
        folder = args.model_dir
        if folder is None or not (folder / "text_encoder").is_dir():
            folder = folder or Path(tmp)
            t0 = time.perf_counter()
            fam.build(folder)
            print(f"built the scaled model in {time.perf_counter() - t0:.0f}s at {folder}", file=sys.stderr)

        reference = load_reference(folder, args.family)
        truncated = load_truncated(folder, args.family)
        print(
            f"# Encoder forward{fam.title}: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, bf16, 512 tokens, {args.repeats} alternating runs each; "
            f"load average at start {os.getloadavg()[0]:.2f}"
        )
        print()
        print(
            "| batch | reference s/batch | truncated s/batch | speed ratio | bit-exact | "
            "weights ref / ours MB (ratio) | resident RSS ref / ours MB (ratio) | "
            "forward peak RSS ref / ours MB (ratio) |"
        )
        print("|---:|---:|---:|---:|---|---|---|---|")
        for batch in args.batches:
            prompts = batch_prompts(batch)
            (t_ref, e_ref), (t_ours, e_ours) = time_pair(
                lambda p=prompts: run_reference(reference, p, args.family),
                lambda p=prompts: run_truncated(truncated, p),
                args.repeats,
            )
            exact = torch.equal(e_ref, e_ours) and e_ref.dtype == e_ours.dtype
            mem_cells = ["not measured"] * 3
            if not args.no_memory:
                ref_m = measure_memory("reference", folder, batch, args.family)
                our_m = measure_memory("truncated", folder, batch, args.family)
                mem_cells = [
                    f"{ref_m[k] / 1e6:.0f} / {our_m[k] / 1e6:.0f} ({our_m[k] / ref_m[k]:.2f}x)"
                    for k in ("weights_bytes", "resident_bytes", "forward_peak_bytes")
                ]
            print(
                f"| {batch} | {t_ref:.2f} | {t_ours:.2f} | {t_ref / t_ours:.2f}x | "
                f"{'yes' if exact else 'NO'} | " + " | ".join(mem_cells) + " |",
                flush=True,
            )
        print(
            f"\nTimes: best wall time of the runs (the least disturbed by other load). "
            f"Load average at end {os.getloadavg()[0]:.2f}."
        )
        print(scaled_prediction(folder))
        print("\n".join(full_scale_lines(args.family)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
