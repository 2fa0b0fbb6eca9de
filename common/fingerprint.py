"""Model fingerprints: one short id for "these inputs give these embeddings".

A fingerprint covers the weights, the tokenizer, the recipe (EncoderSpec), the
dtype and the quantization. Caches are keyed by it and clients check it, so
embeddings from two different models are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from common.encoder_spec import EncoderSpec

# Files at or under this size are hashed in full; above it (multi-GB shards) we
# hash size + safetensors header + sampled blocks, unless the HF cache already
# names the blob by its sha256.
_FULL_HASH_LIMIT = 256 * 1024 * 1024
_SAMPLE = 1024 * 1024


def _hf_blob_sha256(path: Path) -> str | None:
    """huggingface_hub stores LFS files as blobs named by their sha256; reuse it."""
    if not path.is_symlink():
        return None
    name = Path(os.path.realpath(path)).name
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def file_digest(path: Path) -> str:
    """A content digest of one file, cheap for very large weight shards."""
    blob = _hf_blob_sha256(path)
    if blob is not None:
        return f"sha256:{blob}"
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return f"sha256:{h.hexdigest()}"
        h.update(size.to_bytes(8, "little"))
        # The safetensors header lists every tensor's name, dtype, shape and offsets.
        head_len = int.from_bytes(f.read(8), "little")
        f.seek(0)
        h.update(f.read(min(8 + head_len, 64 * _SAMPLE)))
        for i in range(16):
            f.seek((size - _SAMPLE) * i // 15)
            h.update(f.read(_SAMPLE))
    return f"sampled-sha256:{h.hexdigest()}"


def folder_digest(
    folder: Path, patterns: tuple[str, ...] = ("*.json", "*.jinja", "*.safetensors", "*.model")
) -> dict[str, str]:
    """Digests of the files in ``folder`` that define a model component."""
    out: dict[str, str] = {}
    for pattern in patterns:
        for p in sorted(folder.glob(pattern)):
            out[p.name] = file_digest(p)
    return out


def fingerprint(
    text_encoder_dir: Path,
    tokenizer_dir: Path,
    spec: EncoderSpec,
    dtype: str,
    quantization: str,
    *,
    weight_files: list[Path] | None = None,
) -> str:
    """``"<recipe>:<16 hex>"``, stable across machines for the same files and settings.

    ``weight_files``: the checkpoint files the embeddings depend on (default: every
    ``*.safetensors`` in ``text_encoder_dir``). Naming them makes the fingerprint the
    same whether or not the shards the recipe never reads are present; the weight
    index, which lists those too, is then left out.
    """
    doc = {
        "recipe": spec.name,
        "layers": list(spec.hidden_states_layers),
        "max_sequence_length": spec.max_sequence_length,
        "system_message": spec.system_message,
        "dtype": dtype,
        "quantization": quantization,
        "text_encoder": _text_encoder_digest(text_encoder_dir, weight_files),
        "tokenizer": folder_digest(tokenizer_dir),
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return f"{spec.name.split('/')[0]}:{digest[:16]}"


def _text_encoder_digest(folder: Path, weight_files: list[Path] | None) -> dict[str, str]:
    if weight_files is None:
        return folder_digest(folder)
    out = {
        name: d
        for name, d in folder_digest(folder, ("*.json", "*.jinja", "*.model")).items()
        if not name.endswith(".index.json")
    }
    out.update({p.name: file_digest(p) for p in weight_files})
    return out
