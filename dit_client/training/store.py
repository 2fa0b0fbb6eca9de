"""A directory of precomputed prompt embeddings: sharded safetensors plus an index.

Layout of a store directory (format version 2)::

    index.json                         format, version, model fingerprint, dtype, row shape, pad table id, shards
    pad-table.safetensors              "pad_rows" [P, D]: the pad table the store was compacted with
    pad-table.copy.safetensors         the same file again: either copy that passes its check serves
    shard-000000-1a2b3c4d.safetensors  "rows" [sum_n, D] + metadata: captions, entries, fingerprint, pad table id
    shard-000001-....safetensors
    .lock                              held by the one process writing (flock)

**Compact rows.** FLUX.2-dev pads every prompt on the left to 512 tokens, and
the rows at pad positions depend on the position only: they are the model's
pad table (:mod:`common.pad_table`). A shard keeps each embedding as its real
rows only, all of a shard's embeddings concatenated in storage order into one
``rows`` tensor ``[sum_n, D]``. The shard's metadata holds ``captions`` (a
JSON list) and ``entries`` (a JSON list of ``[n, pad, crc32c]``, one per
caption, in the same order): embedding ``i`` is ``rows[o_i : o_i + n_i]`` with
``o_i`` the sum of the ``n`` before it, and its full ``[pad + n, D]`` tensor is
the table's first ``pad`` rows (cast to the store's dtype) followed by those
rows. The writer leaves out only leading rows that are bit-identical to the
table's rows at the same positions (bytes compared), so the rebuilt tensor is
the one the service sent, bit for bit; a model without a table (right padding)
is stored with ``pad = 0``. The table itself is kept twice per store (each copy
written atomically), named by its :func:`~common.pad_table.pad_table_id`
(fingerprint, rows, CRC-32C) and checked against it on opening; the index and
every shard name it, and a shard naming another table is refused. A reader uses
whichever copy is sound; :class:`StoreWriter` and :func:`repair_pad_table`
rewrite an unsound copy from the other (or from the server's table, fetched by
the caller, when both are lost: :class:`PadTableLost`).

**Checksums.** ``crc32c`` of an entry is CRC-32C (:func:`common.wire.crc32c`)
over ``f"{n}:{pad}:{caption}"`` (UTF-8) followed by the entry's row bytes, so a
flipped bit in the rows, an edited caption or pad count all fail it. Every
:meth:`EmbeddingStore.get` checks it; :func:`verify_store` checks all of them
and names the captions that fail; :class:`StoreWriter` with ``verify=True``
(what ``flux2-dit precompute`` uses) drops those entries so they are encoded again.

**Version 1** stores (``"embeddings" [N, 512, D]`` per shard, no checksums)
stay readable; writing to one is refused with a message naming
``flux2-dit store convert``, which rewrites it as version 2 (:func:`convert_store`).

Rules that make it safe to kill a writer at any moment (``kill -9`` included):

* a shard is written to a hidden temporary file, fsynced, then renamed into
  place, so a ``shard-*.safetensors`` name only ever holds a complete file;
* the index is rewritten the same way after each shard, so it only ever lists
  complete shards;
* on reopening, :class:`StoreWriter` deletes temporary files, drops index
  entries whose file is missing or damaged, and adopts complete shards that
  were renamed into place just before the index could list them (or deletes
  them if they would duplicate a caption);
* a shard rewritten without its damaged entries is written under a new name
  before the index swaps it for the old one, so a kill leaves one of the two listed.

Readers (:class:`EmbeddingStore`) see only what the index lists, read each
embedding straight from the memory-mapped shard (``safetensors.safe_open``), and
never unpickle anything. One store holds embeddings of one model fingerprint only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from common.atomic import TMP_SUFFIX, atomic_write
from common.dtypes import DTYPE_NAMES, row_of, torch_dtype
from common.errors import IntegrityError
from common.pad_table import pad_table_id
from common.wire import crc32c, tensor_bytes

log = logging.getLogger(__name__)

FORMAT = "flux2-remote-embeddings"
VERSION = 2
READABLE_VERSIONS = (1, 2)
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
TENSOR_KEY = "embeddings"  # version 1: [N, 512, D]
ROWS_KEY = "rows"  # version 2: [sum_n, D]
PAD_TABLE_NAME = "pad-table.safetensors"
# A second copy, written and checked like the first: one damaged file must not make the store unusable.
PAD_TABLE_COPY_NAME = "pad-table.copy.safetensors"
PAD_TABLE_NAMES = (PAD_TABLE_NAME, PAD_TABLE_COPY_NAME)
PAD_TABLE_KEY = "pad_rows"
PAD_TABLE_FORMAT = "flux2-remote-store-pad-table/1"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
CONVERT_DIR = ".convert-v2"
CONVERT_COMMAND = "flux2-dit store convert"
# A shard's target size on disk. A kill loses at most two shards of work (one
# filling, one being written); the writer holds both in memory.
DEFAULT_SHARD_BYTES = 128 * 1024 * 1024
# Captions live in the shard's JSON header; this keeps the header far below
# safetensors' 100 MB header limit even for 16k-character captions.
MAX_SHARD_ROWS = 4096
# Open shard files kept mapped at once by a reader.
_MAX_OPEN_SHARDS = 64


class StoreWriteError(OSError):
    """A shard or the index could not be written (a full disk, a folder that went read-only...)."""


class StoreError(ValueError):
    """The directory is not a usable store (not a store, locked by another writer, wrong layout or version)."""


@dataclass(frozen=True)
class StoreInfo:
    """What every embedding in a store shares.

    Attributes:
        fingerprint: the encoder's model fingerprint (see ``GetInfo``).
        dtype: element type, as the service sent it (``torch.bfloat16`` for FLUX.2-dev).
        shape: shape of one full embedding, ``(max_sequence_length, embedding_dim)``, e.g. ``(512, 15360)``.
        model_id: the model the server reported, for people reading the index.
        model_name: the server's name for that model (``EncodeRequest.model``; ``""``
            from servers before several models).
        family: its embedding recipe, ``flux2-dev`` or ``flux2-klein`` (``""`` when unknown).
        pad_table: id of the pad table the store is compacted with (``""``: none, rows stored whole).
            Set by the store, not by the caller: :class:`StoreWriter` takes the table itself.
    """

    fingerprint: str
    dtype: torch.dtype
    shape: tuple[int, int]
    model_id: str = ""
    model_name: str = ""
    family: str = ""
    pad_table: str = ""

    def describe(self) -> str:
        """``model 'klein' (flux2-klein, FLUX.2-klein-4B, fingerprint ...)``, for messages."""
        name = f"model {self.model_name!r}" if self.model_name else "model"
        what = ", ".join(x for x in (self.family, self.model_id) if x)
        return f"{name} ({what + ', ' if what else ''}fingerprint {self.fingerprint})"

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes of one full ``[L, D]`` embedding (the name predates compact rows)."""
        return self.shape[0] * self.shape[1] * self.element_size

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "dtype": DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
            "model_id": self.model_id,
            "model_name": self.model_name,
            "family": self.family,
            "pad_table": self.pad_table,
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
                str(data.get("model_id", "")),
                str(data.get("model_name", "")),
                str(data.get("family", "")),
                str(data.get("pad_table", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"{where}: malformed store index ({exc})") from None


@dataclass(frozen=True)
class _ShardEntry:
    file: str
    count: int
    bytes: int


@dataclass(frozen=True)
class _Shard:
    """What a shard's header says: its captions and, in version 2, each one's ``(offset, n, pad, crc)``."""

    captions: list[str]
    spans: list[tuple[int, int, int, int]] | None  # None: version 1, full rows, no checksums


def entry_crc(caption: str, pad: int, rows: torch.Tensor) -> int:
    """The CRC-32C a version 2 store keeps for one embedding: ``f"{n}:{pad}:{caption}"`` then the row bytes."""
    head = f"{rows.shape[0]}:{pad}:{caption}".encode()
    return crc32c(tensor_bytes(rows), crc32c(head))


def leading_pad_rows(embedding: torch.Tensor, table: torch.Tensor | None) -> int:
    """How many leading rows of ``embedding [L, D]`` equal ``table [P, D]`` (already in its dtype) bit for bit."""
    if table is None or table.shape[1] != embedding.shape[1]:
        return 0
    # At least one row stays: an entry is never empty (a zero-row slice is an edge no reader needs).
    p = min(table.shape[0], embedding.shape[0] - 1)
    if p <= 0:
        return 0
    a = embedding[:p].contiguous().view(torch.uint8)
    b = table[:p].contiguous().view(torch.uint8)
    same = (a == b).all(dim=1)
    differ = torch.nonzero(~same)
    return int(differ[0, 0]) if differ.numel() else p


# -- files -------------------------------------------------------------------


def _read_index(path: Path) -> tuple[int, StoreInfo, list[_ShardEntry]] | None:
    index = path / INDEX_NAME
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{index}: unreadable store index ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{index} is not a {FORMAT} index")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"{index}: store format version {version} is not supported (this client reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); update flux2-remote"
        )
    info = StoreInfo.from_json(data, str(index))
    try:
        shards = [_ShardEntry(str(s["file"]), int(s["count"]), int(s["bytes"])) for s in data.get("shards", [])]
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"{index}: malformed shard list ({exc})") from None
    for s in shards:
        if Path(s.file).name != s.file or not s.file.startswith(SHARD_PREFIX):
            raise StoreError(f"{index}: shard name {s.file!r} is not a plain shard file name")
    return int(version), info, shards


