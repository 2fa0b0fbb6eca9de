"""``flux2-dit upsample``: have the encoder rewrite short prompts into detailed ones, and print them."""

from __future__ import annotations

import argparse
import sys

from dit_client.commands.common_args import add_encoder_args, encoder_from_args

DEFAULT_TEMPERATURE = 0.15  # upsample_prompt's default


def add_parser(sub) -> None:
    p = sub.add_parser(
        "upsample",
        help="rewrite prompts into detailed ones on the encoder (FLUX.2-dev caption upsampling)",
        description="Prompt upsampling, as diffusers' Flux2Pipeline.upsample_prompt, run on the encoder "
        "(which must be started with --upsampling). Prints one rewritten prompt per --prompt.",
    )
    add_encoder_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="REF.png",
        help="reference image (PNG or JPEG) for image-to-image upsampling; repeat for several, all for "
        "one --prompt (several images are concatenated, as the reference does)",
    )
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature (default 0.15)")
    p.add_argument("--seed", type=int, default=None, help="seed; the same seed and prompts give the same text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.image and len(args.prompt) != 1:
        raise ValueError("--image goes with one --prompt: the images are that prompt's references")
    images = [args.image] if args.image else None
    with encoder_from_args(args) as enc:
        result = enc.upsample_with_metadata(args.prompt, images, args.temperature, args.seed)
    for text in result.texts:
        print(text)
    tokens = sum(result.generated_tokens)
    seconds = result.generation_time_ns / 1e9
    print(
        f"(seed {result.seed}, temperature {result.temperature:g}, {tokens} tokens generated in {seconds:.1f} s)",
        file=sys.stderr,
    )
    return 0
