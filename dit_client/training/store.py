"""A directory of precomputed prompt embeddings: sharded safetensors plus an index.

Layout of a store directory::

    index.json                       format, model fingerprint, dtype, row shape, committed shards
    shard-000000-1a2b3c4d.safetensors  "embeddings" [N, 512, D] + metadata: captions (JSON list), fingerprint
    shard-000001-....safetensors
    .lock                            held by the one process writing (flock)

Rules that make it safe to kill a writer at any moment (``kill -9`` included):

* a shard is written to a hidden temporary file, fsynced, then renamed into
  place, so a ``shard-*.safetensors`` name only ever holds a complete file;
* the index is rewritten the same way after each shard, so it only ever lists
  complete shards;
* on reopening, :class:`StoreWriter` deletes temporary files, drops index
  entries whose file is missing or damaged, and adopts complete shards that
  were renamed into place just before the index could list them (or deletes
  them if they would duplicate a caption).

Readers (:class:`EmbeddingStore`) see only what the index lists, read each
row straight from the memory-mapped shard (``safetensors.safe_open``), and never
unpickle anything. One store holds embeddings of one model fingerprint only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.atomic import TMP_SUFFIX, atomic_write
from common.dtypes import DTYPE_NAMES, row_of, torch_dtype
from common.errors import IntegrityError

log = logging.getLogger(__name__)

FORMAT = "flux2-remote-embeddings"
VERSION = 1
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
TENSOR_KEY = "embeddings"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
# 8 FLUX.2-dev embeddings (15.7 MB each) per shard: a kill loses at most two
# shards of work (one filling, one being written); the writer holds two buffers.
DEFAULT_SHARD_BYTES = 128 * 1024 * 1024
# Captions live in the shard's JSON header; this keeps the header far below
# safetensors' 100 MB header limit even for 16k-character captions.
MAX_SHARD_ROWS = 4096
# Open shard files kept mapped at once by a reader.
_MAX_OPEN_SHARDS = 64


class StoreWriteError(OSError):
    """A shard or the index could not be written (a full disk, a folder that went read-only...)."""


class StoreError(ValueError):
    """The directory is not a usable store (not a store, locked by another writer, wrong layout)."""


@dataclass(frozen=True)
class StoreInfo:
    """What every embedding in a store shares.

    Attributes:
        fingerprint: the encoder's model fingerprint (see ``GetInfo``).
        dtype: element type, as the service sent it (``torch.bfloat16`` for FLUX.2-dev).
        shape: shape of one embedding, ``(max_sequence_length, embedding_dim)``, e.g. ``(512, 15360)``.
        model_id: the model the server reported, for people reading the index.
        model_name: the server's name for that model (``EncodeRequest.model``; ``""``
            from servers before several models).
        family: its embedding recipe, ``flux2-dev`` or ``flux2-klein`` (``""`` when unknown).
    """

    fingerprint: str
    dtype: torch.dtype
    shape: tuple[int, int]
    model_id: str = ""
    model_name: str = ""
    family: str = ""

    def describe(self) -> str:
        """``model 'klein' (flux2-klein, FLUX.2-klein-4B, fingerprint ...)``, for messages."""
        name = f"model {self.model_name!r}" if self.model_name else "model"
        what = ", ".join(x for x in (self.family, self.model_id) if x)
        return f"{name} ({what + ', ' if what else ''}fingerprint {self.fingerprint})"

    @property
    def row_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "dtype": DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
            "model_id": self.model_id,
            "model_name": self.model_name,
            "family": self.family,
        }

    @classmethod
    def from_json(cls, data: dict, where: str) -> StoreInfo:
        try:
            dtype = torch_dtype(data["dtype"])
            shape = tuple(int(x) for x in data["shape"])
            if len(shape) != 2:
                raise ValueError("shape must have 2 dimensions")
            return cls(
                str(data["fingerprint"]),
                dtype,
                shape,
                str(data.get("model_id", "")),  # type: ignore[arg-type]
                str(data.get("model_name", "")),
                str(data.get("family", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"{where}: malformed store index ({exc})") from None


@dataclass(frozen=True)
class _ShardEntry:
    file: str
    count: int
    bytes: int


# -- files -------------------------------------------------------------------


def _read_index(path: Path) -> tuple[StoreInfo, list[_ShardEntry]] | None:
    index = path / INDEX_NAME
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{index}: unreadable store index ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{index} is not a {FORMAT} index")
    if data.get("version") != VERSION:
        raise StoreError(f"{index}: store format version {data.get('version')} is not supported (this is {VERSION})")
    info = StoreInfo.from_json(data, str(index))
    try:
        shards = [_ShardEntry(str(s["file"]), int(s["count"]), int(s["bytes"])) for s in data.get("shards", [])]
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"{index}: malformed shard list ({exc})") from None
    for s in shards:
        if Path(s.file).name != s.file or not s.file.startswith(SHARD_PREFIX):
            raise StoreError(f"{index}: shard name {s.file!r} is not a plain shard file name")
    return info, shards


def _write_index(path: Path, info: StoreInfo, shards: list[_ShardEntry]) -> None:
    data = {
        "format": FORMAT,
        "version": VERSION,
        **info.to_json(),
        "count": sum(s.count for s in shards),
        "shards": [{"file": s.file, "count": s.count, "bytes": s.bytes} for s in shards],
    }
    atomic_write(path / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(data, indent=1), encoding="utf-8"))


def _read_shard_header(file: Path, info: StoreInfo) -> list[str]:
    """The captions of a complete, consistent shard; raises IntegrityError for anything else."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{file.name}: truncated (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise IntegrityError(f"{file.name}: truncated header")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{file.name}: unreadable shard ({exc})") from None
    tensor = header.get(TENSOR_KEY)
    meta = header.get("__metadata__") or {}
    if not isinstance(tensor, dict) or "data_offsets" not in tensor:
        raise IntegrityError(f"{file.name}: no {TENSOR_KEY!r} tensor")
    if 8 + header_len + int(tensor["data_offsets"][1]) != size:
        raise IntegrityError(f"{file.name}: size {size} does not match its header (torn write?)")
    if meta.get("fingerprint") != info.fingerprint:
        raise IntegrityError(
            f"{file.name}: made by fingerprint {meta.get('fingerprint')}, the store holds {info.fingerprint}"
        )
    try:
        captions = json.loads(meta["captions"])
    except (KeyError, ValueError):
        raise IntegrityError(f"{file.name}: no caption list in its metadata") from None
    shape = tuple(tensor.get("shape", ()))
    if shape != (len(captions), *info.shape):
        raise IntegrityError(f"{file.name}: tensor shape {shape} does not fit {len(captions)} captions of {info.shape}")
    if tensor.get("dtype") != row_of(info.dtype).safetensors:
        raise IntegrityError(f"{file.name}: dtype {tensor.get('dtype')} is not the store's {DTYPE_NAMES[info.dtype]}")
    return captions


