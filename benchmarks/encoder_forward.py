"""Reference text-encoder forward vs the server's truncated forward, on CPU.

    .venv/bin/python benchmarks/encoder_forward.py [--batches 1 4] [--repeats 3]

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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

WIDTH = dict(hidden_size=512, head_dim=16, intermediate_size=3276, num_attention_heads=32, num_key_value_heads=8)
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


def load_reference(folder: Path):
    from transformers import Mistral3ForConditionalGeneration

    from encoder_server.text_encoder import load_tokenizer

    model = Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16).eval()
    return model, load_tokenizer(folder / "tokenizer")


def load_truncated(folder: Path):
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


def run_reference(model_and_tok, prompts: list[str]) -> torch.Tensor:
    from diffusers import Flux2Pipeline

    model, tok = model_and_tok
    with torch.inference_mode():
        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(model, tok, prompts)


def run_truncated(backend, prompts: list[str]) -> torch.Tensor:
    return backend.encode(prompts).embeddings


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def batch_prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def child(variant: str, folder: Path, batch: int) -> dict:
    """Memory of one variant, alone in this process (run via ``--child``)."""
    import diffusers.pipelines.flux2.pipeline_flux2  # noqa: F401  (import cost is part of the baseline)
    import transformers  # noqa: F401

    _release_freed_memory()
    base = _proc_status_kb("VmRSS")
    if variant == "reference":
        loaded = load_reference(folder)
        weights = param_bytes(loaded[0])
        run = run_reference
    else:
        loaded = load_truncated(folder)
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


def measure_memory(variant: str, folder: Path, batch: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--model-dir", str(folder), "--batches", str(batch)],
        check=True, capture_output=True, text=True,
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


# -- main -----------------------------------------------------------------


def scaled_prediction(folder: Path) -> str:
    """What parameter and FLOP counts predict for the scaled model itself (to check the measurement)."""
    from encoder_server.memory import bf16_bytes, count_parameters, forward_flops, load_config

    config = load_config(folder / "text_encoder" / "config.json")
    counts = count_parameters(config)
    flops = forward_flops(counts, config)
    return (f"Predicted by FLOP and parameter counts for this scaled model: {flops.speedup:.2f}x speed, "
            f"{bf16_bytes(counts.truncated) / bf16_bytes(counts.full):.2f}x weights.")


def full_scale_lines() -> list[str]:
    from encoder_server.memory import bf16_bytes, count_parameters, forward_flops

    counts = count_parameters()
    flops = forward_flops(counts)
    ratio = bf16_bytes(counts.truncated) / bf16_bytes(counts.full)
    return [
        "",
        "Full scale (FLUX.2-dev config on the meta device, encoder_server/memory.py; computed, not timed):",
        "",
        "| | reference | truncated | ratio | goal |",
        "|---|---:|---:|---:|---|",
        f"| forward FLOPs per prompt (512 tokens) | {flops.reference / 1e12:.2f} T | {flops.truncated / 1e12:.2f} T "
        f"| {flops.speedup:.3f}x throughput | >= 1.35x: {'met' if flops.speedup >= 1.35 else 'MISSED'} |",
        f"| bf16 weights | {bf16_bytes(counts.full) / 1e9:.2f} GB | {bf16_bytes(counts.truncated) / 1e9:.2f} GB "
        f"| {ratio:.3f}x | <= 0.73x: {'met' if ratio <= 0.73 else 'MISSED'} |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a folder built by an earlier run")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--child", choices=["reference", "truncated"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.batches[0])))
        return 0

    with tempfile.TemporaryDirectory(prefix="flux2-bench-") as tmp:
        folder = args.model_dir
        if folder is None or not (folder / "text_encoder").is_dir():
            folder = folder or Path(tmp)
            t0 = time.perf_counter()
            build_scaled_model(folder)
            print(f"built the scaled model in {time.perf_counter() - t0:.0f}s at {folder}", file=sys.stderr)

        reference = load_reference(folder)
        truncated = load_truncated(folder)
        print(f"# Encoder forward: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, bf16, 512 tokens, {args.repeats} alternating runs each; "
              f"load average at start {os.getloadavg()[0]:.2f}")
        print()
        print("| batch | reference s/batch | truncated s/batch | speed ratio | bit-exact | "
              "weights ref / ours MB (ratio) | resident RSS ref / ours MB (ratio) | "
              "forward peak RSS ref / ours MB (ratio) |")
        print("|---:|---:|---:|---:|---|---|---|---|")
        for batch in args.batches:
            prompts = batch_prompts(batch)
            (t_ref, e_ref), (t_ours, e_ours) = time_pair(
                lambda p=prompts: run_reference(reference, p),
                lambda p=prompts: run_truncated(truncated, p),
                args.repeats,
            )
            exact = torch.equal(e_ref, e_ours) and e_ref.dtype == e_ours.dtype
            mem_cells = ["not measured"] * 3
            if not args.no_memory:
                ref_m, our_m = measure_memory("reference", folder, batch), measure_memory("truncated", folder, batch)
                mem_cells = [
                    f"{ref_m[k] / 1e6:.0f} / {our_m[k] / 1e6:.0f} ({our_m[k] / ref_m[k]:.2f}x)"
                    for k in ("weights_bytes", "resident_bytes", "forward_peak_bytes")
                ]
            print(f"| {batch} | {t_ref:.2f} | {t_ours:.2f} | {t_ref / t_ours:.2f}x | "
                  f"{'yes' if exact else 'NO'} | " + " | ".join(mem_cells) + " |", flush=True)
        print(f"\nTimes: best wall time of the runs (the least disturbed by other load). "
              f"Load average at end {os.getloadavg()[0]:.2f}.")
        print(scaled_prediction(folder))
        print("\n".join(full_scale_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
