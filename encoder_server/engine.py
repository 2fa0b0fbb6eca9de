"""Runs encode work off the event loop and returns one result per prompt.

The servicer awaits ``EncodeEngine.encode``; the engine owns the model thread,
so gRPC I/O never waits on a forward pass and the model never runs two batches
at once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.errors import NotCached
from encoder_server.identity import ANONYMOUS
from encoder_server.text_encoder import EmbeddingBackend


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's embedding and how it was made.

    Attributes:
        embedding: ``[max_sequence_length, embedding_dim]`` CPU tensor in the compute dtype.
        token_count: non-pad tokens after truncation.
        truncated: the templated prompt was cut to ``max_sequence_length``.
        queue_ns, tokenization_ns, inference_ns: where the time went, in nanoseconds.
        batch_size: prompts that shared the forward pass.
        cache_hit: served from the cache without running the model.
    """

    embedding: torch.Tensor
    token_count: int
    truncated: bool
    queue_ns: int
    tokenization_ns: int
    inference_ns: int
    batch_size: int
    cache_hit: bool = False


class EncodeEngine:
    """Serialises forward passes of one backend on a dedicated thread."""

    def __init__(self, backend: EmbeddingBackend):
        self.backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-model")
        self._lock = asyncio.Lock()

    async def encode(
        self,
        prompts: list[str],
        *,
        user: str = ANONYMOUS,
        cache_only: bool = False,
        deadline: float | None = None,
    ) -> list[EncodedPrompt]:
        """Embeddings for ``prompts``, in order.

        Args:
            prompts: validated prompt texts.
            user: who asks (for fair scheduling, quotas and metrics).
            cache_only: answer from the cache only; a miss raises ``NotCached``.
            deadline: ``time.monotonic()`` value after which the result is useless.
        """
        if cache_only:
            raise NotCached("cache_only: this server keeps no cache, so nothing is cached")
        t_enqueued = time.perf_counter_ns()
        async with self._lock:
            queue_ns = time.perf_counter_ns() - t_enqueued
            loop = asyncio.get_running_loop()
            batch = await loop.run_in_executor(self._executor, self.backend.encode, prompts)
        return [
            EncodedPrompt(
                embedding=batch.embeddings[i],
                token_count=batch.token_counts[i],
                truncated=batch.truncated[i],
                queue_ns=queue_ns,
                tokenization_ns=batch.tokenization_ns,
                inference_ns=batch.inference_ns,
                batch_size=len(prompts),
            )
            for i in range(len(prompts))
        ]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