def _write_index(path: Path, info: StoreInfo, shards: list[_ShardEntry], version: int = VERSION) -> None:
    data = {
        "format": FORMAT,
        "version": version,
        **info.to_json(),
        "count": sum(s.count for s in shards),
        "shards": [{"file": s.file, "count": s.count, "bytes": s.bytes} for s in shards],
    }
    if version == 1:
        del data["pad_table"]
    atomic_write(path / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(data, indent=1), encoding="utf-8"))


def _read_header(file: Path) -> tuple[dict, int, int]:
    """A safetensors file's JSON header, its length, and the file size; IntegrityError when torn."""
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
    if not isinstance(header, dict):
        raise IntegrityError(f"{file.name}: malformed header")
    return header, header_len, size


def _read_shard_header(file: Path, info: StoreInfo, version: int = VERSION) -> _Shard:
    """The captions (and spans) of a complete, consistent shard; raises IntegrityError for anything else."""
    header, header_len, size = _read_header(file)
    key = TENSOR_KEY if version == 1 else ROWS_KEY
    tensor = header.get(key)
    meta = header.get("__metadata__") or {}
    if not isinstance(tensor, dict) or "data_offsets" not in tensor:
        raise IntegrityError(f"{file.name}: no {key!r} tensor (not a version {version} shard)")
    if 8 + header_len + int(tensor["data_offsets"][1]) != size:
        raise IntegrityError(f"{file.name}: size {size} does not match its header (torn write?)")
    if meta.get("fingerprint") != info.fingerprint:
        raise IntegrityError(
            f"{file.name}: made by fingerprint {meta.get('fingerprint')}, the store holds {info.fingerprint}"
        )
    try:
        captions = json.loads(meta["captions"])
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError
    except (KeyError, ValueError):
        raise IntegrityError(f"{file.name}: no caption list in its metadata") from None
    if tensor.get("dtype") != row_of(info.dtype).safetensors:
        raise IntegrityError(f"{file.name}: dtype {tensor.get('dtype')} is not the store's {DTYPE_NAMES[info.dtype]}")
    shape = tuple(tensor.get("shape", ()))
    if version == 1:
        if shape != (len(captions), *info.shape):
            raise IntegrityError(
                f"{file.name}: tensor shape {shape} does not fit {len(captions)} captions of {info.shape}"
            )
        return _Shard(captions, None)
    if meta.get("pad_table", "") != info.pad_table:
        raise IntegrityError(
            f"{file.name}: compacted against pad table {meta.get('pad_table') or '(none)'}, but the store's "
            f"table is {info.pad_table or '(none)'}: its rows cannot be put back together; it belongs to "
            "another store (remove it, and precompute again)"
        )
    try:
        table_rows = int(info.pad_table.rsplit(":", 2)[1]) if info.pad_table else 0
        entries = json.loads(meta["entries"])
        spans = []
        offset = 0
        for n, pad, crc in entries:
            n, pad, crc = int(n), int(pad), int(crc)
            if n < 0 or pad < 0 or n + pad != info.shape[0] or pad > table_rows:
                raise ValueError(f"entry [{n}, {pad}] does not fit [{info.shape[0]}, D] rows")
            spans.append((offset, n, pad, crc))
            offset += n
    except (KeyError, ValueError, TypeError) as exc:
        raise IntegrityError(f"{file.name}: malformed entry list ({exc})") from None
    if len(spans) != len(captions):
        raise IntegrityError(f"{file.name}: {len(captions)} captions but {len(spans)} entries")
    if shape != (offset, info.shape[1]):
        raise IntegrityError(f"{file.name}: tensor shape {shape} does not fit its entries ({offset} rows)")
    return _Shard(captions, spans)


