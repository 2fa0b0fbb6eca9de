"""Full-size FLUX.2 text encoders on a GPU: reference forward vs the server's truncated forward.

    .venv/bin/python benchmarks/gpu_encoder.py                 # on a CUDA machine (H100 80 GB: < 5 min for dev)
    .venv/bin/python benchmarks/gpu_encoder.py --models klein-4b klein-9b   # FLUX.2 [klein]'s Qwen3 encoders only
    .venv/bin/python benchmarks/gpu_encoder.py --dry-run       # tiny configs on the CPU: checks the logic
    .venv/bin/python benchmarks/gpu_encoder.py --upsampling [--batches 1 4] [--dry-run]   # prompt upsampling

``--upsampling`` times prompt upsampling instead (docs/upsampling.md): the whole
FLUX.2-dev text encoder (random weights, bf16) generates through the server's
``Upsampler`` with a seed, then diffusers' ``Flux2Pipeline.upsample_prompt`` runs
on the same model and prompts right after ``torch.manual_seed`` of that seed.
Printed per batch: seconds, generated tokens and tokens/s, peak VRAM, and whether
the texts are equal. Random weights rarely sample the end-of-sequence token, so
every answer runs the full 512 tokens (the worst case). With ``--dry-run`` the
model is 2 layers deep at toy width and bent to end its answers soon
(``common.demo.end_generation_soon``), so the check takes seconds on a CPU.

``--models`` (default: all three): ``dev`` is FLUX.2-dev's Mistral-3 encoder (below);
``klein-4b`` and ``klein-9b`` are [klein]'s Qwen3-4B and Qwen3-8B
(``common/configs/qwen3_4b_text_encoder.json``, ``qwen3_8b_text_encoder.json``),
built the same way as ``Qwen3ForCausalLM``: the reference is
``Flux2KleinPipeline._get_qwen3_prompt_embeds`` on the full model (36 layers and
``lm_head``), the server's forward (the Qwen3 recipe) runs on the same model cut
to layers 1-27 without the final norm and ``lm_head``.

The model is ``Mistral3ForConditionalGeneration`` built from the real FLUX.2-dev
config (``common/configs/flux2_dev_text_encoder.json``, 24.0B parameters)
directly on the GPU in bf16 with random weights (transformers' own init), so
nothing is downloaded. For each weight format (``bf16``; ``nf4``: every decoder
``nn.Linear`` swapped for a bitsandbytes ``Linear4bit``, lm_head kept bf16 as
transformers does):

1. the reference, ``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` on the
   full model, runs at each batch size (512 tokens per prompt);
2. the same model is then cut the way the server cuts it (layers 31-40, the
   final norm, lm_head and the vision tower dropped) and
   ``TruncatedMistral3Encoder.encode`` (the server's own forward code) runs on
   the same prompts.

Printed per format and batch: weight memory, peak VRAM of the forward
(``torch.cuda.max_memory_allocated``), time per batch (median of
``--repeats`` after a warm-up) and whether the embeddings are bit-identical
(the same bytes: ``common.pad_table.same_bits``). With ``--packed`` the server's forward then also runs with
``compute="packed"`` (real tokens only; not bit-exact, so a second table gives its
fidelity against the reference: max abs diff, min cosine per real row, share of
bit-identical real rows; a model whose tokenizer pads on the right is skipped).
Only one model is resident at a time: the full bf16 model (48 GB) fits an 80 GB
card with batch-8 activations, two would not.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from common.encoder_spec import FLUX2_DEV, FLUX2_KLEIN
from common.pad_table import same_bits
from encoder_server.text_encoder import QWEN3, TruncatedMistral3Encoder, TruncatedTextEncoder

PROMPTS = [
    "a red fox in fresh snow, morning light",
    "Isometric illustration of a tiny bakery at night, warm windows, rain on the cobblestones, 35mm film grain",
    "ünïcödé ☃ [INST] literal tags [/INST] and an empty line\n\nafter it",
    "A very long prompt. " * 60,  # past 512 tokens
]

# --dry-run: each model's depth (dev: hidden states 10/20/30 of 40 layers; klein: 9/18/27 of 36), toy width.
TINY_TEXT = dict(
    hidden_size=64, head_dim=16, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024
)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, head_dim=8, num_attention_heads=4, num_hidden_layers=2)
TINY_QWEN3 = dict(
    hidden_size=64, head_dim=16, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024
)
KLEIN_CONFIGS = {"klein-4b": "qwen3_4b_text_encoder.json", "klein-9b": "qwen3_8b_text_encoder.json"}
MODELS = ("dev", *KLEIN_CONFIGS)


class InMemoryTruncatedEncoder(TruncatedMistral3Encoder):
    """The server's encoder around a language model already in memory (no folder to load).

    ``encode`` and ``tokenize`` are the server's own; only loading is skipped,
    because writing and reloading 48 GB would take longer than the benchmark.
    """

    def __init__(self, lm, tokenizer, *, device: torch.device, dtype: torch.dtype):
        self.spec = FLUX2_DEV
        self._lm = lm
        self.tokenizer = tokenizer
        self.padding_side = tokenizer.padding_side
        self.device = device
        self.dtype = dtype
        self.hidden_size = lm.config.hidden_size


class InMemoryQwen3Encoder(TruncatedTextEncoder):
    """The server's [klein] encoder (Qwen3 recipe) around a cut language model already in memory."""

    recipe = QWEN3

    def __init__(self, lm, tokenizer, *, device: torch.device, dtype: torch.dtype):
        self.spec = FLUX2_KLEIN
        self._lm = lm
        self.tokenizer = tokenizer
        self.padding_side = tokenizer.padding_side
        self.device = device
        self.dtype = dtype
        self.hidden_size = lm.config.hidden_size


