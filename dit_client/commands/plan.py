"""``flux2-dit plan``: VRAM and RAM per memory mode, from the model's configs alone."""

from __future__ import annotations

import argparse

from common.model_source import DEFAULT_MODEL

EXIT_NOTHING_FITS = 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate VRAM/RAM per memory mode (no weights loaded) and recommend one",
        description="Builds the real DiT and VAE from their configs on fake (meta) tensors, measures activation "
        "peaks at the requested size, and prints VRAM/RAM per mode. Figures are GiB. Without --vram "
        "and --ram, this machine's first CUDA GPU and its RAM are read.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder or 'demo' (configs only are read)")
    p.add_argument(
        "--vram",
        type=float,
        default=None,
        metavar="GIB",
        help="GPU memory to plan for (default: the first CUDA GPU's, if any)",
    )
    p.add_argument(
        "--ram",
        type=float,
        default=None,
        metavar="GIB",
        help="host memory to plan for (default: this machine's, or its container limit)",
    )
    p.add_argument(
        "--no-detect", action="store_true", help="do not read this machine's sizes: plan only for --vram/--ram"
    )
    p.add_argument(
        "--reserve",
        type=float,
        default=1.0,
        metavar="GIB",
        help="VRAM kept free for the CUDA context and allocator slack (default 1)",
    )
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dit_client.plan import plan

    result = plan(
        args.model,
        height=args.height,
        width=args.width,
        vram_gib=args.vram,
        ram_gib=args.ram,
        reserve_gib=args.reserve,
        detect=not args.no_detect,
    )
    print(result.text)
    return EXIT_NOTHING_FITS if result.nothing_fits else 0
