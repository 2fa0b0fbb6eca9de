"""A ``torch.utils.data.Dataset`` over an :class:`EmbeddingStore`: what a FLUX.2 training step needs.

Each sample is ``{"caption", "prompt_embeds", "text_ids"}``. ``text_ids`` are
built by diffusers' own ``Flux2Pipeline._prepare_text_ids``, so a batch from the
default ``collate_fn`` is exactly what ``Flux2Pipeline.encode_prompt`` would
return: ``prompt_embeds [B, 512, D]`` and ``text_ids [B, 512, 4]`` (int64).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from dit_client.training.store import EmbeddingStore


def text_ids_for(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Position ids of text tokens, as ``Flux2Pipeline._prepare_text_ids`` builds them.

    Args:
        prompt_embeds: ``[L, D]`` (one prompt) or ``[B, L, D]``.

    Returns:
        ``[L, 4]`` or ``[B, L, 4]`` int64 coordinates ``(t=0, h=0, w=0, l)``.
    """
    from diffusers import Flux2Pipeline

    if prompt_embeds.ndim == 2:
        return Flux2Pipeline._prepare_text_ids(prompt_embeds.unsqueeze(0))[0]
    return Flux2Pipeline._prepare_text_ids(prompt_embeds)


class EmbeddingDataset(Dataset):
    """Samples of precomputed prompt embeddings, read from a store on demand (memory-mapped).

    Args:
        store: an :class:`EmbeddingStore` or its directory.
        captions: the caption of each sample, in order (for example one per
            training image, repeats allowed); default: every stored caption once.
            All must be in the store; missing ones are reported up front.

    Each item is a dict:
        ``caption`` (str), ``prompt_embeds`` ``[L, D]`` in the store's dtype
        (``[512, 15360]`` bfloat16 for FLUX.2-dev), ``text_ids`` ``[L, 4]`` int64.
    """

    def __init__(self, store: EmbeddingStore | str | os.PathLike, captions: Sequence[str] | None = None):
        self.store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
        self.captions = list(self.store) if captions is None else list(captions)
        missing = [c for c in self.captions if c not in self.store]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(self.captions)} captions are not in the store {self.store.path} "
                f"(first: {missing[0][:80]!r}); run `flux2-dit precompute` on them first"
            )
        # Every prompt has the same length, so every sample shares one set of ids.
        length = self.store.info.shape[0]
        self._text_ids = text_ids_for(torch.empty((length, 0)))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        caption = self.captions[index]
        return {
            "caption": caption,
            "prompt_embeds": self.store.get(caption),
            "text_ids": self._text_ids.clone(),
        }
