"""The generated gRPC modules for the v1 API, in one place.

Everything else imports ``pb2`` and ``pb2_grpc`` from here, so a moved or
renamed proto changes one file.
"""

try:
    from proto.flux2.encoder.v1 import encoder_pb2 as pb2
    from proto.flux2.encoder.v1 import encoder_pb2_grpc as pb2_grpc
except ImportError as exc:  # pragma: no cover - only before `make proto`
    raise ImportError("gRPC stubs are missing: run `make proto` (or `python -m common.protogen`) first") from exc

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["TextEncoder"].full_name

__all__ = ["pb2", "pb2_grpc", "SERVICE_NAME"]