class PadTableLost(IntegrityError):
    """No copy of a store's pad table passes its check: no embedding of the store can be rebuilt until one is restored.

    Attributes:
        path: the store folder.
        table_id: the id of the table the store was made with (:func:`~common.pad_table.pad_table_id`).
        faults: what is wrong with each copy, by file name.
    """

    def __init__(self, path: Path, table_id: str, faults: dict[str, str], remedy: str | None = None):
        self.path, self.table_id, self.faults = path, table_id, dict(faults)
        reasons = "; ".join(f"{name}: {why}" for name, why in faults.items())
        remedy = remedy or (
            f"Restore it from a server that serves the store's model: flux2-dit store verify --repair {path} "
            "--encoder HOST:PORT (flux2-dit precompute on this store does the same)"
        )
        super().__init__(
            f"{path}: no sound copy of the store's pad table {table_id} ({reasons}); without it no embedding "
            f"can be rebuilt. {remedy}"
        )


_reported_copies: set[str] = set()  # damaged copies already logged by this process
_reported_lock = threading.Lock()


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_pad_table_copy(file: Path, info: StoreInfo) -> tuple[torch.Tensor | None, str]:
    """One copy of the store's table and ``""``, or None and what is wrong with it (``"missing"``, ...).

    A copy is sound when its metadata names the store's table id and its rows
    hash to that id (fingerprint, row count, CRC-32C of the bytes).
    """
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor(PAD_TABLE_KEY)
    except FileNotFoundError:
        return None, "missing"
    except Exception as exc:  # safetensors raises its own error type for damaged files
        return None, f"unreadable ({_one_line(exc)})"
    if meta.get("table") != info.pad_table or pad_table_id(info.fingerprint, table) != info.pad_table:
        return None, "not the table the store was made with (damaged or replaced)"
    return table, ""


def _pad_table_copies(path: Path, info: StoreInfo, *, all_copies: bool = True) -> tuple[torch.Tensor | None, dict]:
    """The store's table from the first sound copy, and what is wrong with the others, by file name.

    ``all_copies=False`` stops at the first sound copy (what a reader needs); the writer and
    ``verify`` check both.
    """
    table = None
    faults: dict[str, str] = {}
    for name in PAD_TABLE_NAMES:
        loaded, fault = _read_pad_table_copy(path / name, info)
        if fault:
            faults[name] = fault
        elif table is None:
            table = loaded
            if not all_copies:
                break
    return table, faults


def _load_pad_table(path: Path, info: StoreInfo) -> torch.Tensor | None:
    """The store's pad table from whichever copy passes its check; None when the store has none.

    A damaged copy is logged once per process (a store written before the second copy,
    whose copy is just absent, is not). Raises :class:`PadTableLost` when no copy is sound.
    """
    if not info.pad_table:
        return None
    table, faults = _pad_table_copies(path, info, all_copies=False)
    if table is None:
        raise PadTableLost(path, info.pad_table, faults)
    for name, fault in faults.items():
        key = f"{path / name}: {fault}"
        with _reported_lock:
            if key in _reported_copies:
                continue
            _reported_copies.add(key)
        log.warning(
            "%s: the pad table copy %s is %s; reading the other copy (flux2-dit store verify --repair %s restores it)",
            path,
            name,
            fault,
            path,
        )
    return table


def _restore_pad_table(
    path: Path, info: StoreInfo, source: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, list[str]]:
    """Check both copies and rewrite the unsound ones (the caller holds the store's lock).

    They are rewritten from the sound copy, else from ``source`` (a table got elsewhere,
    e.g. ``GetPadTable``) when its id is the store's. Returns the table and the names
    rewritten; raises :class:`PadTableLost` when there is nothing sound to restore from.
    """
    if not info.pad_table:
        return None, []
    table, faults = _pad_table_copies(path, info)
    if table is None:
        if source is None:
            raise PadTableLost(path, info.pad_table, faults)
        offered = pad_table_id(info.fingerprint, source)
        if offered != info.pad_table:
            raise PadTableLost(
                path,
                info.pad_table,
                faults,
                f"The table offered to restore it is another one ({offered}); restore it from a server that "
                "serves the store's model, or precompute again into a new --out",
            )
        table = source
    for name, fault in faults.items():
        _save_pad_table(path, info.pad_table, table, name)
        if fault != "missing" or name != PAD_TABLE_COPY_NAME:
            log.warning("%s: pad table copy %s was %s; restored", path, name, fault)
    return table, list(faults)


def repair_pad_table(path: str | os.PathLike, source: torch.Tensor | None = None) -> list[str]:
    """Rewrite the damaged or missing copies of a store's pad table; the file names rewritten.

    From the sound copy, else from ``source`` (``[P, D]``, e.g. fetched with
    ``GetPadTable``) when its id is the store's. Holds the store's lock meanwhile.

    Raises:
        StoreError: not a store, or being written by another process.
        PadTableLost: no sound copy, and no ``source`` (or another table).
    """
    path = Path(path)
    with _locked_store(path) as (version, info, _):
        if version < 2:
            return []
        try:
            return _restore_pad_table(path, info, source)[1]
        except OSError as exc:
            raise _write_error(path, exc) from None


def _save_pad_table(path: Path, table_id: str, table: torch.Tensor, name: str = PAD_TABLE_NAME) -> None:
    body = safetensors.torch.save(
        {PAD_TABLE_KEY: table.contiguous()}, metadata={"format": PAD_TABLE_FORMAT, "table": table_id}
    )
    atomic_write(path / name, lambda tmp: tmp.write_bytes(body))


