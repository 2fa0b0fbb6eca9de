"""Flags every sub-command that talks to the encoder shares."""

from __future__ import annotations

import argparse
import os

from dit_client.connection import DEFAULT_PORT, DEFAULT_TIMEOUT_S, TLSConfig
from dit_client.remote import RemoteTextEncoder


def add_encoder_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument(
        "--encoder",
        required=required,
        metavar="HOST:PORT",
        help=f"gRPC address of the flux2-encoder service (port {DEFAULT_PORT} if left out; "
        "not the --http-port, not a URL). Several replicas: a comma list (HOST:PORT,HOST:PORT; "
        "names looked up once) or dns:///NAME:PORT (every address of NAME, re-resolved), "
        "balanced round_robin with failover (docs/replicas.md)",
    )
    p.add_argument("--api-key", default=os.environ.get("FLUX2_API_KEY"), help="API key (default: $FLUX2_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS; needs --tls-key")
    p.add_argument("--tls-key", help="client key (PEM) for mutual TLS; needs --tls-cert")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call")
    p.add_argument(
        "--encoder-model",
        default=None,
        metavar="NAME",
        help="which of the server's models to use, when it serves several (names: `flux2-dit info`)",
    )
    p.add_argument(
        "--no-elide",
        action="store_true",
        help="receive every embedding whole (512 rows); by default only a prompt's real rows travel when the "
        "server has a pad table, and the pad rows are put back from a copy kept in the cache dir "
        "(bit-identical either way; docs/client.md)",
    )


def encoder_from_args(args: argparse.Namespace) -> RemoteTextEncoder:
    tls = None
    # Any TLS flag means TLS; TLSConfig refuses a certificate without its key and the reverse.
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TLSConfig(ca_cert=args.tls_ca, client_cert=args.tls_cert, client_key=args.tls_key)
    return RemoteTextEncoder(
        args.encoder,
        api_key=args.api_key,
        tls=tls,
        timeout=args.timeout,
        model=args.encoder_model,
        elide=not args.no_elide,
    )
