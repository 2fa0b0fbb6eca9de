"""Encode a dataset's captions once, through the shared service, into an :class:`EmbeddingStore`.

``flux2-dit precompute`` is a thin wrapper around :func:`precompute`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from tqdm.auto import tqdm

from common.errors import IntegrityError, InvalidRequest
from dit_client.frames import EncoderInfo
from dit_client.pad_table import fetch as fetch_pad_table
from dit_client.remote import RemoteTextEncoder
from dit_client.retry import RetryPolicy
from dit_client.training.captions import iter_captions
from dit_client.training.store import DEFAULT_SHARD_BYTES, INDEX_NAME, PadTableLost, StoreInfo, StoreWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecomputeReport:
    """What a :func:`precompute` run did.

    Attributes:
        store: the store directory.
        fingerprint: model fingerprint of every embedding in the store.
        captions_read: captions in the source, duplicates included.
        unique: distinct captions in the source (in this shard, when sharded).
        already_stored: distinct captions found in the store from earlier runs (skipped).
        encoded: captions encoded and written by this run.
        repaired: stored embeddings that failed their CRC-32C (or sat in a damaged shard) and
            were dropped on opening the store; those still in the source are among ``encoded``.
        shards: shard files the store holds now.
        elapsed_s: wall time of the encoding phase, in seconds.
    """

    store: Path
    fingerprint: str
    captions_read: int
    unique: int
    already_stored: int
    encoded: int
    shards: int
    elapsed_s: float
    repaired: int = 0

    @property
    def captions_per_s(self) -> float:
        return self.encoded / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _check_caption(caption: object, position: int, max_chars: int) -> None:
    if not isinstance(caption, str):
        raise InvalidRequest(f"caption {position} is a {type(caption).__name__}, not text")
    if max_chars and len(caption) > max_chars:
        raise InvalidRequest(
            f"caption {position} has {len(caption)} characters; the encoder accepts at most {max_chars} "
            f"(only the first 512 tokens count anyway): {caption[:60]!r}..."
        )
    if "\x00" in caption:
        raise InvalidRequest(f"caption {position} contains a NUL character: {caption[:60]!r}")


def server_pad_table(encoder: RemoteTextEncoder, info: EncoderInfo) -> torch.Tensor | None:
    """The pad table of ``info``'s model, as the client holds it for elision, else fetched (``GetPadTable``).

    None when the model has none (right padding, a server from before pad tables), or
    when it cannot be had (logged): the store then keeps every row, losing only space.
    """
    held = encoder.pad_table_for(info)
    if held is not None:
        return held.rows
    entry = info.described
    if entry is None or not entry.pad_table:
        return None
    connection = encoder.connection
    try:
        return fetch_pad_table(connection.stub, entry, metadata=connection.metadata, timeout=connection.timeout)
    except (grpc.RpcError, IntegrityError) as exc:
        log.warning("could not get the pad table of %s (%s); the store keeps whole embeddings", info.model_id, exc)
        return None


def pad_table_from_server(encoder: RemoteTextEncoder, lost: PadTableLost) -> torch.Tensor:
    """The table a store lost (both copies unsound), fetched again with ``GetPadTable``.

    Only from a model of the server whose ``ModelInfo.pad_table`` is the store's table id
    (fingerprint, rows and CRC-32C: the very table); :func:`~dit_client.pad_table.fetch`
    checks the rows received against that id.

    Raises:
        PadTableLost: the server serves no model with that table, or the fetch failed
            (the message says which, and what to do).
    """
    info = encoder.info()
    entry = next((m for m in info.models if m.pad_table == lost.table_id), None)
    if entry is None:
        served = ", ".join(f"{m.name or m.model_id}: {m.pad_table or 'no table'}" for m in info.models) or "none"
        raise PadTableLost(
            lost.path,
            lost.table_id,
            lost.faults,
            f"The encoder at {encoder.target} does not serve that table (it serves {served}); point --encoder "
            "at a server with the model the store was made with, or precompute again into a new --out",
        ) from None
    connection = encoder.connection
    try:
        table = fetch_pad_table(connection.stub, entry, metadata=connection.metadata, timeout=connection.timeout)
    except (grpc.RpcError, IntegrityError) as exc:
        reason = connection.translate(exc) if isinstance(exc, grpc.RpcError) else exc
        raise PadTableLost(
            lost.path,
            lost.table_id,
            lost.faults,
            f"Fetching it from the encoder at {encoder.target} failed ({reason}); run the command again",
        ) from None
    log.warning("%s: fetched pad table %s again from %s", lost.path, lost.table_id, encoder.target)
    return table


def precompute(
    encoder: RemoteTextEncoder,
    captions: str | os.PathLike | Iterable[str],
    out: str | os.PathLike,
    *,
    caption_field: str | None = None,
    concurrency: int | None = None,
    batch_size: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    retry: RetryPolicy | None = None,
    progress: bool = True,
    model: str | None = None,
    shard: tuple[int, int] | None = None,
    verify: bool = True,
) -> PrecomputeReport:
    """Encode every distinct caption of ``captions`` that ``out`` does not hold yet.

    Resumable: run it again after any interruption (``kill -9`` included) and
    it skips what is stored, discards unfinished shards, and ends with every
    caption stored exactly once. A store made by another model fingerprint is
    refused. On opening the store it checks every stored embedding's CRC-32C
    (``verify``): the ones that fail are dropped and encoded again, and nothing else.
    A new store fetches the model's pad table (``GetPadTable``) and keeps only each
    embedding's real rows (see :mod:`dit_client.training.store`). An existing store
    whose two pad table copies are both unsound gets its table fetched again, when
    the server has a model with that table id (:func:`pad_table_from_server`).

    Args:
        encoder: client of the encoder service.
        captions: a caption source path (see :mod:`dit_client.training.captions`)
            or an iterable of caption strings (stored exactly as given).
        out: store directory (created if missing).
        caption_field: field/column holding captions in structured sources.
        concurrency: requests in flight on the stream (default: ``min(8, server limit)``).
        batch_size: captions per request (default: ``min(8, server limit)``).
        shard_bytes: target shard size in bytes; a kill loses at most one shard of work.
        retry: retry policy for transient failures.
        progress: show a tqdm bar (rate and ETA).
        model: which of the server's models encodes (default: the encoder's ``model``,
            else the server's only one); the store records its name and family.
        verify: check the CRC-32C of every embedding already stored (reads the whole store
            once) and encode the damaged ones again; ``False`` checks the shards' structure only.
        shard: ``(I, N)`` to take only every N-th distinct caption, those whose index
            (0-based, in order of first appearance in the source) modulo N is I. N
            processes with I = 0..N-1 (a Kubernetes Indexed Job) cover every caption
            exactly once, each into its own store; open them together with
            ``EmbeddingStore([dir0, dir1, ...])``. Counting distinct captions, not lines,
            keeps a caption that repeats in the source in one shard only.

    Returns:
        A :class:`PrecomputeReport`.

    Raises:
        FileNotFoundError, CaptionSourceError: the caption source cannot be read.
        InvalidRequest: a caption the service would refuse (too long, NUL); nothing is encoded.
        IntegrityError: ``out`` holds another model's embeddings.
        PadTableLost: no sound copy of ``out``'s pad table, and the server cannot give it back.
        StoreError: ``out`` is locked by another writer, is not a store, or is a version 1
            store (convert it with ``flux2-dit store convert``).
        StoreWriteError: the disk filled up (or went read-only); what the store lists stays valid.
        Flux2RemoteError: the service failed in a way retries did not fix.
    """
    if shard is not None:
        index, count = shard
        if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
            raise InvalidRequest(f"shard must be (I, N) with 0 <= I < N, got {shard!r}")
    # 1. What the service makes.
    info = encoder.info(model=model)
    if not (model or encoder.model) and len(info.models) > 1:
        # Refused here, before a store is made for the server's first model by default.
        raise InvalidRequest(
            f"the encoder at {encoder.target} serves {len(info.models)} models ({', '.join(info.model_names)}); "
            "name the one to precompute with (--encoder-model NAME, or --model DIT to match a DiT)"
        )
    store_info = StoreInfo(
        info.fingerprint,
        info.dtype,
        (info.max_sequence_length, info.embedding_dim),
        info.model_id,
        info.model_name,
        info.family,
    )
    source = iter_captions(captions, caption_field) if isinstance(captions, (str, os.PathLike)) else captions
    # An existing store keeps the table it was made with: fetch one for a new store only.
    table = None if (Path(out) / INDEX_NAME).is_file() else server_pad_table(encoder, info)

    def open_store(table: torch.Tensor | None) -> StoreWriter:
        return StoreWriter(out, store_info, shard_bytes=shard_bytes, pad_table=table, verify=verify, progress=progress)

    try:
        writer = open_store(table)
    except PadTableLost as lost:  # both copies unsound: the server's table, when it is the same one
        writer = open_store(pad_table_from_server(encoder, lost))
    with writer:
        # 2. Distinct captions (of this shard) the store lacks, in source order.
        max_chars = int(info.limits.get("max_prompt_chars") or 0)
        seen: set[str] = set()
        todo: list[str] = []
        read = mine = 0
        for caption in source:
            read += 1
            if caption not in seen:
                seen.add(caption)
                if shard is not None and (len(seen) - 1) % shard[1] != shard[0]:
                    continue  # another shard's caption
                mine += 1
                if caption not in writer:
                    # Checked before any work, so a bad caption cannot stop a long run near its end.
                    _check_caption(caption, read, max_chars)
                    todo.append(caption)
        already = mine - len(todo)
        del seen
        log.info(
            "%d captions, %d distinct%s, %d already stored, %d to encode",
            read,
            mine,
            f" in shard {shard[0]}/{shard[1]}" if shard else "",
            already,
            len(todo),
        )

        # 3. Stream them through the service into shards.
        t0 = time.perf_counter()
        with tqdm(total=len(todo), unit="caption", desc="precompute", disable=not progress, smoothing=0.05) as bar:
            if todo:
                for result in encoder.encode_stream(
                    todo, batch_size=batch_size, max_in_flight=concurrency, retry=retry, model=model
                ):
                    writer.add(result.prompt, result.embedding)
                    bar.update(1)
        elapsed = time.perf_counter() - t0
    if info.demo:
        log.warning("the encoder runs the DEMO model: its weights are random and these embeddings are noise")
    return PrecomputeReport(
        store=Path(out),
        fingerprint=info.fingerprint,
        captions_read=read,
        unique=already + len(todo),
        already_stored=already,
        encoded=len(todo),
        shards=writer.shard_count,
        elapsed_s=elapsed,
        repaired=len(writer.dropped),
    )
