"""``flux2-dit generate``: prompt in, PNG out; the text encoder stays on the service."""

from __future__ import annotations

import argparse
import sys

from common.model_source import DEFAULT_MODEL, ModelNotFound
from dit_client.commands.common_args import add_encoder_args, encoder_from_args
from dit_client.generate import (
    DTYPES,
    MAX_REFERENCE_IMAGES,
    OFFLOAD_MODES,
    QUANTIZATIONS,
    DiTClient,
    DiTConfig,
    output_paths,
)
from dit_client.structured_prompt import load_structured_prompt, looks_structured, parse_structured_prompt

EXIT_USAGE = 2


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images with the local DiT from remote prompt embeddings",
        description="Generate FLUX.2 images: the prompt is encoded by the flux2-encoder service, "
        "the DiT and VAE run here. A --prompt starting with '{' is read as a structured JSON prompt.",
    )
    add_encoder_args(p)
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="hub id (FLUX.2-dev, FLUX.2-klein-4B, ...), pre-quantized repo (diffusers/FLUX.2-dev-bnb-4bit), "
        "local folder, 'demo' or 'demo-klein'",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text, or a structured prompt as a JSON string")
    what.add_argument("--prompt-file", metavar="FILE.json", help="structured prompt (FLUX.2 JSON form)")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE.png",
        help="output PNG; with --num-images K > 1, FILE-0.png ... FILE-{K-1}.png",
    )
    p.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: 28 for [dev], 4 for distilled [klein], 50 for [klein] base)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale: [dev]'s embedded guidance, a [klein] base model's classifier-free guidance "
        "(default 4 for both); distilled [klein] ignores it (default 1)",
    )
    p.add_argument(
        "--negative-prompt",
        default="",
        metavar="TEXT",
        help="for [klein] base models (classifier-free guidance): the negative prompt, encoded by the "
        "service too (default: empty, as in diffusers)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed; default: random, printed for reproduction")
    p.add_argument("--num-images", type=int, default=1, help="images of the same prompt (one embedding fetch)")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="REF.png",
        help=f"reference image for multi-reference editing (repeat, up to {MAX_REFERENCE_IMAGES})",
    )
    p.add_argument(
        "--quantization",
        default="auto",
        choices=QUANTIZATIONS,
        help="DiT weights: nf4 (bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8, no offload), both CUDA "
        "only; none; or auto (on CUDA: nf4 unless bf16 fits). `flux2-dit plan` says which fits",
    )
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="compute dtype (default bfloat16)")
    p.add_argument(
        "--offload",
        default="none",
        choices=OFFLOAD_MODES,
        help="model: enable_model_cpu_offload; group: leaf-level group offload with CUDA streams; "
        "sequential: least VRAM, slowest (all need CUDA)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--attention-backend",
        default=None,
        metavar="NAME",
        help="diffusers attention backend: native, flash, sage, ... (default: PyTorch SDPA)",
    )
    p.add_argument("--lora", default=None, metavar="PATH", help="LoRA weights (.safetensors file, folder or hub id)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument(
        "--upsample",
        action="store_true",
        help="rewrite the prompt into a detailed one on the encoder first (FLUX.2-dev prompt upsampling; "
        "the encoder must run with --upsampling); printed, and kept in the PNG metadata beside the original",
    )
    p.add_argument(
        "--upsample-temperature",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature of --upsample (default 0.15, the reference's); implies --upsample",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Prompt and output errors are the user's to fix before anything is loaded.
    output_paths(args.out, max(1, args.num_images))
    if args.prompt_file:
        prompt = load_structured_prompt(args.prompt_file)
    elif looks_structured(args.prompt):
        prompt = parse_structured_prompt(args.prompt, source="--prompt JSON")
    else:
        prompt = args.prompt
    config = DiTConfig(
        model=args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        offload=args.offload,
        attention_backend=args.attention_backend,
        lora=args.lora,
        lora_scale=args.lora_scale,
    )
    try:
        with encoder_from_args(args) as encoder, DiTClient(encoder, config, progress=not args.quiet) as client:
            result = client.generate(
                prompt,
                height=args.height,
                width=args.width,
                steps=args.steps,
                guidance=args.guidance,
                seed=args.seed,
                num_images=args.num_images,
                images=args.image,
                negative_prompt=args.negative_prompt,
                upsample_temperature=_upsample_temperature(args),
            )
            paths = result.save(args.out)
    except ModelNotFound as exc:
        print(f"flux2-dit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if "original_prompt" in result.parameters:
        print(f"upsampled prompt (seed {result.parameters['upsample_seed']}): {result.prompt_text}")
    for path in paths:
        print(f"wrote {path}")
    model = f" ({result.encoder_model})" if result.encoder_model else ""
    print(
        f"seed {result.seed}, {result.parameters['steps']} steps, {args.width}x{args.height}, encoder {result.fingerprint}{model}; "
        f"embedding {result.encode_s * 1e3:.0f} ms, denoise + decode {result.denoise_s:.1f} s"
    )
    if result.demo:
        print("note: DEMO model: its weights are random, so the picture is noise; it only proves the plumbing")
    return 0


def _upsample_temperature(args: argparse.Namespace) -> float | None:
    """The temperature to upsample at, or None without --upsample / --upsample-temperature."""
    if args.upsample_temperature is not None:
        return args.upsample_temperature
    return 0.15 if args.upsample else None
