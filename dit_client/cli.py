"""``flux2-dit``: the client command line. Only parses arguments and calls the library."""

from __future__ import annotations

import os

# gRPC's C core reads its log level once, when grpc is first imported, so this
# comes before every import that loads grpc: at the default level a TLS mismatch
# prints a raw handshake log line beside our one-line error. An explicit
# GRPC_VERBOSITY still wins, for debugging.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import sys

from common.errors import Flux2RemoteError
from common.logs import quiet_third_party_logs
from dit_client.commands import encode
from dit_client.commands import generate as generate_cmd
from dit_client.commands import info as info_cmd
from dit_client.commands import plan as plan_cmd
from dit_client.commands import precompute as precompute_cmd
from dit_client.commands import store as store_cmd
from dit_client.commands import upsample as upsample_cmd

# Each module adds one sub-command.
COMMANDS = [encode, generate_cmd, info_cmd, plan_cmd, precompute_cmd, store_cmd, upsample_cmd]

EXIT_ERROR = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-dit", description="FLUX.2 client: remote text encoder, local DiT.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_logs()
    try:
        return args.run(args)
    except Flux2RemoteError as exc:
        print(f"flux2-dit: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"flux2-dit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk, a folder gone read-only: the machine's state, not the flags
        print(f"flux2-dit: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("flux2-dit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
