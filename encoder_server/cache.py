"""Embedding caches: an in-memory LRU in front of a persistent, content-addressed disk cache.

An entry is addressed by :func:`cache_key`, a SHA-256 of the model fingerprint
(weights, tokenizer, recipe, dtype, quantization) and the prompt, so an entry
can never be served for another model or recipe.

Compact entries: when the model has a pad table (a left-padded model whose pad
rows are the same for every prompt, see common/pad_table.py), an entry keeps only
the prompt's real rows, the number of leading pad rows left out and the table's
id; the engine puts the table's rows back on a hit, bit for bit, or hands the
real rows straight to an elided answer. An entry leaves rows out only when they
equal the table bit for bit, so nothing is lost. FLUX.2-dev prompts fill 43-132
of 512 rows, so the same bytes hold 4-10x more prompts.

Every entry carries a CRC-32C of its content (the stored rows and everything that
gives them meaning: dtype, shape, token count, truncation, pad count, table id),
computed once when the entry is made and verified on every read, in memory as
on disk and in the shared cache: a failed check is a miss, the entry is dropped
and ``flux2_encoder_cache_corrupt_total`` counts it.

Disk entries are safetensors files (never pickle) holding the rows and, in the
safetensors metadata, the key, token count, truncation flag, pad count, table id
and the CRC-32C. Writes go to a temporary file that is fsynced and renamed into
place, so a crash leaves either the whole entry or none; reads check the key and
the CRC, and a damaged entry is deleted and reported as a miss (the engine then
recomputes it). Entries written before compact entries existed (format
``flux2-remote-embedding/1``: the full tensor, a CRC that also covers the key)
are still read, as full entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch

from common.atomic import TMP_SUFFIX, atomic_write
from common.pad_table import rebuild, same_bits
from common.wire import crc32c, tensor_bytes

log = logging.getLogger(__name__)

# Names every key; unchanged when the entry layout changed, so entries written before are still found.
_KEY_NAMESPACE = "flux2-remote-embedding/1"
# The entry layout written now: real rows, pad count, pad table id, content CRC.
CACHE_FORMAT = "flux2-remote-embedding/2"
# The layout written before compact entries: the full tensor and a CRC that covers the key. Still read.
_FULL_FORMAT = "flux2-remote-embedding/1"
_SUFFIX = ".safetensors"
# Temporary files older than this are leftovers of a crashed writer (a live
# writer renames its file within milliseconds).
_STALE_TMP_S = 3600.0


def cache_key(fingerprint: str, prompt: str, scope: str = "") -> str:
    """64 hex chars naming the embedding of ``prompt`` under the model ``fingerprint``.

    ``scope`` is ``""`` when every user shares the cache, and the user's name
    with ``--cache-scope user``, so one user's entries can never answer another.
    Length-prefixed so no (fingerprint, prompt, scope) can collide with another by concatenation.
    """
    h = hashlib.sha256()
    # A shared entry keeps the key it had before scopes existed, so disk caches stay valid.
    parts = (_KEY_NAMESPACE, fingerprint, prompt) + ((f"user:{scope}",) if scope else ())
    for part in parts:
        # surrogatepass: validation refuses lone surrogates, but a key must never be what fails.
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# What a memory-cache entry holds besides its tensor's storage: the tensor and storage
# objects, the allocator's header, the CachedEmbedding, its 64-character key and its
# slot in the LRU. Measured: 650-860 bytes (VmRSS over 2,000 to 20,000 entries);
# tests/encoder_server/test_cache.py checks the cache's total against RSS.
ENTRY_OVERHEAD_BYTES = 768


def rebuild_rows(rows: torch.Tensor, pad_count: int, table: torch.Tensor) -> torch.Tensor:
    """``[pad_count + n, D]``: the table's first ``pad_count`` rows, then ``rows`` (``[n, D]``), bit for bit.

    :func:`common.pad_table.rebuild`, copied by numpy on the calling thread: ``torch.cat``
    of a 15 MiB result runs in torch's thread pool, and on a machine whose cores are busy
    (a server's model thread) its threads wait for each other. Measured on the busy
    2-core VM (benchmarks/cache_size.py, docs/benchmarks.md): ``torch.cat`` 1.4-32 ms
    from run to run, this 2.3-2.8 ms.
    """
    if pad_count == 0:
        return rows
    if rows.dtype != table.dtype or not rows.is_contiguous() or rows.device.type != "cpu":
        return rebuild(rows, pad_count, table)  # casts and checks; not what the engine stores
    if pad_count > table.shape[0] or table.shape[1] != rows.shape[1]:
        raise ValueError(
            f"cannot put back {pad_count} pad rows of width {rows.shape[1]} from a table of "
            f"{table.shape[0]} rows of width {table.shape[1]}"
        )
    out = torch.empty((pad_count + rows.shape[0], rows.shape[1]), dtype=rows.dtype)
    as_bytes = out.view(torch.uint8).numpy()  # bf16 has no numpy dtype; its bytes do
    as_bytes[:pad_count] = table[:pad_count].contiguous().view(torch.uint8).numpy()
    as_bytes[pad_count:] = rows.view(torch.uint8).numpy()
    return out


def own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of ``tensor`` whose storage is exactly its own elements.

    A row of a batch (or any view) keeps its whole base storage alive; a cache
    entry made of one would hold, and should count, all of it.
    """
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def _owns_exactly(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is contiguous and its storage holds nothing else."""
    return (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


@dataclass(frozen=True)
class CachedEmbedding:
    """What a cache holds for one prompt.

    Attributes:
        embedding: the stored rows, a CPU tensor in the compute dtype: the full
            ``[max_sequence_length, embedding_dim]`` embedding when ``pad_count`` is 0, else
            its last ``max_sequence_length - pad_count`` rows (the prompt's real rows).
            The engine's entries, and every entry the memory cache keeps, own exactly
            their storage (never a view into a batch).
        token_count: non-pad tokens after truncation.
        truncated: the templated prompt was cut to ``max_sequence_length``.
        pad_count: leading rows left out; they are the first ``pad_count`` rows of the pad table.
        pad_table: the id of that table (:func:`common.pad_table.pad_table_id`); ``""`` when
            nothing is left out.
        checksum: CRC-32C of the content (:func:`content_checksum`); computed when omitted.
            Carried, not recomputed, when the entry is written, so damage in between is caught.
    """

    embedding: torch.Tensor
    token_count: int
    truncated: bool
    pad_count: int = 0
    pad_table: str = ""
    checksum: int | None = None

    def __post_init__(self):
        if self.checksum is None:
            object.__setattr__(self, "checksum", content_checksum(self))

    @classmethod
    def owning(
        cls, embedding: torch.Tensor, token_count: int, truncated: bool, pad_count: int = 0, pad_table: str = ""
    ) -> CachedEmbedding:
        """An entry whose embedding owns exactly its storage: ``embedding`` itself when it
        already does, else a copy (:func:`own_copy`)."""
        rows = embedding if _owns_exactly(embedding) else own_copy(embedding)
        return cls(rows, token_count, truncated, pad_count, pad_table)

    @classmethod
    def compact(
        cls,
        embedding: torch.Tensor,
        token_count: int,
        truncated: bool,
        table: torch.Tensor | None,
        table_id: str,
    ) -> CachedEmbedding:
        """The entry for a full ``[L, D]`` embedding, keeping only its real rows when it can.

        Its leading ``L - token_count`` rows (at most the table's ``P``) are left out only
        when they equal ``table`` (``[P, D]``, same dtype) bit for bit; otherwise, and
        without a table, the entry keeps the whole embedding. Owns exactly its storage.
        """
        if table is None:
            return cls.owning(embedding, token_count, truncated)
        pad = min(embedding.shape[0] - token_count, table.shape[0])
        if pad > 0 and same_bits(embedding[:pad], table[:pad]):
            return cls.owning(embedding[pad:], token_count, truncated, pad, table_id)
        return cls.owning(embedding, token_count, truncated)

    def full(self, table: torch.Tensor | None) -> torch.Tensor:
        """The ``[L, D]`` embedding: the table's first ``pad_count`` rows, then the stored rows.

        Without left-out rows, the stored tensor itself (shared: never modify it in place).
        """
        if self.pad_count == 0:
            return self.embedding
        if table is None:
            raise ValueError("this entry left pad rows out, and no pad table was given to put them back")
        return rebuild_rows(self.embedding, self.pad_count, table)

    def intact(self) -> bool:
        """True when the content still matches the checksum made with the entry."""
        return content_checksum(self) == self.checksum

    @property
    def owns_its_bytes(self) -> bool:
        """True when the embedding's storage is exactly its own elements."""
        return _owns_exactly(self.embedding)

    @property
    def nbytes(self) -> int:
        """Memory this entry keeps alive: the whole storage behind its tensor (a view keeps
        all of a bigger tensor), plus ``ENTRY_OVERHEAD_BYTES`` for the objects around it."""
        return self.embedding.untyped_storage().nbytes() + ENTRY_OVERHEAD_BYTES


class MemoryCache:
    """Least-recently-used cache bounded in bytes. Thread-safe.

    Every entry it keeps owns exactly its storage (one that does not, a view,
    is copied first), and is counted at what it holds in memory
    (:attr:`CachedEmbedding.nbytes`: storage and objects; a compact entry its
    real rows only). What the process's allocator wastes around the entries is
    not counted: see the "Soak" section of docs/benchmarks.md. Every hit checks
    the entry's checksum (a tensor changed in place by a bug is dropped, not
    served).

    Args:
        max_bytes: total bytes kept; 0 keeps nothing.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[CachedEmbedding, int]] = OrderedDict()  # key -> (entry, counted bytes)
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.corrupt = 0
        # Set by the engine to count into its metrics; called with the number evicted.
        self.on_evict: Callable[[int], None] | None = None
        self.on_corrupt: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedEmbedding | None:
        """The entry for ``key``, or None when absent or when it fails its checksum (then dropped)."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
        entry = found[0]
        if entry.intact():
            return entry
        log.warning("memory cache: dropping entry %s, its content no longer matches its checksum", key[:16])
        with self._lock:
            if self._entries.get(key) is found:
                del self._entries[key]
                self._bytes -= found[1]
            self.corrupt += 1
        if self.on_corrupt is not None:
            self.on_corrupt()
        return None

    def put(self, key: str, entry: CachedEmbedding) -> None:
        t = entry.embedding
        if t.numel() * t.element_size() + ENTRY_OVERHEAD_BYTES > self.max_bytes:
            return
        if not entry.owns_its_bytes:
            entry = replace(entry, embedding=own_copy(t))  # the same content: the checksum stays
        size = entry.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (entry, size)
            self._bytes += size
            evicted_count = 0
            while self._bytes > self.max_bytes:
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self._bytes -= evicted_size
                evicted_count += 1
            self.evictions += evicted_count
        if evicted_count and self.on_evict is not None:
            self.on_evict(evicted_count)


class DiskCache:
    """Persistent cache in ``root``: one safetensors file per entry, LRU within ``max_bytes``.

    Layout: ``root/<key[:2]>/<key>.safetensors``. Recency is the file's mtime,
    refreshed on every hit, so the LRU order survives restarts. Several
    processes may share a folder (writes are atomic renames); each keeps its
    own size accounting, so the bound holds per process.

    Args:
        root: cache folder (created if missing).
        max_bytes: bound on the total size of entry files.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.corrupt = 0
        # Set by the engine to count into its metrics.
        self.on_evict: Callable[[int], None] | None = None
        self.on_corrupt: Callable[[], None] | None = None
        self._scan()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._index)

    def path_of(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    # -- read ------------------------------------------------------------

    def get(self, key: str) -> CachedEmbedding | None:
        """The entry for ``key``, or None when absent or damaged (a damaged file is deleted)."""
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._forget(key)
            return None
        try:
            entry = _decode(data, key)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # any damage; BaseException: a Rust panic in a parser is not an Exception
            log.warning("disk cache: dropping damaged entry %s: %s", path.name, exc)
            self.corrupt += 1
            if self.on_corrupt is not None:
                self.on_corrupt()
            self._remove(key)
            return None
        try:
            os.utime(path)
        except OSError:
            pass  # recency is advisory
        victims: list[str] = []
        with self._lock:
            if key not in self._index:
                victims = self._add_locked(key, len(data))  # written by another process sharing the folder
            else:
                self._index.move_to_end(key)
        for victim in victims:
            self._unlink(victim)
        return entry

    # -- write -----------------------------------------------------------

    def put(self, key: str, entry: CachedEmbedding) -> None:
        """Write ``entry`` atomically: a reader sees the whole file or none."""
        data = _encode(key, entry)
        if len(data) > self.max_bytes:
            return
        path = self.path_of(key)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._bytes -= old
            victims = self._add_locked(key, len(data))
        for victim in victims:
            self._unlink(victim)
        if victims and self.on_evict is not None:
            self.on_evict(len(victims))

    # -- internals -------------------------------------------------------

    def _add_locked(self, key: str, size: int) -> list[str]:
        """Record ``key``; return the keys evicted to stay within the bound (files not yet deleted)."""
        self._index[key] = size
        self._bytes += size
        victims = []
        while self._bytes > self.max_bytes and len(self._index) > 1:
            victim, vsize = self._index.popitem(last=False)
            self._bytes -= vsize
            self.evictions += 1
            victims.append(victim)
        return victims

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size

    def _remove(self, key: str) -> None:
        self._forget(key)
        self._unlink(key)

    def _unlink(self, key: str) -> None:
        try:
            self.path_of(key).unlink()
        except FileNotFoundError:
            pass

    def _scan(self) -> None:
        """Index existing entries oldest first; delete leftovers of crashed writers; apply the bound."""
        found: list[tuple[float, str, int]] = []
        now = time.time()
        for path in self.root.glob("??/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.name.startswith(".") and path.name.endswith(TMP_SUFFIX):  # common.atomic's temporaries
                if now - st.st_mtime > _STALE_TMP_S:
                    path.unlink(missing_ok=True)
                continue
            if path.suffix == _SUFFIX and len(path.stem) == 64:
                found.append((st.st_mtime, path.stem, st.st_size))
        found.sort()
        victims: list[str] = []
        with self._lock:
            for _, key, size in found:
                victims.extend(self._add_locked(key, size))
        for victim in victims:
            self._unlink(victim)
        if found:
            log.info("disk cache %s: %d entries, %.1f MiB", self.root, len(self._index), self._bytes / 2**20)


def _encode(key: str, entry: CachedEmbedding) -> bytes:
    tensor = entry.embedding.detach().contiguous().cpu()
    metadata = {
        "format": CACHE_FORMAT,
        "key": key,
        "token_count": str(int(entry.token_count)),
        "truncated": "1" if entry.truncated else "0",
        "pad_count": str(int(entry.pad_count)),
        "pad_table": entry.pad_table,
        # The checksum made with the entry, not one made now: damage in between must not pass.
        "crc32c": str(entry.checksum),
    }
    return safetensors.torch.save({"embedding": tensor}, metadata=metadata)


def _decode(data: bytes, key: str) -> CachedEmbedding:
    """Parse and verify one entry file; raise ValueError (or a safetensors error) on any mismatch."""
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise ValueError("truncated header")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    layout = metadata.get("format")
    if layout not in (CACHE_FORMAT, _FULL_FORMAT):
        raise ValueError(f"format {layout!r}, expected {CACHE_FORMAT!r}")
    if metadata.get("key") != key:
        raise ValueError("entry belongs to another key")
    tensors = safetensors.torch.load(data)
    if set(tensors) != {"embedding"}:
        raise ValueError(f"unexpected tensors {sorted(tensors)}")
    embedding = tensors["embedding"]
    token_count, truncated = int(metadata["token_count"]), metadata["truncated"] == "1"
    if layout == _FULL_FORMAT:
        if str(_full_format_checksum(key, embedding, token_count, truncated)) != metadata.get("crc32c"):
            raise ValueError("CRC-32C mismatch")
        return CachedEmbedding(embedding, token_count, truncated)
    entry = CachedEmbedding(embedding, token_count, truncated, int(metadata["pad_count"]), metadata["pad_table"])
    if str(entry.checksum) != metadata.get("crc32c"):
        raise ValueError("CRC-32C mismatch")
    if entry.pad_count < 0 or (entry.pad_count > 0) != bool(entry.pad_table):
        raise ValueError(f"pad count {entry.pad_count} with pad table {entry.pad_table!r}")
    return entry


def content_checksum(entry: CachedEmbedding) -> int:
    """CRC-32C over everything served from an entry: the stored bytes, and the dtype, shape and
    fields that give them meaning (a flipped shape, token count or pad count must not pass either)."""
    tensor = entry.embedding
    described = (
        f"{tensor.dtype}|{tuple(tensor.shape)}|{int(entry.token_count)}|{int(entry.truncated)}|"
        f"{int(entry.pad_count)}|{entry.pad_table}"
    ).encode()
    return crc32c(tensor_bytes(tensor), crc32c(described))


def _full_format_checksum(key: str, tensor: torch.Tensor, token_count: int, truncated: bool) -> int:
    """The CRC-32C of a ``flux2-remote-embedding/1`` entry (it covered the key too)."""
    described = f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|{int(token_count)}|{int(truncated)}".encode()
    return crc32c(tensor_bytes(tensor), crc32c(described))


def encode_entry(key: str, entry: CachedEmbedding) -> bytes:
    """The bytes of one checksummed entry (safetensors), as the disk cache and the shared cache store it."""
    return _encode(key, entry)


def decode_entry(data: bytes, key: str) -> CachedEmbedding:
    """Parse and verify one entry made by :func:`encode_entry` for ``key``; raise on any damage or mismatch."""
    return _decode(data, key)
