"""``flux2-dit precompute``: encode a dataset's captions once into an embedding store."""

from __future__ import annotations

import argparse
import logging

from dit_client.commands.common_args import add_encoder_args, encoder_from_args
from dit_client.retry import RetryPolicy
from dit_client.training.store import DEFAULT_SHARD_BYTES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}")
    i, n = int(index), int(count)
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"I/N needs 0 <= I < N, got {text!r}")
    return i, n


def add_parser(sub) -> None:
    p = sub.add_parser(
        "precompute",
        help="encode every caption of a dataset once into a resumable embedding store",
        description="Encode every distinct caption of --captions through the encoder service into sharded "
        "safetensors under --out. Safe to interrupt and rerun: finished shards are kept, the rest is redone.",
    )
    add_encoder_args(p)
    p.add_argument(
        "--captions",
        required=True,
        metavar="PATH",
        help=".txt (one per line), .jsonl, .csv, .parquet, an image folder (sidecar .txt or "
        "metadata.jsonl) or a datasets save_to_disk folder",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="embedding store directory (created if missing); one store per model",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIT",
        help="the DiT the embeddings are for (hub id, folder, demo, demo-klein): its configs pick the "
        "server's matching model, as flux2-dit generate does (or name it with --encoder-model)",
    )
    p.add_argument(
        "--caption-field",
        metavar="NAME",
        help="field/column holding the caption (default: guessed: caption, text, prompt...)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="requests in flight on the stream (default: min(8, server limit))",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="captions per request (default: min(8, server limit))",
    )
    p.add_argument(
        "--shard-size-mb",
        type=_positive_float,
        default=DEFAULT_SHARD_BYTES / 2**20,
        metavar="MB",
        help="target shard size in MiB; the client holds two shard buffers, and an interruption loses "
        "at most two shards of work (default: %(default).0f)",
    )
    p.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=RetryPolicy.max_attempts,
        metavar="N",
        help="tries per request on UNAVAILABLE / RESOURCE_EXHAUSTED before giving up",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help="take only every N-th distinct caption, those whose index modulo N is I (0-based): N "
        "processes, e.g. a Kubernetes Indexed Job with --shard $(JOB_COMPLETION_INDEX)/N, each "
        "writing its own --out; open the N stores as one with EmbeddingStore([dir0, dir1, ...])",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the CRC-32C of the embeddings already stored (by default the whole store is read "
        "once, and damaged embeddings are encoded again)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dit_client.training.precompute import precompute

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with encoder_from_args(args) as enc:
        model = args.encoder_model
        if args.model:
            from common.model_source import ModelNotFound
            from dit_client.model_match import encoder_model_for

            try:
                model = encoder_model_for(args.model, enc)  # an --encoder-model must fit this DiT too
            except ModelNotFound as exc:
                raise ValueError(str(exc)) from None  # a usage error: exit 2
        report = precompute(
            enc,
            args.captions,
            args.out,
            caption_field=args.caption_field,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            shard_bytes=int(args.shard_size_mb * 1024 * 1024),
            retry=RetryPolicy(max_attempts=args.max_attempts),
            progress=not args.no_progress,
            model=model,
            shard=args.shard,
            verify=not args.no_verify,
        )
    shard = f" in shard {args.shard[0]}/{args.shard[1]}" if args.shard else ""
    if report.repaired:
        print(f"{report.store}: {report.repaired} damaged embeddings dropped and encoded again where still captioned")
    print(
        f"{report.store}: {report.unique} distinct captions{shard} ({report.captions_read} read), "
        f"{report.already_stored} already stored, {report.encoded} encoded in {report.elapsed_s:.1f}s "
        f"({report.captions_per_s:.1f}/s), {report.shards} shards, fingerprint {report.fingerprint}"
    )
    return 0
