"""``flux2-encoder``: command line of the encoder service. Parses flags and calls the library."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from common.config import Limits, ServerConfig
from common.model_source import DEFAULT_MODEL, ModelNotFound
from encoder_server.text_encoder import DTYPES, QUANTIZATIONS, ConfigError

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-encoder", description="FLUX.2 text-encoder service over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="load the text encoder and serve embeddings")
    serve.add_argument("--model", default=DEFAULT_MODEL,
                       help="hub id, local folder (text_encoder/, tokenizer/) or 'demo' (random tiny model)")
    serve.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    serve.add_argument("--quantization", default="none", choices=list(QUANTIZATIONS))
    serve.add_argument("--grace-period", type=float, default=30.0, help="seconds SIGTERM waits for in-flight work")
    serve.add_argument("--max-prompts-per-request", type=int, default=Limits.max_prompts_per_request)
    serve.add_argument("--max-prompt-chars", type=int, default=Limits.max_prompt_chars)
    serve.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=args.model,
        revision=args.revision,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        grace_period_s=args.grace_period,
        limits=Limits(max_prompts_per_request=args.max_prompts_per_request, max_prompt_chars=args.max_prompt_chars),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from encoder_server.server import serve

    try:
        asyncio.run(serve(config_from_args(args)))
    except (ConfigError, ModelNotFound) as exc:
        print(f"flux2-encoder: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"flux2-encoder: cannot serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
