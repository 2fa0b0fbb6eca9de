"""flux2-remote client side: remote prompt embeddings, local DiT + VAE."""

from dit_client.remote import EncoderInfo, PromptMetadata, RemoteTextEncoder, TLSConfig
from dit_client.generate import DiTClient, DiTConfig, GenerationResult

__all__ = [
    "EncoderInfo", "PromptMetadata", "RemoteTextEncoder", "TLSConfig",
    "DiTClient", "DiTConfig", "GenerationResult",
]