def build_full_model(config, device: torch.device, seed: int, cls_name: str = "Mistral3ForConditionalGeneration"):
    """Random-weight ``cls_name`` (a transformers class) in bf16, built directly on ``device``."""
    import transformers

    config = copy.deepcopy(config)  # truncate() edits the model's config; the next build needs all layers
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what from_pretrained(dtype=bf16) does while building
    try:
        with torch.device(device):
            model = getattr(transformers, cls_name)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def quantize_nf4(module: torch.nn.Module) -> int:
    """Swap every ``nn.Linear`` under ``module`` for a bitsandbytes NF4 ``Linear4bit``; returns how many."""
    import bitsandbytes as bnb

    swapped = 0
    for name, child in list(module.named_modules()):
        if type(child) is not torch.nn.Linear:
            continue
        q = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=False,
            quant_type="nf4",
            device="meta",
        )
        # Params4bit quantizes when moved to a device: same settings as the server's BitsAndBytesConfig.
        q.weight = bnb.nn.Params4bit(
            child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=False
        ).to(child.weight.device)
        if child.bias is not None:
            q.bias = child.bias
        module.set_submodule(name, q)
        swapped += 1
    return swapped


def truncate(model, layers: int):
    """Cut ``model`` the way TruncatedMistral3Encoder loads it; returns the language model."""
    lm = model.model.language_model
    lm.layers = lm.layers[:layers]
    lm.config.num_hidden_layers = layers
    lm.norm = torch.nn.Identity()  # hidden_states[-1] must stay un-normed (see text_encoder.py)
    del model.lm_head, model.model.vision_tower, model.model.multi_modal_projector
    return lm


def truncate_qwen3(model, layers: int):
    """Cut a ``Qwen3ForCausalLM`` the way the server loads it (Qwen3 recipe); returns the ``Qwen3Model``."""
    lm = model.model
    lm.layers = lm.layers[:layers]
    lm.config.num_hidden_layers = layers
    if getattr(lm.config, "layer_types", None) is not None:
        lm.config.layer_types = list(lm.config.layer_types[:layers])
    lm.norm = torch.nn.Identity()  # hidden_states[-1] must stay un-normed
    del model.lm_head
    return lm