def _write_error(path: Path, exc: OSError) -> StoreWriteError:
    # One line for the person at the terminal; the shards already listed stay valid.
    error = StoreWriteError(
        f"cannot write to the embedding store {path}: {exc.strerror or exc}. Free some space (or choose "
        "another --out) and run the same command again: finished shards are kept"
    )
    error.errno = exc.errno
    return error


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
    only its headers (captions), never its embeddings. Every read of a version 2
    store checks the embedding's CRC-32C. Safe to hand to ``DataLoader`` workers
    (file handles are reopened in each process). Version 1 stores are read as before
    (no checksums to check).

    Raises:
        StoreError: not a store directory.
        IntegrityError: a listed shard is missing, damaged, made by another fingerprint or
            compacted against another pad table; or the store was made for another model
            than the expected one; or (:class:`PadTableLost`) neither copy of its pad table
            is sound (one sound copy is enough: the other is logged once).
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
        self._shard_spans: list[list[tuple[int, int, int, int]] | None] = []
        self._shard_tables: list[int] = []  # index into self._tables
        self._tables: list[torch.Tensor | None] = []  # per folder, cast to the store's dtype
        self._rows: dict[str, tuple[int, int]] = {}
        self._captions: list[str] = []
        self.versions: list[int] = []
        for folder in self.paths:
            loaded = _read_index(folder)
            if loaded is None:
                raise StoreError(
                    f"{folder} is not an embedding store (no {INDEX_NAME}); create one with `flux2-dit precompute`"
                )
            version, info, shards = loaded
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
            table = _load_pad_table(folder, info) if version >= 2 else None
            self._tables.append(None if table is None else table.to(info.dtype))
            self.versions.append(version)
            self._load_shards(folder, info, version, shards)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def _load_shards(self, folder: Path, info: StoreInfo, version: int, shards: list[_ShardEntry]) -> None:
        """Index the captions of one store folder's shards (after those of the folders before it)."""
        in_this_folder: set[str] = set()
        for entry in shards:
            file = folder / entry.file
            if not file.is_file():
                raise IntegrityError(f"{folder}: shard {entry.file} is missing; rerun precompute to repair the store")
            shard = _read_shard_header(file, info, version)
            if len(shard.captions) != entry.count or file.stat().st_size != entry.bytes:
                raise IntegrityError(f"{folder}: shard {entry.file} does not match the index")
            shard_index = len(self._shards)
            self._shards.append(entry)
            self._shard_dirs.append(folder)
            self._shard_spans.append(shard.spans)
            self._shard_tables.append(len(self._tables) - 1)
            for row, caption in enumerate(shard.captions):
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

    def get(self, caption: str, *, compact: bool = False):
        """The embedding of ``caption``, CPU, the store's dtype, checked against its CRC-32C.

        Returns:
            ``[max_sequence_length, embedding_dim]``, bit-identical to what the service
            returned; with ``compact=True`` a pair ``(rows [n, embedding_dim], pad_count)``:
            the real rows only, and how many pad-table rows precede them in the full
            tensor (``pad_count + n == max_sequence_length``). A version 1 store, or a
            model without a pad table, gives all rows and ``pad_count == 0``.

        The tensors own their memory (copied out of the mapped shard). Raises
        ``KeyError`` when ``caption`` (compared exactly, whitespace included) is not
        stored, :class:`~common.errors.IntegrityError` when its bytes fail their checksum.
        """
        try:
            shard_index, row = self._rows[caption]
        except KeyError:
            raise KeyError(f"caption not in the store {self.path}: {caption[:80]!r}") from None
        spans = self._shard_spans[shard_index]
        with self._lock:
            handle = self._handle(shard_index)
            if spans is None:
                full = handle.get_slice(TENSOR_KEY)[row].clone()
                return (full, 0) if compact else full
            offset, n, pad, crc = spans[row]
            rows = handle.get_slice(ROWS_KEY)[offset : offset + n].clone()
        if entry_crc(caption, pad, rows) != crc:
            raise IntegrityError(
                f"{self._shard_dirs[shard_index] / self._shards[shard_index].file}: the embedding of "
                f"{caption[:60]!r} fails its CRC-32C (damaged on disk); `flux2-dit store verify` lists every "
                "damaged caption and `flux2-dit precompute` on this store encodes them again"
            )
        if compact:
            return rows, pad
        if pad == 0:
            return rows
        out = torch.empty(self.info.shape, dtype=self.info.dtype)
        table = self._tables[self._shard_tables[shard_index]]
        if table is None:  # a shard of a folder without a table stores every row (pad 0, returned above)
            raise IntegrityError(f"{caption[:60]!r} has {pad} pad rows, but its folder holds no pad table")
        out[:pad] = table[:pad]
        out[pad:] = rows
        return out

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


# -- verifying ---------------------------------------------------------------


