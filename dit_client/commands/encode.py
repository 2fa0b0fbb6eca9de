"""``flux2-dit encode``: fetch embeddings for prompts and save them as safetensors."""

from __future__ import annotations

import argparse

from dit_client.commands.common_args import add_encoder_args, encoder_from_args
from dit_client.embeddings_io import save_embeddings
from dit_client.output_files import check_output_file


def add_parser(sub) -> None:
    p = sub.add_parser("encode", help="fetch prompt embeddings from the encoder and save them")
    add_encoder_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--out", required=True, help="output .safetensors file (key 'prompt_embeds')")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out)  # before the remote call, not after it
    with encoder_from_args(args) as enc:
        info = enc.info()
        embeds, meta = enc.encode_with_metadata(args.prompt)
    save_embeddings(args.out, embeds, prompts=args.prompt, fingerprint=info.fingerprint)
    print(
        f"wrote {args.out}: prompt_embeds {list(embeds.shape)} {str(embeds.dtype).removeprefix('torch.')}, "
        f"fingerprint {info.fingerprint}"
    )
    # Counts are of the text the encoder tokenizes: the chat template and, for FLUX.2-dev, its
    # system message wrap every prompt, so even "a red fox" counts far more than 3 tokens.
    print(
        f"  token counts include the chat template and system message the encoder adds "
        f"(of {info.max_sequence_length} rows; the rest is padding)"
    )
    for prompt, m in zip(args.prompt, meta, strict=True):
        flag = " (truncated)" if m.truncated else ""
        print(f"  {m.token_count:4d} tokens{flag}  {m.total_time_ns / 1e6:8.1f} ms  {prompt[:60]!r}")
    if info.demo:
        print("note: the encoder runs the DEMO model; its weights are random and the embeddings are noise")
    return 0
