"""Container health check: exit 0 when the encoder's grpc.health.v1 says SERVING, 1 otherwise.

Used by docker/Dockerfile.encoder and docker-compose.yml. Health checks need
no API key (see docs/security.md); with TLS pass the CA, and with mutual TLS a
client certificate too.

    python docker/healthcheck.py --target 127.0.0.1:50051 [--tls-ca ca.pem [--tls-cert c.pem --tls-key k.pem]]

Every flag also reads an environment variable (``FLUX2_HEALTHCHECK_TLS_CA``,
``..._TLS_CERT``, ``..._TLS_KEY``, ``..._SERVER_NAME``, ``..._TARGET``), so the
container's environment turns TLS on for the server's check and for the
image's HEALTHCHECK alike, without editing the command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "flux2.encoder.v1.TextEncoder"


def check(
    target: str,
    *,
    timeout: float = 5.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    server_name: str | None = None,
) -> str:
    """The serving status name of the TextEncoder service at ``target`` (``UNREACHABLE`` on errors)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS needs both)")
    if tls_ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes(),
            private_key=Path(tls_key).read_bytes() if tls_key else None,
            certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
        )
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout
            )
        except grpc.RpcError as err:
            return f"UNREACHABLE ({err.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


ENV_PREFIX = "FLUX2_HEALTHCHECK_"


def main(argv: list[str] | None = None) -> int:
    def env(name: str, default: str | None = None) -> str | None:
        return os.environ.get(ENV_PREFIX + name) or default

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=env("TARGET", "127.0.0.1:50051"))
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--tls-ca", default=env("TLS_CA"), help=f"CA (PEM) of the server certificate (${ENV_PREFIX}TLS_CA)")
    p.add_argument(
        "--tls-cert", default=env("TLS_CERT"), help=f"client certificate for mutual TLS (${ENV_PREFIX}TLS_CERT)"
    )
    p.add_argument("--tls-key", default=env("TLS_KEY"), help=f"client key for mutual TLS (${ENV_PREFIX}TLS_KEY)")
    p.add_argument(
        "--server-name",
        default=env("SERVER_NAME"),
        help=f"name to check in the server certificate (default: the target host; ${ENV_PREFIX}SERVER_NAME)",
    )
    args = p.parse_args(argv)
    try:
        status = check(
            args.target,
            timeout=args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            server_name=args.server_name,
        )
    except (OSError, ValueError) as exc:
        print(f"{args.target}: NOT CHECKED ({exc})")
        return 1
    if status.startswith("UNREACHABLE") and not args.tls_ca:
        status += f"; if the server uses TLS, set {ENV_PREFIX}TLS_CA"
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
