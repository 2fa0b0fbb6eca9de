"""``flux2-encoder``: command line of the encoder service. Parses flags and calls the library."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from common.config import (
    CACHE_SCOPES,
    AuthConfig,
    BatchingConfig,
    CacheConfig,
    HTTPConfig,
    Limits,
    ServerConfig,
    ServerTLSConfig,
    UpsamplingConfig,
)
from common.logs import quiet_third_party_logs
from common.model_source import DEFAULT_MODEL, ModelNotFound
from encoder_server.models import apply_per_model, parse_model_flag
from encoder_server.text_encoder import COMPUTE_MODES, DTYPES, QUANTIZATIONS, ConfigError

EXIT_CONFIG = 2


def _number(kind, minimum):
    """argparse type: ``kind`` (int or float) >= ``minimum``, with a readable error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def env_name(dest: str) -> str:
    """The environment variable of a ``serve`` flag: ``--max-batch-tokens`` -> ``FLUX2_MAX_BATCH_TOKENS``."""
    return f"FLUX2_{dest.upper()}"


class _ServeHelp(argparse.HelpFormatter):
    """Every flag's help ends with its default and its environment variable."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.dest == "help":
            return text
        default = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {default}; env {env_name(action.dest)})"


def _defaults_from_env(parser: argparse.ArgumentParser) -> None:
    """Take each flag's default from its FLUX2_* variable when set (read when the parser is built, not at import).

    A value that its flag would refuse is refused here, naming the variable.
    """
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = env_name(action.dest)
        value = os.environ.get(name)
        if value is None:
            continue
        # A repeatable flag takes several values, separated by spaces (FLUX2_MODEL="dev=demo klein=demo-klein").
        values = value.split() if isinstance(action, argparse._AppendAction) else [value]
        converted = []
        for one in values:
            try:
                convert: Any = action.type  # argparse types it as str | callable; ours are callables
                converted.append(convert(one) if convert is not None else one)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"${name}={value!r}: {exc}")
            if action.choices is not None and converted[-1] not in action.choices:
                parser.error(f"${name}={value!r}: choose from {', '.join(map(str, action.choices))}")
        action.default = converted if isinstance(action, argparse._AppendAction) else converted[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-encoder", description="FLUX.2 text-encoder service over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="load the text encoder and serve embeddings",
        formatter_class=_ServeHelp,
        description="Every flag may also be set by the environment variable named in its help "
        "(FLUX2_ and the flag in capitals: --max-batch-tokens is FLUX2_MAX_BATCH_TOKENS); "
        "a flag on the command line wins.",
    )
    serve.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]SOURCE",
        help="hub id, local folder (text_encoder/, tokenizer/), 'demo' or 'demo-klein' (random tiny "
        "models); repeat to serve several, each under NAME (default: the hub id or folder "
        f"name); without it {DEFAULT_MODEL}",
    )
    serve.add_argument("--revision", default=None, help="hub revision (branch, tag or commit); none means the latest")
    serve.add_argument("--host", default="127.0.0.1", help="address the gRPC port binds (loopback only by default)")
    serve.add_argument("--port", type=_number(int, 0), default=50051, help="gRPC port; 0 picks a free one")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    serve.add_argument(
        "--dtype",
        action="append",
        type=_per_model(DTYPES),
        metavar="[NAME=]DTYPE",
        help=f"compute dtype ({', '.join(DTYPES)}); NAME=DTYPE sets one model's (default bfloat16, FLUX.2's own)",
    )
    serve.add_argument(
        "--quantization",
        action="append",
        type=_per_model(QUANTIZATIONS),
        metavar="[NAME=]Q",
        help=f"weight quantization ({', '.join(QUANTIZATIONS)}); fp8 and nf4 need CUDA and change the "
        "embeddings (docs/memory.md); NAME=Q sets one model's (default none)",
    )
    serve.add_argument(
        "--compute",
        action="append",
        type=_per_model(COMPUTE_MODES),
        metavar="[NAME=]MODE",
        help="exact: bit-exact with diffusers' reference; packed: only the real tokens run, several "
        "prompts in one pass (faster, not bit-exact: its fingerprint ends in +packed; "
        "docs/benchmarks.md); NAME=MODE sets one model's (default exact)",
    )
    serve.add_argument(
        "--grace-period",
        type=_number(float, 0),
        default=30.0,
        help="seconds SIGTERM waits for in-flight work before exiting",
    )
    serve.add_argument(
        "--max-prompts-per-request",
        type=_number(int, 1),
        default=Limits.max_prompts_per_request,
        help="larger requests get INVALID_ARGUMENT",
    )
    serve.add_argument(
        "--max-prompt-chars",
        type=_number(int, 1),
        default=Limits.max_prompt_chars,
        help="longer prompts get INVALID_ARGUMENT (only 512 tokens are used anyway)",
    )
    serve.add_argument(
        "--max-concurrent-calls",
        type=_number(int, 1),
        default=Limits.max_concurrent_calls,
        help="Encode/EncodeStream calls and HTTP requests served at once, all together; "
        "more get RESOURCE_EXHAUSTED / 429",
    )
    serve.add_argument(
        "--max-concurrent-calls-per-user",
        type=_number(int, 0),
        default=Limits.max_concurrent_calls_per_user,
        metavar="N",
        help="how many of those one user may hold; 0 = automatic: a quarter of "
        "--max-concurrent-calls when --api-key-file names several users, all of it "
        "otherwise",
    )
    serve.add_argument(
        "--write-timeout",
        type=_number(float, 0.1),
        default=Limits.write_timeout_s,
        metavar="S",
        help="cancel an answer the client does not read within S seconds, freeing its slot ",
    )
    serve.add_argument(
        "--body-timeout",
        type=_number(float, 0.1),
        default=Limits.body_timeout_s,
        metavar="S",
        help="an HTTP request body must arrive within S seconds, else 408",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="how much the server logs",
    )
    # Batching, cache and metrics (docs/serving.md).
    serve.add_argument(
        "--max-batch-tokens",
        type=_number(int, 1),
        default=BatchingConfig.max_batch_tokens,
        help="tokens per forward pass: with --compute exact padded tokens (each prompt is 512), "
        "with --compute packed real tokens (each prompt its own, 43-132 for typical FLUX.2-dev prompts)",
    )
    serve.add_argument(
        "--max-batch-prompts",
        type=_number(int, 1),
        default=BatchingConfig.max_batch_prompts,
        help="prompts per forward pass",
    )
    serve.add_argument(
        "--max-queue-delay-ms",
        type=_number(float, 0),
        default=BatchingConfig.max_queue_delay_ms,
        help="longest a prompt waits for others to fill its batch",
    )
    serve.add_argument(
        "--max-queue-prompts",
        type=_number(int, 1),
        default=BatchingConfig.max_queue_prompts,
        help="prompts that may wait; past it calls get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--scheduling",
        choices=("fair", "fifo"),
        default="fair",
        help="fair: batches take prompts round-robin across users; fifo: in arrival order ",
    )
    serve.add_argument(
        "--memory-cache-mb",
        type=_number(int, 0),
        default=CacheConfig.memory_mb,
        help="in-memory embedding cache in MiB, 0 disables",
    )
    serve.add_argument("--cache-dir", default=None, help="persistent embedding cache folder")
    serve.add_argument(
        "--cache-scope",
        choices=CACHE_SCOPES,
        default=CacheConfig.scope,
        help="who shares cached embeddings: 'shared' (everyone: one user's prompts can be "
        "detected by another), 'user' (each their own), 'auto' ('user' when "
        "--api-key-file names several users)",
    )
    serve.add_argument(
        "--shared-cache",
        default=None,
        metavar="URL",
        help="redis://HOST:PORT/DB of a Redis or Valkey server shared by replicas: embeddings, "
        "compute-once and per-user limits span them all (docs/replicas.md)",
    )
    serve.add_argument(
        "--cache-max-gb", type=_number(float, 0), default=CacheConfig.max_gb, help="size bound of --cache-dir in GiB"
    )
    serve.add_argument(
        "--metrics-port",
        type=_number(int, 0),
        default=None,
        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics",
    )
    serve.add_argument(
        "--metrics-host",
        default=ServerConfig.metrics_host,
        help="address the metrics port binds; they are unauthenticated and name users",
    )
    # Users, TLS and the HTTP endpoint (docs/security.md, docs/hf-compatible-endpoint.md).
    serve.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="'user:key' per line ('#' comments); every call then needs "
        "'authorization: Bearer KEY' (without it anyone who reaches the port may call)",
    )
    serve.add_argument(
        "--rate-limit-rpm",
        type=_number(int, 0),
        default=0,
        metavar="N",
        help="Encode requests per user per minute, 0 = unlimited",
    )
    serve.add_argument(
        "--quota-prompts-per-day",
        type=_number(int, 0),
        default=0,
        metavar="N",
        help="prompts per user per UTC day, 0 = unlimited",
    )
    serve.add_argument(
        "--usage-file",
        default=None,
        metavar="PATH",
        help="JSON file keeping today's prompt counts across restarts (without it a restart resets the daily quota)",
    )
    serve.add_argument("--tls-cert", default=None, metavar="PEM", help="server certificate chain; enables TLS")
    serve.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert (unencrypted)")
    serve.add_argument(
        "--tls-client-ca",
        default=None,
        metavar="PEM",
        help="CA that signs client certificates; clients without one are refused (mutual TLS)",
    )
    serve.add_argument(
        "--http-port",
        type=_number(int, 0),
        default=None,
        help="serve the Hugging Face-compatible POST /predict on this port",
    )
    serve.add_argument(
        "--http-host", default="127.0.0.1", help="address the HTTP endpoint binds (loopback only by default)"
    )
    serve.add_argument(
        "--upsampling",
        action="store_true",
        help="also load what prompt upsampling needs (the whole language model, lm_head, vision tower) and "
        "serve the Upsample RPC; the embeddings stay bit-exact, on the same weights (docs/upsampling.md). "
        "FLUX.2-dev models only; costs about 13 GB more in bf16, 5-7 GB quantized (`flux2-encoder memory`)",
    )
    serve.add_argument(
        "--upsampling-max-queue",
        type=_number(int, 1),
        default=UpsamplingConfig.max_queued,
        help="Upsample calls waiting for the generator (one generates at a time); more get RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--upsampling-max-new-tokens",
        type=_number(int, 1),
        default=UpsamplingConfig.max_new_tokens,
        help="tokens generated per prompt at most; 512 is the reference's, a lower cap bounds the cost "
        "but cuts long answers short",
    )
    serve.add_argument(
        "--upsampling-max-per-user",
        type=_number(int, 0),
        default=UpsamplingConfig.max_per_user,
        help="Upsample calls one user may have waiting or generating; 0: automatic (a quarter of the queue "
        "when the key file names several users, no cap otherwise)",
    )
    serve.add_argument(
        "--upsampling-timeout",
        type=_number(float, 1),
        default=UpsamplingConfig.timeout_s,
        help="seconds one Upsample call may wait and generate at most (HTTP calls carry no deadline; a "
        "gRPC deadline longer than this is shortened to it)",
    )
    serve.add_argument(
        "--upsampling-max-image-bytes",
        type=_number(int, 1),
        default=UpsamplingConfig.max_image_bytes,
        help="encoded size of one reference image (PNG or JPEG)",
    )
    serve.add_argument(
        "--upsampling-max-request-image-bytes",
        type=_number(int, 1),
        default=UpsamplingConfig.max_request_image_bytes,
        help="encoded size of every image of one Upsample request together; keep it under the 4 MiB gRPC "
        "message less the prompts",
    )
    serve.add_argument(
        "--upsampling-max-image-pixels",
        type=_number(int, 1),
        default=UpsamplingConfig.max_image_pixels,
        help="width x height of one reference image, read from its header before decoding",
    )
    serve.add_argument(
        "--upsampling-max-request-image-pixels",
        type=_number(int, 1),
        default=UpsamplingConfig.max_request_image_pixels,
        help="width x height of every image of one Upsample request together (bounds decoding work)",
    )
    _defaults_from_env(serve)
    memory = sub.add_parser("memory", help="print the encoder's memory table (counted from the config, no weights)")
    memory.add_argument(
        "--config",
        default=None,
        help="a text encoder's config.json, Mistral3 ([dev]) or Qwen3 ([klein]) "
        "(default: the bundled FLUX.2-dev text-encoder config)",
    )
    memory.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers the server keeps (default: what the config's recipe runs: 30 for [dev], 27 for [klein])",
    )
    memory.add_argument(
        "--all",
        action="store_true",
        help="print the truncation table of every bundled encoder ([dev], [klein] 4B and 9B) instead",
    )
    return parser


def run_memory(args: argparse.Namespace) -> int:
    from encoder_server.memory import memory_table, truncation_table

    try:
        print(truncation_table() if args.all else memory_table(args.config, args.layers))
    except (OSError, ValueError) as exc:
        print(f"flux2-encoder memory: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _per_model(allowed):
    """argparse type: VALUE or NAME=VALUE, VALUE one of ``allowed``."""

    def parse(text: str) -> str:
        value = text.partition("=")[2] if "=" in text else text
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(allowed)}")
        return text

    return parse


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the flags describe; raises ConfigError for flags that contradict each other."""
    models = tuple(parse_model_flag(v) for v in (args.model or [DEFAULT_MODEL]))
    dtype, models = apply_per_model(models, args.dtype or [], "dtype", "--dtype")
    quantization, models = apply_per_model(models, args.quantization or [], "quantization", "--quantization")
    compute, models = apply_per_model(models, args.compute or [], "compute", "--compute")
    return ServerConfig(
        model=models[0].source,
        models=models,
        revision=args.revision,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=dtype or "bfloat16",
        quantization=quantization or "none",
        compute=compute or "exact",
        grace_period_s=args.grace_period,
        limits=Limits(
            max_prompts_per_request=args.max_prompts_per_request,
            max_prompt_chars=args.max_prompt_chars,
            max_concurrent_calls=args.max_concurrent_calls,
            max_concurrent_calls_per_user=args.max_concurrent_calls_per_user,
            write_timeout_s=args.write_timeout,
            body_timeout_s=args.body_timeout,
        ),
        batching=BatchingConfig(
            max_batch_tokens=args.max_batch_tokens,
            max_batch_prompts=args.max_batch_prompts,
            max_queue_delay_ms=args.max_queue_delay_ms,
            max_queue_prompts=args.max_queue_prompts,
            fair=args.scheduling == "fair",
        ),
        cache=CacheConfig(
            memory_mb=args.memory_cache_mb,
            dir=args.cache_dir,
            max_gb=args.cache_max_gb,
            scope=args.cache_scope,
            shared_url=args.shared_cache,
        ),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        auth=AuthConfig(
            api_key_file=args.api_key_file,
            rate_limit_rpm=args.rate_limit_rpm,
            quota_prompts_per_day=args.quota_prompts_per_day,
            usage_file=args.usage_file,
        ),
        tls=ServerTLSConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca),
        http=HTTPConfig(host=args.http_host, port=args.http_port),
        upsampling=UpsamplingConfig(
            # FLUX2_UPSAMPLING=0 (or false, no, off) keeps it off, like an absent flag.
            enabled=str(args.upsampling).lower() not in ("false", "0", "no", "off", ""),
            max_queued=args.upsampling_max_queue,
            max_new_tokens=args.upsampling_max_new_tokens,
            max_per_user=args.upsampling_max_per_user,
            timeout_s=args.upsampling_timeout,
            max_image_bytes=args.upsampling_max_image_bytes,
            max_request_image_bytes=args.upsampling_max_request_image_bytes,
            max_image_pixels=args.upsampling_max_image_pixels,
            max_request_image_pixels=args.upsampling_max_request_image_pixels,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "memory":
        return run_memory(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(user)s]: %(message)s"
    )
    from encoder_server.auth import UserLogFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(UserLogFilter())  # every line names the caller it was logged for
    quiet_third_party_logs()
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
