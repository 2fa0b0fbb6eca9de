"""Pad tables: the rows every left-padded embedding shares, kept once on disk instead of sent every time.

FLUX.2 pads every prompt on the left to 512 tokens, and a pad row depends only
on its position (a left pad token attends to nothing but pads). A prompt fills
43-132 rows of 512 (docs/benchmarks.md), so most of each 15.7 MB embedding is
the same rows again. A server that has a model's pad table (``ModelInfo.pad_table``
names it) sends it once (``GetPadTable``); a client that holds it asks
``Encode`` for only the real rows (``EncodeRequest.pad_table``) and puts the
pad rows back here. The rebuilt tensor equals the server's bit for bit: the
server leaves rows out only when they equal the table exactly.

Tables live in ``<cache>/pad-tables/`` as safetensors (never pickle), named by
the table id (model fingerprint, rows and CRC-32C), with that CRC checked on
every read; a damaged or foreign file is deleted and fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import safetensors.torch
import torch

from common.atomic import atomic_write
from common.errors import Flux2RemoteError, IntegrityError
from common.pad_table import pad_table_id, rebuild  # noqa: F401 - rebuild is part of this module's API
from common.protocol import pb2
from common.wire import TensorAssembler, dtype_from_wire

log = logging.getLogger(__name__)

_FORMAT = "flux2-remote-pad-table/1"


class PadTables:
    """The pad tables this machine holds, on disk, verified on every read.

    Args:
        root: folder for the tables; None: :func:`default_root` (``<flux2-remote cache>/pad-tables``).
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def path_of(self, table: str) -> Path:
        return self.root / (hashlib.sha256(table.encode()).hexdigest()[:32] + ".safetensors")

    def load(self, table: str) -> torch.Tensor | None:
        """The table named ``table``, or None when absent, damaged or another one (the file is then removed)."""
        path = self.path_of(table)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            tensors = safetensors.torch.load(data)
            meta = safetensors.safe_open(path, "pt").metadata() or {}
            loaded = tensors["pad_rows"]
            if meta.get("format") != _FORMAT or meta.get("table") != table:
                raise ValueError("another table's file")
            fingerprint = table.rpartition("/pad:")[0]
            if pad_table_id(fingerprint, loaded) != table:
                raise ValueError("CRC-32C or row count mismatch")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # any damage: fetch it again rather than rebuild wrong embeddings
            log.warning("pad table %s is damaged (%s); fetching it again", path.name, exc)
            path.unlink(missing_ok=True)
            return None
        return loaded

    def save(self, table: str, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` as ``table`` (atomic: a crash leaves the old file or none)."""
        body = safetensors.torch.save({"pad_rows": tensor.contiguous()}, metadata={"format": _FORMAT, "table": table})
        atomic_write(self.path_of(table), lambda tmp: tmp.write_bytes(body))

    def get(self, stub, model_info: pb2.ModelInfo, *, metadata=(), timeout: float = 60.0) -> torch.Tensor | None:
        """The model's table: from disk, else fetched with ``GetPadTable`` and kept. None: the model has none."""
        if not model_info.pad_table:
            return None
        table = self.load(model_info.pad_table)
        if table is not None:
            return table
        table = fetch(stub, model_info, metadata=metadata, timeout=timeout)
        self.save(model_info.pad_table, table)
        return table


def default_root() -> Path:
    """``<flux2-remote cache>/pad-tables``: the user cache dir (``FLUX2_REMOTE_CACHE`` overrides)."""
    from common.demo import cache_root

    return cache_root() / "pad-tables"


@dataclass(frozen=True)
class HeldTable:
    """A pad table this client holds: its id (what ``EncodeRequest.pad_table`` names) and its ``[P, D]`` rows."""

    id: str
    rows: torch.Tensor


class Elision:
    """Which pad table a client names in its requests, per model: got once per table id, then kept in memory.

    A table is read from :class:`PadTables` (checked; a damaged or foreign file
    is removed) or fetched with ``GetPadTable`` and saved there. Anything that
    goes wrong on the way (the fetch fails, the disk is read-only) is logged
    once and the client asks for whole embeddings: elision saves bytes, it must
    never fail an encode. A table that could not be fetched is tried again
    after ``retry_after_s``, so a long job outlives a replica that was down.

    Args:
        tables: the on-disk store; None turns elision off (every answer is whole).
        retry_after_s: seconds of whole embeddings before a failed table is tried again.
    """

    def __init__(self, tables: PadTables | None, *, retry_after_s: float = 300.0):
        self.tables = tables
        self.retry_after_s = retry_after_s
        self._held: dict[str, torch.Tensor] = {}
        self._failed: dict[str, float] = {}  # table id -> when it could not be got (time.monotonic)
        self._lock = threading.Lock()  # one fetch per table, however many threads encode

    def table_for(self, connection, model_info, *, timeout: float = 60.0) -> HeldTable | None:
        """The table to name for ``model_info`` (:class:`dit_client.frames.ModelInfo` or ``pb2.ModelInfo``),
        or None: elision off, a server or model without one, or it could not be got."""
        if self.tables is None or model_info is None or not model_info.pad_table:
            return None
        table_id = model_info.pad_table
        with self._lock:
            if table_id not in self._held:
                failed_at = self._failed.get(table_id)
                if failed_at is not None and time.monotonic() - failed_at < self.retry_after_s:
                    return None
                rows = self._get(self.tables, connection, model_info, timeout, warn=failed_at is None)
                if rows is None:
                    self._failed[table_id] = time.monotonic()
                    return None
                self._held[table_id] = rows
                self._failed.pop(table_id, None)
        return HeldTable(table_id, self._held[table_id])

    @staticmethod
    def _get(tables: PadTables, connection, model_info, timeout: float, *, warn: bool) -> torch.Tensor | None:
        try:
            rows = tables.load(model_info.pad_table)
        except OSError as exc:  # an unreadable cache dir: as if the table were absent
            log.warning("could not read pad table %s in %s (%s)", model_info.pad_table, tables.root, exc)
            rows = None
        if rows is not None:
            return rows
        try:
            rows = fetch(connection.stub, model_info, metadata=connection.metadata, timeout=timeout)
        except (grpc.RpcError, Flux2RemoteError) as exc:
            reason = connection.translate(exc) if isinstance(exc, grpc.RpcError) else exc
            if warn:
                log.warning(
                    "could not fetch pad table %s (%s); receiving whole embeddings", model_info.pad_table, reason
                )
            return None
        try:
            tables.save(model_info.pad_table, rows)
        except OSError as exc:  # still good in memory; the next process fetches it again
            log.warning("could not keep pad table %s in %s (%s)", model_info.pad_table, tables.root, exc)
        return rows


class NamesATable(Protocol):
    """What :func:`fetch` reads of a model's description: ``pb2.ModelInfo`` or the client's ``ModelInfo``."""

    @property
    def name(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def pad_table(self) -> str: ...


def fetch(stub, model_info: NamesATable, *, metadata=(), timeout: float = 60.0) -> torch.Tensor:
    """Download ``model_info``'s pad table through ``stub.GetPadTable`` (raw frames), checked against its id."""
    out = None
    assembler = None
    for msg in stub.GetPadTable(pb2.GetPadTableRequest(model=model_info.name), metadata=metadata, timeout=timeout):
        if msg.HasField("header"):
            header = msg.header
            out = torch.empty(tuple(header.shape), dtype=dtype_from_wire(header.dtype))
            assembler = TensorAssembler(out, header)
        if assembler is None:
            raise IntegrityError("the pad table's first message carried no header")
        assembler.add_bytes(msg.chunk.offset, msg.chunk.data)
    if assembler is None or out is None:
        raise IntegrityError("the server sent no pad table")
    assembler.finish()
    if pad_table_id(model_info.fingerprint, out) != model_info.pad_table:
        raise IntegrityError(f"the pad table received is not {model_info.pad_table}")
    return out
