"""Saving and loading prompt embeddings as safetensors (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic import atomic_write


def save_embeddings(path: str | os.PathLike, embeds: torch.Tensor, *, prompts: list[str], fingerprint: str) -> Path:
    """Write ``{"prompt_embeds": [B, L, D]}`` with prompts and fingerprint in the metadata, atomically."""
    metadata = {"prompts": json.dumps(prompts, ensure_ascii=False), "fingerprint": fingerprint}
    atomic_write(path, lambda tmp: save_file({"prompt_embeds": embeds.contiguous()}, str(tmp), metadata=metadata))
    return Path(path)


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], str]:
    """Read back what :func:`save_embeddings` wrote: ``(prompt_embeds, prompts, fingerprint)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    return tensors["prompt_embeds"], json.loads(meta.get("prompts", "[]")), meta.get("fingerprint", "")
