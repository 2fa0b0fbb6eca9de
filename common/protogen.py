"""Generate the Python gRPC stubs from proto/ (run by `make proto`).

The stubs land next to each .proto file, so `proto/flux2/encoder/v1/encoder.proto`
becomes the module `proto.flux2.encoder.v1.encoder_pb2`. Git ignores them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(root: Path = ROOT) -> list[Path]:
    """Run protoc on every .proto under ``root/proto``; return the files compiled."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted((root / "proto").rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for proto in protos:
        rel = proto.relative_to(root)
        args = [
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            str(rel),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")
    # Packages need an __init__.py so setuptools and mypy see them.
    for proto in protos:
        d = proto.parent
        while d != root:
            (d / "__init__.py").touch(exist_ok=True)
            d = d.parent
    return protos


if __name__ == "__main__":
    done = generate()
    print(f"generated stubs for {len(done)} proto file(s)", file=sys.stderr)
