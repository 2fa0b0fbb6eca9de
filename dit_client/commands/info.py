"""``flux2-dit info``: is the encoder up, and what does it serve?"""

from __future__ import annotations

import argparse
import dataclasses
import json

from dit_client.commands.common_args import add_encoder_args, encoder_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show what the encoder serves (model, fingerprint, dtype, limits)")
    add_encoder_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with encoder_from_args(args) as enc:
        info = enc.info()
    fields = dataclasses.asdict(info)
    fields["dtype"] = str(info.dtype).removeprefix("torch.")
    if args.json:
        print(json.dumps({"target": enc.target, **fields}, indent=2))
        return 0
    print(f"encoder at {enc.target}")
    for name, value in fields.items():
        if name == "limits":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, tuple):
            value = ", ".join(map(str, value))
        print(f"  {name:<20} {value}")
    if info.demo:
        print("note: the DEMO model: random weights, the embeddings are noise")
    return 0