@dataclass(frozen=True)
class DamagedShard:
    """One shard :func:`verify_store` found fault with.

    Attributes:
        file: the shard's file name in the store folder.
        reason: what is wrong, in words.
        captions: the captions whose embeddings cannot be trusted (all of the shard's
            when the shard as a whole is unusable; those failing their CRC-32C otherwise).
        whole: True when the whole shard is unusable (missing, torn, another fingerprint or pad table).
    """

    file: str
    reason: str
    captions: tuple[str, ...]
    whole: bool


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        path: the store folder.
        version: its format version (1 has no checksums: only its structure is checked).
        shards: shards the index lists.
        captions: captions the index lists.
        damaged: the shards with faults, each with the captions it holds that are affected.
        pad_table_faults: ``(file name, what is wrong)`` per unsound copy of the pad table
            (after ``repair``: those it could not restore, none).
        pad_table_restored: copies ``repair`` rewrote.
        pad_table_lost: no copy of the pad table is sound: no embedding can be rebuilt.
    """

    path: Path
    version: int
    shards: int
    captions: int
    damaged: tuple[DamagedShard, ...] = field(default_factory=tuple)
    pad_table_faults: tuple[tuple[str, str], ...] = ()
    pad_table_restored: tuple[str, ...] = ()
    pad_table_lost: bool = False

    @property
    def ok(self) -> bool:
        """No damaged shard and both pad table copies sound (a store written before the second copy:
        its copy is missing, which ``repair`` or the next precompute writes)."""
        return not self.damaged and not self.pad_table_faults

    @property
    def bad_captions(self) -> list[str]:
        """Every affected caption, in storage order: what ``flux2-dit precompute`` encodes again."""
        return [c for d in self.damaged for c in d.captions]


def _bad_entries(file: Path, shard: _Shard) -> list[int]:
    """Indices of the entries of a version 2 shard whose bytes fail their CRC-32C."""
    bad = []
    with safe_open(str(file), framework="pt") as f:
        rows = f.get_slice(ROWS_KEY)
        for i, (caption, (offset, n, pad, crc)) in enumerate(zip(shard.captions, shard.spans or (), strict=True)):
            if entry_crc(caption, pad, rows[offset : offset + n]) != crc:
                bad.append(i)
    return bad


def verify_store(
    path: str | os.PathLike,
    *,
    progress: bool = False,
    repair: bool = False,
    fetch_table: Callable[[PadTableLost], torch.Tensor] | None = None,
) -> VerifyReport:
    """Check both copies of the pad table, every shard the index of ``path`` lists, and every embedding's CRC-32C.

    Reads the whole store once. Returns a :class:`VerifyReport` naming each faulty
    shard and the captions it affects, and each unsound pad table copy.

    Args:
        repair: first rewrite unsound pad table copies (:func:`repair_pad_table`): from the
            sound copy, else from ``fetch_table``. Damaged embeddings are only reported
            (``flux2-dit precompute`` encodes them again).
        fetch_table: called with the :class:`PadTableLost` when no copy is sound; returns the
            table (e.g. ``GetPadTable`` from a server whose model has that table id) or raises.

    Raises:
        StoreError: not a store (or, with ``repair``, being written by another process).
        PadTableLost: with ``repair``, no copy is sound and ``fetch_table`` is None.
        StoreWriteError: with ``repair``, a copy could not be written.
    """
    path = Path(path)
    loaded = _read_index(path)
    if loaded is None:
        raise StoreError(f"{path} is not an embedding store (no {INDEX_NAME})")
    version, info, shards = loaded
    restored: list[str] = []
    if repair and version >= 2 and info.pad_table:
        try:
            restored = repair_pad_table(path)
        except PadTableLost as unsound:
            if fetch_table is None:
                raise
            restored = repair_pad_table(path, fetch_table(unsound))
    faults: dict[str, str] = {}
    lost = False
    if version >= 2 and info.pad_table:
        table, faults = _pad_table_copies(path, info)
        lost = table is None
        if not lost and faults.get(PAD_TABLE_COPY_NAME) == "missing":
            del faults[PAD_TABLE_COPY_NAME]  # a store written before the second copy: not damage
    damaged: list[DamagedShard] = []
    for entry in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        file = path / entry.file
        try:
            if not file.is_file():
                raise IntegrityError(f"{entry.file} is missing")
            shard = _read_shard_header(file, info, version)
            if len(shard.captions) != entry.count or file.stat().st_size != entry.bytes:
                raise IntegrityError(f"{entry.file} does not match the index")
        except IntegrityError as exc:
            captions = _captions_anyway(file)
            damaged.append(DamagedShard(entry.file, str(exc), tuple(captions), True))
            continue
        if version >= 2:
            bad = _bad_entries(file, shard)
            if bad:
                damaged.append(
                    DamagedShard(
                        entry.file,
                        f"{len(bad)} of {len(shard.captions)} embeddings fail their CRC-32C",
                        tuple(shard.captions[i] for i in bad),
                        False,
                    )
                )
    return VerifyReport(
        path,
        version,
        len(shards),
        sum(s.count for s in shards),
        tuple(damaged),
        tuple(faults.items()),
        tuple(restored),
        lost,
    )


def _captions_anyway(file: Path) -> list[str]:
    """The caption list of a shard that failed its checks, when its header can still be read."""
    try:
        header, _, _ = _read_header(file)
        captions = json.loads((header.get("__metadata__") or {})["captions"])
        return [c for c in captions if isinstance(c, str)]
    except (IntegrityError, KeyError, ValueError, TypeError):
        return []


# -- writing -----------------------------------------------------------------


@contextlib.contextmanager
def _locked_store(path: Path) -> Iterator[tuple[int, StoreInfo, list[_ShardEntry]]]:
    """The store's index, read while this process holds the store's lock (released on exit).

    Raises:
        StoreError: not a store (no index, before or after taking the lock), or locked by another process.
    """
    if _read_index(path) is None:  # checked first, so a wrong path never gets a .lock file
        raise StoreError(f"{path} is not an embedding store (no {INDEX_NAME})")
    lock = _lock_folder(path)
    try:
        found = _read_index(path)
        if found is None:  # removed between the check above and the lock
            raise StoreError(f"{path} is not an embedding store (no {INDEX_NAME})")
        yield found
    finally:
        os.close(lock)


def _lock_folder(path: Path) -> int:
    """Hold ``path/.lock`` (flock) for as long as the returned descriptor is open."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreError(f"{path} is being written by another process") from None
        raise
    return fd


def _remove_unfinished_writes(path: Path) -> None:
    for tmp in path.glob(f".*{TMP_SUFFIX}"):
        log.warning("%s: removing unfinished write %s", path, tmp.name)
        tmp.unlink(missing_ok=True)


def _version_1_refusal(path: Path) -> StoreError:
    return StoreError(
        f"{path} is a version 1 embedding store (full 512-row embeddings, no checksums); this client writes "
        f"version 2 only. Convert it first, in place: {CONVERT_COMMAND} {path}"
    )


def _write_shard(
    path: Path, info: StoreInfo, number: int, captions: list[str], rows: torch.Tensor, spans
) -> _ShardEntry:
    """Write one version 2 shard atomically; ``spans`` holds ``(n, pad, crc)`` per caption. Returns its index entry."""
    name = f"{SHARD_PREFIX}{number:06d}-{secrets.token_hex(4)}{SHARD_SUFFIX}"
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "fingerprint": info.fingerprint,
        "pad_table": info.pad_table,
        "captions": json.dumps(captions, ensure_ascii=False),
        "entries": json.dumps([list(s) for s in spans]),
    }
    # Serialised in memory so that writing is a plain Python write: a full disk raises OSError (ENOSPC).
    body = safetensors.torch.save({ROWS_KEY: rows.contiguous()}, metadata=metadata)
    atomic_write(path / name, lambda tmp: tmp.write_bytes(body))
    return _ShardEntry(name, len(captions), len(body))


