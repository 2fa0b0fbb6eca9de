"""flux2-remote client side: remote prompt embeddings, local DiT + VAE.

Names are imported on first use (PEP 562), so ``import dit_client.cli`` does
not load gRPC before the command line has set gRPC's log level.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "EncoderInfo": "dit_client.frames",
    "PromptMetadata": "dit_client.frames",
    "RemoteTextEncoder": "dit_client.remote",
    "TLSConfig": "dit_client.connection",
    "DiTClient": "dit_client.generate",
    "DiTConfig": "dit_client.dit_config",
    "GenerationResult": "dit_client.generate",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'dit_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
