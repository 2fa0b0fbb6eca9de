"""The flux2-remote encoder service: FLUX.2 prompt embeddings over gRPC."""

__version__ = "0.1.0"
