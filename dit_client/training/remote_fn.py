"""``remote_text_encoder``: the remote text-encoder function of diffusers' FLUX.2 LoRA script, backed by this service.

``examples/dreambooth/train_dreambooth_lora_flux2.py --remote_text_encoder``
calls ``compute_remote_text_embeddings(prompts) -> (prompt_embeds, text_ids)``
and posts one caption per HTTP request, in sequence, with no retry. This
function has the same shape, but sends all prompts over one gRPC stream in
batches, retries transient failures, verifies every byte (CRC-32C and model
fingerprint), and can answer from a precomputed :class:`EmbeddingStore` first::

    from functools import partial
    compute_remote_text_embeddings = partial(
        remote_text_encoder, encoder=RemoteTextEncoder("gpu-box:50051"), device=accelerator.device
    )
    prompt_embeds, text_ids = compute_remote_text_embeddings(batch["prompts"])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dit_client.remote import RemoteTextEncoder
from dit_client.retry import RetryPolicy
from dit_client.training.dataset import text_ids_for
from dit_client.training.store import EmbeddingStore


def remote_text_encoder(
    prompts: str | Sequence[str],
    *,
    encoder: RemoteTextEncoder,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    store: EmbeddingStore | None = None,
    batch_size: int | None = None,
    max_in_flight: int | None = None,
    retry: RetryPolicy | None = None,
    model: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and text ids for ``prompts``, like ``Flux2Pipeline.encode_prompt`` returns them.

    Args:
        prompts: one prompt or a list.
        encoder: client of the encoder service.
        device: where the outputs go (e.g. ``accelerator.device``); default CPU.
        dtype: output dtype; default the service's (bit-exact; bfloat16 for FLUX.2-dev).
        store: a precomputed store; prompts found there are not sent to the service.
            It must come from the same model fingerprint as the service.
        batch_size, max_in_flight, retry: see :meth:`RemoteTextEncoder.encode_stream`.
        model: which of the server's models encodes (default: the encoder's ``model``).

    Returns:
        ``(prompt_embeds [B, 512, D], text_ids [B, 512, 4] int64)`` on ``device``;
        duplicate prompts are encoded once.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    info = encoder.info(model=model)
    if store is not None and store.fingerprint != info.fingerprint:
        from common.errors import IntegrityError

        raise IntegrityError(
            f"the store {store.path} was made by fingerprint {store.fingerprint}, the encoder serves {info.fingerprint}"
        )
    out = torch.empty((len(prompts), info.max_sequence_length, info.embedding_dim), dtype=info.dtype)
    rows_of: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        rows_of.setdefault(prompt, []).append(row)
    missing = []
    for prompt, rows in rows_of.items():
        if store is not None and prompt in store:
            out[rows] = store.get(prompt)
        else:
            missing.append(prompt)
    if missing:
        for result in encoder.encode_stream(
            missing, batch_size=batch_size, max_in_flight=max_in_flight, retry=retry, model=model
        ):
            out[rows_of[result.prompt]] = result.embedding
    prompt_embeds = out.to(device=device, dtype=dtype or out.dtype)
    return prompt_embeds, text_ids_for(prompt_embeds).to(device)
