"""The client's small LRU of prompt embeddings: the same prompt with another seed costs no second request."""

from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    """A small LRU of prompt embeddings keyed by ``(fingerprint, prompt text)``.

    The same prompt with other seeds or image counts then costs one request.
    Keys include the fingerprint, so embeddings of two encoder models never mix.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, fingerprint: str, prompt: str) -> torch.Tensor | None:
        key = (fingerprint, prompt)
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, fingerprint: str, prompt: str, embeds: torch.Tensor) -> None:
        if self.max_entries == 0:
            return
        self._entries[(fingerprint, prompt)] = embeds
        self._entries.move_to_end((fingerprint, prompt))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