# -- reading -----------------------------------------------------------------


class EmbeddingStore:
    """Read-only view of a store directory written by :func:`dit_client.training.precompute`.

    Args:
        path: the store directory, or a list of them opened as one store: the outputs
            of ``flux2-dit precompute --shard I/N`` (one folder per shard). They must
            hold one model's embeddings (fingerprint, dtype, shape); a caption held by
            several is read from the first that has it (same model: the same bytes).
            ``self.path`` is the first folder, ``self.paths`` all of them.
        expected_fingerprint: refuse a store made by any other model fingerprint
            (``RemoteTextEncoder.info(model=...).fingerprint`` of the model you train with).
        expected_model: refuse a store made by a server model of another name
            (``--encoder-model`` / ``EncodeRequest.model``), or of another family when a
            family (``flux2-dev``, ``flux2-klein``) is given.

    ``len(store)`` is the number of captions, ``caption in store`` tests
    membership, ``iter(store)`` yields captions in storage order,
    ``store.items()`` yields ``(caption, embedding)`` pairs, and
    ``store.get(caption)`` / ``store[caption]`` return one embedding. Rows are
    read from memory-mapped shard files on demand, so opening a store costs
    only its headers (captions), never its embeddings. Safe to hand to
    ``DataLoader`` workers (file handles are reopened in each process).

    Raises:
        StoreError: not a store directory.
        IntegrityError: a listed shard is missing, damaged, or made by another fingerprint;
            or the store was made for another model than the expected one.
    """

    def __init__(
        self,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        expected_fingerprint: str | None = None,
        expected_model: str | None = None,
    ):
        self.paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
        if not self.paths:
            raise StoreError("no store directory given")
        self.path = self.paths[0]
        self._shards: list[_ShardEntry] = []
        self._shard_dirs: list[Path] = []  # the folder of each entry of self._shards
        self._rows: dict[str, tuple[int, int]] = {}
        self._captions: list[str] = []
        for folder in self.paths:
            loaded = _read_index(folder)
            if loaded is None:
                raise StoreError(
                    f"{folder} is not an embedding store (no {INDEX_NAME}); create one with `flux2-dit precompute`"
                )
            info, shards = loaded
            check_store_model(folder, info, expected_fingerprint=expected_fingerprint, expected_model=expected_model)
            if folder is self.path:
                self.info = info
            elif (info.fingerprint, info.dtype, info.shape) != (
                self.info.fingerprint,
                self.info.dtype,
                self.info.shape,
            ):
                raise IntegrityError(
                    f"{folder} holds embeddings of {info.fingerprint} {DTYPE_NAMES[info.dtype]} {list(info.shape)}, "
                    f"{self.path} of {self.info.fingerprint} {DTYPE_NAMES[self.info.dtype]} {list(self.info.shape)}: "
                    "stores opened together must come from one model"
                )
            self._load_shards(folder, shards)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def _load_shards(self, folder: Path, shards: list[_ShardEntry]) -> None:
        """Index the captions of one store folder's shards (after those of the folders before it)."""
        in_this_folder: set[str] = set()
        for entry in shards:
            file = folder / entry.file
            if not file.is_file():
                raise IntegrityError(f"{folder}: shard {entry.file} is missing; rerun precompute to repair the store")
            captions = _read_shard_header(file, self.info)
            if len(captions) != entry.count or file.stat().st_size != entry.bytes:
                raise IntegrityError(f"{folder}: shard {entry.file} does not match the index")
            shard_index = len(self._shards)
            self._shards.append(entry)
            self._shard_dirs.append(folder)
            for row, caption in enumerate(captions):
                if caption in in_this_folder:
                    raise IntegrityError(f"{folder}: caption stored twice ({caption[:60]!r})")
                in_this_folder.add(caption)
                if caption in self._rows:
                    continue  # also in an earlier folder: same model, same bytes; the first one serves it
                self._rows[caption] = (shard_index, row)
                self._captions.append(caption)

    # -- mapping protocol --------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    def __len__(self) -> int:
        return len(self._captions)

    def __contains__(self, caption: object) -> bool:
        return caption in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._captions)

    def __getitem__(self, caption: str) -> torch.Tensor:
        return self.get(caption)

    def get(self, caption: str) -> torch.Tensor:
        """The embedding of ``caption``: ``[max_sequence_length, embedding_dim]``, CPU, the store's dtype.

        Bit-identical to what the service returned. The tensor owns its memory
        (one row is copied out of the mapped shard). Raises ``KeyError`` when
        ``caption`` (compared exactly, whitespace included) is not stored.
        """
        try:
            shard_index, row = self._rows[caption]
        except KeyError:
            raise KeyError(f"caption not in the store {self.path}: {caption[:80]!r}") from None
        with self._lock:
            handle = self._handle(shard_index)
            return handle.get_slice(TENSOR_KEY)[row].clone()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(caption, embedding)`` pairs in storage order, one row in memory at a time."""
        for caption in self._captions:
            yield caption, self.get(caption)

    def _handle(self, shard_index: int):
        handle = self._handles.get(shard_index)
        if handle is None:
            handle = safe_open(str(self._shard_dirs[shard_index] / self._shards[shard_index].file), framework="pt")
            self._handles[shard_index] = handle
            if len(self._handles) > _MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard_index)
        return handle

    # -- pickling (DataLoader workers) ---------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = str(self.path) if len(self.paths) == 1 else [str(p) for p in self.paths]
        return f"EmbeddingStore({where!r}, {len(self)} captions, {self.fingerprint})"


def check_store_model(
    path: Path, info: StoreInfo, *, expected_fingerprint: str | None = None, expected_model: str | None = None
) -> None:
    """Raise :class:`IntegrityError` unless the store at ``path`` was made by the expected model."""
    if expected_fingerprint and info.fingerprint != expected_fingerprint:
        raise IntegrityError(
            f"{path} holds embeddings of {info.describe()}, not of fingerprint {expected_fingerprint}: "
            "it was made for another model; precompute a store for this one (a new --out)"
        )
    if expected_model and expected_model not in (info.model_name, info.family):
        raise IntegrityError(
            f"{path} holds embeddings of {info.describe()}, not of model {expected_model!r}: it was made for "
            "another model; precompute a store for this one (a new --out)"
        )


# -- writing -----------------------------------------------------------------


class StoreWriter:
    """Appends embeddings to a store directory; repairs it after a crash; one writer at a time.

    Args:
        path: the store directory (created if missing).
        info: fingerprint, dtype and shape of the embeddings to write; an
            existing store with any other fingerprint, dtype or shape is refused
            (:class:`~common.errors.IntegrityError`), so one store never mixes models.
        shard_bytes: target shard size in bytes (at least one row, at most
            ``MAX_SHARD_ROWS`` rows). The writer's memory is two shard buffers:
            one filling while the other is written to disk.

    Use as a context manager; leaving it writes the last partial shard.

    Raises:
        StoreError: another process is writing to ``path``, or ``path`` is not a store.
        IntegrityError: the store holds another model's embeddings.
    """

    def __init__(self, path: str | os.PathLike, info: StoreInfo, *, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.path = Path(path)
        self.info = info
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            self._shards: list[_ShardEntry] = []
            self._done: set[str] = set()
            self._recover()
        except BaseException:
            self._release_lock()
            raise
        self.rows_per_shard = max(1, min(MAX_SHARD_ROWS, shard_bytes // info.row_bytes))
        self._filling: torch.Tensor | None = None  # the shard being filled
        self._spare: torch.Tensor | None = None  # the other buffer, free once its write is done
        self._pending: list[str] = []
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._commit_future: Future | None = None
        self._closed = False

    # -- crash recovery ----------------------------------------------------

    def _acquire_lock(self) -> int:
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"{self.path} is being written by another process") from None
            raise
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _recover(self) -> None:
        # 1. Temporary files are writes that never finished.
        for tmp in self.path.glob(f".*{TMP_SUFFIX}"):
            log.warning("%s: removing unfinished write %s", self.path, tmp.name)
            tmp.unlink(missing_ok=True)
        loaded = _read_index(self.path)
        if loaded is not None:
            existing, listed = loaded
            if existing.fingerprint != self.info.fingerprint:
                raise IntegrityError(
                    f"{self.path} holds embeddings of fingerprint {existing.fingerprint} ({existing.describe()}), "
                    f"but the encoder serves {self.info.fingerprint} ({self.info.describe()}); one store never "
                    "mixes models: use a new output directory"
                )
            if (existing.dtype, existing.shape) != (self.info.dtype, self.info.shape):
                raise IntegrityError(
                    f"{self.path} holds {DTYPE_NAMES[existing.dtype]} {list(existing.shape)} embeddings, "
                    f"the encoder sends {DTYPE_NAMES[self.info.dtype]} {list(self.info.shape)}"
                )
            if existing.model_id and not self.info.model_id or existing.model_name and not self.info.model_name:
                self.info = existing
        else:
            listed = []
            # Refuse to scatter shards among someone else's files.
            strangers = [
                p.name for p in self.path.iterdir() if p.name != LOCK_NAME and not p.name.startswith(SHARD_PREFIX)
            ]
            if strangers:
                raise StoreError(
                    f"{self.path} is not empty and not an embedding store (it holds {strangers[0]!r}); "
                    "choose a new or empty directory"
                )
        changed = loaded is None
        # 2. Listed shards must be there and whole.
        for entry in listed:
            file = self.path / entry.file
            try:
                if not file.is_file() or file.stat().st_size != entry.bytes:
                    raise IntegrityError(f"{entry.file} is missing or has the wrong size")
                captions = _read_shard_header(file, self.info)
                if len(captions) != entry.count:
                    raise IntegrityError(f"{entry.file} does not match the index")
            except IntegrityError as exc:
                log.warning("%s: dropping damaged shard (%s); its captions will be encoded again", self.path, exc)
                file.unlink(missing_ok=True)
                changed = True
                continue
            self._adopt(entry, captions)
        # 3. Complete shards renamed into place just before a crash, not yet indexed.
        known = {entry.file for entry in self._shards}
        for file in sorted(self.path.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
            if file.name in known:
                continue
            try:
                captions = _read_shard_header(file, self.info)
            except IntegrityError as exc:
                log.warning("%s: removing unusable shard %s (%s)", self.path, file.name, exc)
                file.unlink()
                changed = True
                continue
            if any(c in self._done for c in captions) or len(set(captions)) != len(captions):
                log.warning("%s: removing shard %s: it repeats stored captions", self.path, file.name)
                file.unlink()
            else:
                log.info("%s: adopting complete shard %s written before an interruption", self.path, file.name)
                self._adopt(_ShardEntry(file.name, len(captions), file.stat().st_size), captions)
            changed = True
        if changed:
            _write_index(self.path, self.info, self._shards)

    def _adopt(self, entry: _ShardEntry, captions: list[str]) -> None:
        self._shards.append(entry)
        self._done.update(captions)

    # -- appending ---------------------------------------------------------

    def __contains__(self, caption: object) -> bool:
        """True when ``caption`` is stored or waiting in the current shard."""
        return caption in self._done

    def __len__(self) -> int:
        return len(self._done)

    @property
    def shard_count(self) -> int:
        """Shards the index lists."""
        return len(self._shards)

    @property
    def committed(self) -> int:
        """Captions in shards the index lists (safe from a crash)."""
        return sum(s.count for s in self._shards)

    def add(self, caption: str, embedding: torch.Tensor) -> None:
        """Queue one embedding ``[L, D]`` (copied); a full shard is handed to the background writer."""
        if self._closed:
            raise StoreError("the store writer is closed")
        if caption in self._done:
            raise ValueError(f"caption already stored: {caption[:60]!r}")
        if tuple(embedding.shape) != self.info.shape or embedding.dtype != self.info.dtype:
            raise IntegrityError(
                f"embedding {DTYPE_NAMES.get(embedding.dtype, embedding.dtype)} {list(embedding.shape)} does not "
                f"fit the store's {DTYPE_NAMES[self.info.dtype]} {list(self.info.shape)}"
            )
        if self._filling is None:
            self._filling = torch.empty((self.rows_per_shard, *self.info.shape), dtype=self.info.dtype)
        self._filling[len(self._pending)].copy_(embedding)
        self._pending.append(caption)
        self._done.add(caption)
        if len(self._pending) == self.rows_per_shard:
            self.flush(wait=False)

    def extend(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for caption, embedding in items:
            self.add(caption, embedding)

    def flush(self, *, wait: bool = True) -> None:
        """Commit the queued embeddings as one shard (file, then index).

        The write runs on a background thread so receiving the next shard's
        embeddings overlaps the disk write; at most one write is outstanding
        (two shard buffers in memory). ``wait=True`` returns once it is on disk.
        A failed background write is raised here or by :meth:`close`.
        """
        if self._pending:
            self._wait_for_commit()  # also frees the buffer it was writing from
            buffer, captions = self._filling, self._pending
            self._commit_future = self._committer.submit(self._commit, buffer, captions)
            self._filling, self._spare = self._spare, buffer
            self._pending = []
        if wait:
            self._wait_for_commit()

    def _wait_for_commit(self) -> None:
        future, self._commit_future = self._commit_future, None
        if future is not None:
            future.result()

    def _commit(self, buffer: torch.Tensor, captions: list[str]) -> None:
        """Background thread: write one shard atomically, then list it in the index."""
        n = len(captions)
        name = f"{SHARD_PREFIX}{len(self._shards):06d}-{secrets.token_hex(4)}{SHARD_SUFFIX}"
        final = self.path / name
        metadata = {
            "format": FORMAT,
            "fingerprint": self.info.fingerprint,
            "captions": json.dumps(captions, ensure_ascii=False),
        }
        rows = buffer[:n]
        try:
            atomic_write(final, lambda tmp: save_file({TENSOR_KEY: rows}, str(tmp), metadata=metadata))
            self._shards.append(_ShardEntry(name, n, final.stat().st_size))
            _write_index(self.path, self.info, self._shards)
        except OSError as exc:
            # One line for the person at the terminal; the shards already listed stay valid.
            raise StoreWriteError(
                f"cannot write to the embedding store {self.path}: {exc.strerror or exc}. Free some space (or "
                f"choose another --out) and run the same command again: finished shards are kept"
            ) from exc

    def close(self) -> None:
        """Write the last partial shard, wait for it, and release the directory."""
        if self._closed:
            return
        try:
            self.flush(wait=True)
        finally:
            self._closed = True
            self._committer.shutdown(wait=True)
            self._filling = self._spare = None
            self._release_lock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
