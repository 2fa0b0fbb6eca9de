"""``flux2-dit info``: is the encoder up, and what does it serve?"""

from __future__ import annotations

import argparse
import dataclasses
import json

from dit_client.commands.common_args import add_encoder_args, encoder_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show what the encoder serves (models, fingerprints, dtype, limits)")
    add_encoder_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(run=run)


def _plain(value):
    """JSON-ready: torch dtypes by name, tuples as lists, nested models as objects."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "torch":
        return str(value).removeprefix("torch.")
    return value


def run(args: argparse.Namespace) -> int:
    with encoder_from_args(args) as enc:
        info = enc.info()  # --encoder-model NAME describes that model; default: the server's first
    fields = _plain(dataclasses.asdict(info))
    if args.json:
        print(json.dumps({"target": enc.target, **fields}, indent=2))
        return 0
    models = fields.pop("models")
    print(f"encoder at {enc.target}")
    for name, value in fields.items():
        if name == "limits":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"  {name:<20} {value}")
    if models:
        print(f"  {'models':<20} {len(models)} (name one with --encoder-model NAME)")
        for m in models:
            print(
                f"    {m['name']:<18} {m['family']:<12} {m['embedding_dim']:>6} wide  {m['dtype']:<9} "
                f"{m['fingerprint']}  {m['model_id']}"
            )
            upsampling = ("yes, with images" if m["upsampling_images"] else "yes") if m["upsampling"] else "no"
            why = f" ({m['upsampling_unavailable']})" if m["upsampling_unavailable"] else ""
            print(f"    {'':<18} prompt upsampling: {upsampling}{why}")
    if info.demo:
        print("note: the DEMO model: random weights, the embeddings are noise")
    return 0