class StoreWriter:
    """Appends embeddings to a store directory; repairs it after a crash or damage; one writer at a time.

    Args:
        path: the store directory (created if missing).
        info: fingerprint, dtype and shape of the embeddings to write; an
            existing store with any other fingerprint, dtype or shape is refused
            (:class:`~common.errors.IntegrityError`), so one store never mixes models.
        shard_bytes: target shard size on disk in bytes (at most ``MAX_SHARD_ROWS``
            captions). The writer's memory is about three times this: one shard
            filling while the other is written, plus its serialised bytes.
        pad_table: ``[P, D]``, the model's pad table (``GetPadTable``; any dtype): a new
            store keeps it and stores each embedding without the leading rows equal to it.
            An existing store keeps the table it was made with (this one only restores its copies
            when neither is sound and it is the same table); None: rows are stored whole.
        verify: check every stored embedding's CRC-32C on opening (reads the whole store)
            and drop those that fail, so they count as missing and get encoded again;
            :attr:`dropped` lists them. Without it only the shards' structure is checked.
        progress: a tqdm bar for ``verify``.

    Use as a context manager; leaving it writes the last partial shard.

    Raises:
        StoreError: another process is writing to ``path``, ``path`` is not a store, or
            it is a version 1 store (the message names ``flux2-dit store convert``).
        IntegrityError: the store holds another model's embeddings.
        PadTableLost: neither copy of its pad table is sound (and ``pad_table`` is not that table).
        StoreWriteError: the disk is full (or read-only) while repairing.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        info: StoreInfo,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        pad_table: torch.Tensor | None = None,
        verify: bool = False,
        progress: bool = False,
    ):
        self.path = Path(path)
        self.info = info
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock_folder(self.path)
        self.dropped: list[str] = []  # captions removed by verify (damaged), to be encoded again
        try:
            self._shards: list[_ShardEntry] = []
            self._done: set[str] = set()
            try:
                table = self._recover(pad_table, verify, progress)
            except StoreWriteError:
                raise
            except OSError as exc:
                raise _write_error(self.path, exc) from exc
        except BaseException:
            self._release_lock()
            raise
        self._table = None if table is None else table.to(self.info.dtype)
        width_bytes = self.info.shape[1] * self.info.element_size
        self._target_rows = max(1, shard_bytes // width_bytes)
        self._capacity = self._target_rows + self.info.shape[0]  # one more embedding always fits
        self._filling: torch.Tensor | None = None  # rows of the shard being filled
        self._spare: torch.Tensor | None = None  # the other buffer, free once its write is done
        self._used = 0  # rows used in self._filling
        self._pending: list[str] = []
        self._spans: list[tuple[int, int, int]] = []  # (n, pad, crc) per pending caption
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._commit_future: Future | None = None
        self._failed: BaseException | None = None
        self._closed = False

    # -- crash recovery ----------------------------------------------------

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _recover(self, pad_table: torch.Tensor | None, verify: bool, progress: bool) -> torch.Tensor | None:
        # 1. Temporary files are writes that never finished.
        _remove_unfinished_writes(self.path)
        loaded = _read_index(self.path)
        if loaded is not None:
            version, existing, listed = loaded
            if version == 1:
                raise _version_1_refusal(self.path)
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
            # The store keeps the table it was made with: every shard names it.
            self.info = StoreInfo(**{**self.info.__dict__, "pad_table": existing.pad_table})
            # Both copies checked; an unsound one is rewritten from the other (a store written before the
            # second copy gets it here), or from pad_table when neither is sound and it is the same table.
            table = _restore_pad_table(self.path, self.info, pad_table)[0]
        else:
            listed = []
            # Refuse to scatter shards among someone else's files.
            strangers = [
                p.name
                for p in self.path.iterdir()
                if p.name not in (LOCK_NAME, *PAD_TABLE_NAMES) and not p.name.startswith(SHARD_PREFIX)
            ]
            if strangers:
                raise StoreError(
                    f"{self.path} is not empty and not an embedding store (it holds {strangers[0]!r}); "
                    "choose a new or empty directory"
                )
            table = pad_table
            table_id = pad_table_id(self.info.fingerprint, table)
            self.info = StoreInfo(**{**self.info.__dict__, "pad_table": table_id})
            if table is not None:
                for name in PAD_TABLE_NAMES:
                    _save_pad_table(self.path, table_id, table, name)
        changed = loaded is None
        # 2. Listed shards must be there and whole (and, with verify, every embedding must pass its CRC).
        repairs: list[tuple[int, _Shard, list[int]]] = []
        for entry in tqdm(listed, desc="verify store", unit="shard", disable=not (progress and verify)):
            file = self.path / entry.file
            try:
                if not file.is_file() or file.stat().st_size != entry.bytes:
                    raise IntegrityError(f"{entry.file} is missing or has the wrong size")
                shard = _read_shard_header(file, self.info)
                if len(shard.captions) != entry.count:
                    raise IntegrityError(f"{entry.file} does not match the index")
            except IntegrityError as exc:
                log.warning("%s: dropping damaged shard (%s); its captions will be encoded again", self.path, exc)
                self.dropped.extend(_captions_anyway(file))
                file.unlink(missing_ok=True)
                changed = True
                continue
            bad = _bad_entries(file, shard) if verify else []
            if bad:
                repairs.append((len(self._shards), shard, bad))
                self.dropped.extend(shard.captions[i] for i in bad)
                log.warning(
                    "%s: %d embeddings of %s fail their CRC-32C; they will be encoded again: %s",
                    self.path,
                    len(bad),
                    entry.file,
                    ", ".join(repr(shard.captions[i][:40]) for i in bad[:5]),
                )
            dropped = set(bad)
            self._adopt(entry, [c for i, c in enumerate(shard.captions) if i not in dropped])
        # 3. Complete shards renamed into place just before a crash, not yet indexed.
        known = {entry.file for entry in self._shards}
        for file in sorted(self.path.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
            if file.name in known:
                continue
            try:
                shard = _read_shard_header(file, self.info)
                if _bad_entries(file, shard):
                    raise IntegrityError("embeddings fail their CRC-32C")
            except IntegrityError as exc:
                log.warning("%s: removing unusable shard %s (%s)", self.path, file.name, exc)
                file.unlink()
                changed = True
                continue
            captions = shard.captions
            if any(c in self._done for c in captions) or len(set(captions)) != len(captions):
                log.warning("%s: removing shard %s: it repeats stored captions", self.path, file.name)
                file.unlink()
            else:
                log.info("%s: adopting complete shard %s written before an interruption", self.path, file.name)
                self._adopt(_ShardEntry(file.name, len(captions), file.stat().st_size), captions)
            changed = True
        if changed:
            _write_index(self.path, self.info, self._shards)
        # 4. Shards with damaged embeddings: the good ones go to a new shard, then the index swaps them.
        for position, shard, bad in reversed(repairs):  # from the end: a dropped shard shifts those after it
            self._rewrite_without(position, shard, set(bad))
        return table

    def _rewrite_without(self, position: int, shard: _Shard, bad: set[int]) -> None:
        old = self._shards[position]
        keep = [i for i in range(len(shard.captions)) if i not in bad]
        if keep:
            assert shard.spans is not None
            with safe_open(str(self.path / old.file), framework="pt") as f:
                rows = f.get_slice(ROWS_KEY)
                parts = [rows[shard.spans[i][0] : shard.spans[i][0] + shard.spans[i][1]] for i in keep]
            new = _write_shard(
                self.path,
                self.info,
                len(self._shards),
                [shard.captions[i] for i in keep],
                torch.cat(parts) if parts else torch.empty((0, self.info.shape[1]), dtype=self.info.dtype),
                [shard.spans[i][1:] for i in keep],
            )
            self._shards[position] = new
        else:
            del self._shards[position]
        _write_index(self.path, self.info, self._shards)
        (self.path / old.file).unlink(missing_ok=True)

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

    @property
    def pad_table(self) -> torch.Tensor | None:
        """The store's pad table in the store's dtype (None: rows are stored whole)."""
        return self._table

    def add(self, caption: str, embedding: torch.Tensor) -> None:
        """Queue one full embedding ``[L, D]``; its real rows are copied, and a full shard goes to the background writer.

        Leading rows bit-identical to the store's pad table are left out (see the module docstring).
        """
        if self._closed:
            raise StoreError("the store writer is closed")
        if self._failed is not None:
            raise StoreError(f"the store writer stopped after a failed write: {self._failed}")
        if caption in self._done:
            raise ValueError(f"caption already stored: {caption[:60]!r}")
        if tuple(embedding.shape) != self.info.shape or embedding.dtype != self.info.dtype:
            raise IntegrityError(
                f"embedding {DTYPE_NAMES.get(embedding.dtype, embedding.dtype)} {list(embedding.shape)} does not "
                f"fit the store's {DTYPE_NAMES[self.info.dtype]} {list(self.info.shape)}"
            )
        embedding = embedding.detach().cpu()
        pad = leading_pad_rows(embedding, self._table)
        if self._filling is None:
            self._filling = torch.empty((self._capacity, self.info.shape[1]), dtype=self.info.dtype)
        n = self.info.shape[0] - pad
        rows = self._filling[self._used : self._used + n]
        rows.copy_(embedding[pad:])
        self._used += n
        self._pending.append(caption)
        self._spans.append((n, pad, entry_crc(caption, pad, rows)))
        self._done.add(caption)
        if self._used >= self._target_rows or len(self._pending) >= MAX_SHARD_ROWS:
            self.flush(wait=False)

    def extend(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for caption, embedding in items:
            self.add(caption, embedding)

    def flush(self, *, wait: bool = True) -> None:
        """Commit the queued embeddings as one shard (file, then index).

        The write runs on a background thread so receiving the next shard's
        embeddings overlaps the disk write; at most one write is outstanding
        (two shard buffers in memory). ``wait=True`` returns once it is on disk.
        A failed background write is raised here or by :meth:`close`
        (:class:`StoreWriteError`, one line); the writer then accepts nothing more.
        """
        if self._pending:
            self._wait_for_commit()  # also frees the buffer it was writing from
            buffer, used, captions, spans = self._filling, self._used, self._pending, self._spans
            assert buffer is not None  # pending captions live in the filling buffer
            self._commit_future = self._committer.submit(self._commit, buffer[:used], captions, spans)
            self._filling, self._spare = self._spare, buffer
            self._used, self._pending, self._spans = 0, [], []
        if wait:
            self._wait_for_commit()

    def _wait_for_commit(self) -> None:
        future, self._commit_future = self._commit_future, None
        if future is not None:
            try:
                future.result()
            except BaseException as exc:
                self._failed = exc
                raise

    def _commit(self, rows: torch.Tensor, captions: list[str], spans: list[tuple[int, int, int]]) -> None:
        """Background thread: write one shard atomically, then list it in the index."""
        try:
            entry = _write_shard(self.path, self.info, len(self._shards), captions, rows, spans)
            self._shards.append(entry)
            _write_index(self.path, self.info, self._shards)
        except OSError as exc:
            raise _write_error(self.path, exc) from None

    def close(self) -> None:
        """Write the last partial shard, wait for it, and release the directory.

        After a failed write nothing more is tried: the shards the index lists stay valid.
        """
        if self._closed:
            return
        try:
            if self._failed is None:
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


# -- converting version 1 stores ---------------------------------------------


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`convert_store` did.

    Attributes:
        path: the store folder.
        converted: False when it already was a version 2 store (nothing rewritten).
        captions: captions in the store after conversion.
        skipped: captions of damaged version 1 shards, left out (precompute encodes them again).
        bytes_before, bytes_after: bytes of the shards (and pad table) before and after.
        pad_table: id of the pad table the new store is compacted with (``""``: none found).
    """

    path: Path
    converted: bool
    captions: int
    skipped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    pad_table: str = ""