def allocated(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return 0


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def timed(fn, device: torch.device, repeats: int) -> tuple[float, int, torch.Tensor]:
    """Median seconds of ``repeats`` calls after a warm-up, peak bytes allocated, last output (on CPU)."""
    out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak, out.to("cpu")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def truncated_rows(
    args, ours, reference: dict, variant: str, label: str, fmt: str, device, base: int, weights: int
) -> list[dict]:
    """The server's truncated encoder at each batch size: time, peak memory, and bit-equality with ``reference``."""
    rows = []
    for batch in args.batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        t, peak, out = timed(lambda o=ours, p=prompts: o.encode(p).embeddings, device, args.repeats)
        exact = same_bits(out, reference[batch])
        rows.append(
            dict(format=fmt, variant=variant, batch=batch, seconds=t, weights=weights, peak=peak - base, exact=exact)
        )
        print(f"{label} truncated batch {batch}: {t:.3f}s exact={exact}", file=sys.stderr, flush=True)
    return rows


def packed_rows(args, ours, reference: dict, label: str, fmt: str, device, base: int, weights: int) -> list[dict]:
    """``ours`` again with ``compute="packed"``: time per batch and fidelity against ``reference[batch]``."""
    from encoder_server.fidelity import compare

    if ours.pad_rows() is None:
        print(f"{label} {fmt} packed: skipped, the tokenizer pads on the {ours.padding_side}", file=sys.stderr)
        return []
    ours.use_packed_compute()
    rows = []
    for batch in args.batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        t, peak, out = timed(lambda o=ours, p=prompts: o.encode(p).embeddings, device, args.repeats)
        fidelity = compare(out, reference[batch], ours.tokenize(prompts)[0]["attention_mask"].bool())
        rows.append(
            dict(
                format=fmt,
                variant=f"{label} packed",
                batch=batch,
                seconds=t,
                weights=weights,
                peak=peak - base,
                exact=None,
                fidelity=fidelity,
            )
        )
        print(
            f"{label} {fmt} packed batch {batch}: {t:.3f}s max abs diff {fidelity.max_abs:.3g}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def run(args) -> list[dict]:
    rows = []
    for name in args.models:
        rows += run_dev(args) if name == "dev" else run_klein(args, name)
    return rows


def run_klein(args, name: str) -> list[dict]:
    """Reference ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` vs the server's Qwen3 forward, per format."""
    from diffusers import Flux2KleinPipeline

    from common.demo import TinyKleinSpec, build_tiny_klein
    from encoder_server.memory import load_config
    from encoder_server.text_encoder import load_tokenizer

    device = torch.device("cpu" if args.dry_run else "cuda")
    config = load_config(Path(__file__).resolve().parents[1] / "common" / "configs" / KLEIN_CONFIGS[name])
    if args.dry_run:
        for key, value in TINY_QWEN3.items():
            setattr(config, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        # Byte-level demo tokenizer with Qwen's special tokens and chat template; its ids fit any vocab here.
        folder = build_tiny_klein(Path(tmp), TinyKleinSpec(with_dit=False, text_layers=1))
        tokenizer = load_tokenizer(folder / "tokenizer")
    layers = FLUX2_KLEIN.computed_layers
    rows = []
    for fmt in args.formats:
        free(device)
        base = allocated(device)
        model = build_full_model(config, device, args.seed, "Qwen3ForCausalLM")
        if fmt == "nf4":
            n = quantize_nf4(model.model.layers)
            print(f"{name} nf4: {n} linear layers quantized", file=sys.stderr)
        ref_weights = allocated(device) - base if device.type == "cuda" else param_bytes(model)
        reference = {}
        for batch in args.batches:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            with torch.inference_mode():
                t, peak, out = timed(
                    lambda m=model, p=prompts: Flux2KleinPipeline._get_qwen3_prompt_embeds(
                        m, tokenizer, p, device=device
                    ).cpu(),
                    device,
                    args.repeats,
                )
            reference[batch] = out
            rows.append(
                dict(
                    format=fmt,
                    variant=f"{name} reference ({config.num_hidden_layers} layers + lm_head)",
                    batch=batch,
                    seconds=t,
                    weights=ref_weights,
                    peak=peak - base,
                    exact=None,
                )
            )
            print(f"{name} {fmt} reference batch {batch}: {t:.3f}s", file=sys.stderr, flush=True)
        lm = truncate_qwen3(model, layers)
        del model
        free(device)
        ours = InMemoryQwen3Encoder(lm, tokenizer, device=device, dtype=torch.bfloat16)
        our_weights = allocated(device) - base if device.type == "cuda" else param_bytes(lm)
        rows += truncated_rows(
            args,
            ours,
            reference,
            f"{name} truncated ({layers} layers)",
            f"{name} {fmt}",
            fmt,
            device,
            base,
            our_weights,
        )
        if args.packed:
            rows += packed_rows(args, ours, reference, name, fmt, device, base, our_weights)
        del ours, lm, reference
        free(device)
    return rows


def run_dev(args) -> list[dict]:
    from diffusers import Flux2Pipeline

    from common.demo import TinyFlux2Spec, build_tiny_flux2
    from encoder_server.memory import load_config
    from encoder_server.text_encoder import load_tokenizer

    device = torch.device("cpu" if args.dry_run else "cuda")
    config = load_config(args.config)
    if args.dry_run:
        config.text_config.update(TINY_TEXT)
        config.vision_config.update(TINY_VISION)
    with tempfile.TemporaryDirectory() as tmp:
        # Byte-level demo tokenizer with Mistral control tokens and chat template; its ids fit any vocab here.
        folder = build_tiny_flux2(Path(tmp), TinyFlux2Spec(with_dit=False, text_layers=1))
        tokenizer = load_tokenizer(folder / "tokenizer")

    rows = []
    for fmt in args.formats:
        free(device)
        base = allocated(device)
        model = build_full_model(config, device, args.seed)
        if fmt == "nf4":
            n = quantize_nf4(model.model.language_model.layers)
            print(f"nf4: {n} linear layers quantized", file=sys.stderr)
        ref_weights = allocated(device) - base if device.type == "cuda" else param_bytes(model)
        reference = {}
        for batch in args.batches:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            with torch.inference_mode():
                t, peak, out = timed(
                    # .cpu(): the server's encode() also returns the embeddings on the CPU
                    lambda m=model, p=prompts: Flux2Pipeline._get_mistral_3_small_prompt_embeds(m, tokenizer, p).cpu(),
                    device,
                    args.repeats,
                )
            reference[batch] = out
            rows.append(
                dict(
                    format=fmt,
                    variant="reference (40 layers + lm_head)",
                    batch=batch,
                    seconds=t,
                    weights=ref_weights,
                    peak=peak - base,
                    exact=None,
                )
            )
            print(f"{fmt} reference batch {batch}: {t:.3f}s", file=sys.stderr, flush=True)
        lm = truncate(model, FLUX2_DEV.computed_layers)
        del model
        free(device)
        ours = InMemoryTruncatedEncoder(lm, tokenizer, device=device, dtype=torch.bfloat16)
        our_weights = allocated(device) - base if device.type == "cuda" else param_bytes(lm)
        rows += truncated_rows(
            args,
            ours,
            reference,
            f"truncated ({FLUX2_DEV.computed_layers} layers)",
            fmt,
            fmt,
            device,
            base,
            our_weights,
        )
        if args.packed:
            rows += packed_rows(args, ours, reference, "dev", fmt, device, base, our_weights)
        del ours, lm, reference
        free(device)
    return rows


UPSAMPLE_PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "two cats on a sofa", "a city street, rain"]


def run_upsampling(args) -> int:
    """``--upsampling``: the server's Upsampler against ``Flux2Pipeline.upsample_prompt``, per batch size."""
    from common.demo import TinyFlux2Spec, build_tiny_flux2, end_generation_soon
    from encoder_server.memory import load_config
    from encoder_server.text_encoder import load_tokenizer
    from encoder_server.upsampling import Upsampler, reference_upsample

    device = torch.device("cpu" if args.dry_run else "cuda")
    config = load_config(args.config)
    if args.dry_run:
        config.text_config.update({**TINY_TEXT, "num_hidden_layers": 2})
        config.vision_config.update(TINY_VISION)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_flux2(Path(tmp), TinyFlux2Spec(with_dit=False, text_layers=1))
        tokenizer = load_tokenizer(folder / "tokenizer")
    t0 = time.perf_counter()
    model = build_full_model(config, device, args.seed)
    if args.dry_run:
        end_generation_soon(model)
    weights = param_bytes(model)
    upsampler = Upsampler(model, tokenizer)
    rows = []
    for batch in args.batches:
        prompts = [UPSAMPLE_PROMPTS[i % len(UPSAMPLE_PROMPTS)] for i in range(batch)]
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        ours = upsampler.upsample(prompts, seed=args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        theirs = reference_upsample(model, tokenizer, prompts, seed=args.seed)
        tokens = sum(ours.generated_tokens)
        rows.append(dict(batch=batch, seconds=seconds, tokens=tokens, peak=peak, equal=ours.texts == theirs))
        print(f"upsampling batch {batch}: {seconds:.2f}s, {tokens} tokens", file=sys.stderr, flush=True)
    where = "CPU, tiny config (dry run: not a measurement)" if args.dry_run else torch.cuda.get_device_name()
    print(
        f"# Prompt upsampling: {where}; torch {torch.__version__}; bf16 weights {weights / 1e9:.2f} GB; "
        f"seed {args.seed}; 2048-token prompts, up to 512 new tokens; total {time.perf_counter() - t0:.0f}s"
    )
    print()
    print("| batch | s/call | generated tokens | tokens/s | peak GB | equals upsample_prompt |")
    print("|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['seconds']:.2f} | {r['tokens']} | {r['tokens'] / r['seconds']:.1f} | "
            f"{r['peak'] / 1e9:.2f} | {'yes' if r['equal'] else 'NO'} |"
        )
    return 0 if all(r["equal"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--formats", nargs="+", choices=["bf16", "nf4"], default=["bf16", "nf4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=None,
        help="dev: FLUX.2-dev's Mistral-3; klein-4b / klein-9b: [klein]'s Qwen3-4B / Qwen3-8B "
        "(default: all three; with --dry-run dev and klein-4b, as the toy klein-9b is the same)",
    )
    parser.add_argument("--config", default=None, help="Mistral3 config.json for dev (default: FLUX.2-dev's)")
    parser.add_argument("--dry-run", action="store_true", help="tiny config on the CPU (no GPU needed)")
    parser.add_argument(
        "--packed",
        action="store_true",
        help='also run the server\'s forward with compute="packed" and report its fidelity',
    )
    parser.add_argument(
        "--upsampling",
        action="store_true",
        help="time prompt upsampling (the whole model generating) against upsample_prompt instead",
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_encoder.py needs a CUDA GPU; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    if args.upsampling:
        return run_upsampling(args)
    if args.models is None:
        args.models = ["dev", "klein-4b"] if args.dry_run else list(MODELS)

    t0 = time.perf_counter()
    rows = run(args)
    where = "CPU, tiny config (dry run: not a measurement)" if args.dry_run else torch.cuda.get_device_name()
    print(
        f"# GPU encoder: {where}; torch {torch.__version__}; 512 tokens/prompt; median of {args.repeats}; "
        f"total {time.perf_counter() - t0:.0f}s"
    )
    print()
    print("| format | forward | batch | weights GB | peak during forward GB | s/batch | prompts/s | bit-exact |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        exact = "" if r["exact"] is None else ("yes" if r["exact"] else "NO")
        print(
            f"| {r['format']} | {r['variant']} | {r['batch']} | {r['weights'] / 1e9:.2f} | {r['peak'] / 1e9:.2f} | "
            f"{r['seconds']:.3f} | {r['batch'] / r['seconds']:.1f} | {exact} |"
        )
    packed = [r for r in rows if "fidelity" in r]
    if packed:
        print()
        print("Packed against the reference, over the real rows (not bit-exact by design):")
        print()
        print(
            "| format | forward | batch | max abs diff | mean abs diff | max diff in row ulps | min cosine | "
            "bit-identical rows |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in packed:
            print(f"| {r['format']} | {r['variant']} | {r['batch']} | {r['fidelity'].cells()} |")
    return 0 if all(r["exact"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