def infer_pad_table(store: EmbeddingStore, *, sample: int = 64) -> torch.Tensor | None:
    """A pad table read off a store's own embeddings: row ``p`` is the row most embeddings share at position ``p``.

    Rows shared by two or more of up to ``sample`` embeddings (spread over the
    store), position by position from the first, until a position where none is
    shared. A left-padded model's pad rows are exactly such rows. Whatever this
    returns, compaction stays lossless (rows are left out only when equal to it
    bit for bit); a poor guess only saves less. None when nothing is shared.
    """
    captions = list(store)
    if len(captions) < 2:
        return None
    step = max(1, len(captions) // sample)
    picked = captions[::step][:sample]
    length = store.info.shape[0]
    row_crcs = []
    for caption in picked:
        embedding = store.get(caption)
        row_crcs.append([crc32c(tensor_bytes(embedding[p])) for p in range(length)])
    sources: list[int] = []  # which picked embedding supplies row p
    for p in range(length):
        crc, count = Counter(crcs[p] for crcs in row_crcs).most_common(1)[0]
        if count < 2:
            break
        sources.append(next(i for i, crcs in enumerate(row_crcs) if crcs[p] == crc))
    if not sources:
        return None
    table = torch.empty((len(sources), store.info.shape[1]), dtype=store.info.dtype)
    for i in sorted(set(sources)):
        embedding = store.get(picked[i])
        for p, source in enumerate(sources):
            if source == i:
                table[p] = embedding[p]
    return table


def _folder_bytes(path: Path, names: Iterable[str]) -> int:
    return sum((path / n).stat().st_size for n in names if (path / n).is_file())


def convert_store(
    path: str | os.PathLike,
    *,
    pad_table: torch.Tensor | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> ConvertReport:
    """Rewrite a version 1 store at ``path`` as version 2 (compact rows, CRC-32C per embedding), in place.

    The new shards are written under ``path/.convert-v2`` (itself a store, crash
    safe), moved next to the old ones, and one atomic rewrite of ``index.json``
    switches the store to them; then the old shards are deleted. Killed at any
    point, ``path`` is a complete version 1 or version 2 store, and running this
    again finishes the job. Every embedding is checked to rebuild bit for bit.

    Args:
        pad_table: ``[P, D]``, the model's pad table; default: read off the store
            itself (:func:`infer_pad_table`).
        shard_bytes: target size of the new shards.
        progress: a tqdm bar.

    Raises:
        StoreError: not a store, or being written by another process.
        StoreWriteError: the disk filled up (the store stays version 1, untouched).
    """
    path = Path(path)
    with _locked_store(path) as (version, info, listed):
        staging = path / CONVERT_DIR
        listed_names = {s.file for s in listed}
        if version >= 2:
            _remove_conversion_leftovers(path, info, listed_names)
            return ConvertReport(path, False, sum(s.count for s in listed), pad_table=info.pad_table)
        _remove_unfinished_writes(path)
        # Leftovers of a conversion killed before its switch: version 2 shards moved out of staging too early.
        for file in path.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}"):
            if file.name not in listed_names and ROWS_KEY in _read_header_or_empty(file):
                file.unlink()
        shutil.rmtree(staging, ignore_errors=True)
        good = []
        skipped = 0
        for entry in listed:
            try:
                shard = _read_shard_header(path / entry.file, info, 1)
                if len(shard.captions) != entry.count or (path / entry.file).stat().st_size != entry.bytes:
                    raise IntegrityError("does not match the index")
                good.append(entry)
            except (IntegrityError, OSError) as exc:
                log.warning("%s: leaving out damaged shard %s (%s); precompute encodes it again", path, entry.file, exc)
                skipped += entry.count
        old = _open_version_1(path, info, good)
        if pad_table is None:
            pad_table = infer_pad_table(old)
        base = StoreInfo(**{**info.__dict__, "pad_table": ""})
        try:
            with StoreWriter(staging, base, shard_bytes=shard_bytes, pad_table=pad_table) as writer:
                for caption in tqdm(old, total=len(old), desc="convert", unit="caption", disable=not progress):
                    writer.add(caption, old.get(caption))
            new_info = writer.info
            written = _read_index(staging)
            if written is None:
                raise StoreError(f"{staging}: the converted store has no {INDEX_NAME}")
            new_version, _, new_shards = written
            # Check before the switch: every embedding rebuilds to the old bytes.
            new = EmbeddingStore(staging)
            for caption in old:
                if not torch.equal(new.get(caption).view(torch.uint8), old.get(caption).view(torch.uint8)):
                    raise IntegrityError(f"{caption[:60]!r} does not rebuild bit for bit; the store is left as it was")
            del new
            moved = [s.file for s in new_shards] + (list(PAD_TABLE_NAMES) if new_info.pad_table else [])
            for name in moved:
                os.replace(staging / name, path / name)
            _write_index(path, new_info, new_shards, version=VERSION)  # the switch
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)  # a partial copy would only hold the space the disk lacks
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            error = StoreWriteError(
                f"cannot convert {path}: {reason}. It is left as it was (version 1, readable); free some "
                "space (the new shards need about a tenth of the old ones) and run the command again"
            )
            error.errno = exc.errno
            raise error from None
        before = _folder_bytes(path, (s.file for s in listed))
        after = _folder_bytes(path, moved)
        _remove_conversion_leftovers(path, new_info, {s.file for s in new_shards})
        return ConvertReport(
            path,
            True,
            sum(s.count for s in new_shards),
            skipped,
            before,
            after,
            new_info.pad_table,
        )


def _read_header_or_empty(file: Path) -> dict:
    try:
        return _read_header(file)[0]
    except IntegrityError:
        return {}


def _open_version_1(path: Path, info: StoreInfo, shards: list[_ShardEntry]) -> EmbeddingStore:
    """A reader over the given (checked) shards of a version 1 store."""
    store = EmbeddingStore.__new__(EmbeddingStore)
    store.paths = [path]
    store.path = path
    store.info = info
    store._shards, store._shard_dirs, store._shard_spans, store._shard_tables = [], [], [], []
    store._tables, store.versions = [None], [1]
    store._rows, store._captions = {}, []
    store._load_shards(path, info, 1, shards)
    store._handles = OrderedDict()
    store._lock = threading.Lock()
    return store


def _remove_conversion_leftovers(path: Path, info: StoreInfo, listed: set[str]) -> None:
    """After the switch: the old shards and the staging folder go."""
    for file in path.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}"):
        if file.name not in listed and ROWS_KEY not in _read_header_or_empty(file):
            file.unlink()
    shutil.rmtree(path / CONVERT_DIR, ignore_errors=True)
