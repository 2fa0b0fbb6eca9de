"""What both sides agree on about pad tables: how one is named, and how an embedding is put back together.

A pad table (``[P, D]``) holds the rows a left-padded FLUX.2 embedding has at
pad positions 0..P-1; they depend on the position only. The server names a
table by the model fingerprint and the table's own CRC-32C, so a client's copy
is known to be this very table, and leaves rows out of an answer only when
they equal it bit for bit (encoder_server/models.py); the client puts them
back (dit_client/pad_table.py).
"""

from __future__ import annotations

import torch

from common.errors import IntegrityError
from common.wire import crc32c, tensor_bytes


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` hold the same dtype, shape and bytes.

    ``torch.equal`` compares values: it calls -0.0 equal to +0.0 (and NaN unequal to
    itself), so a row it passes may still rebuild to other bits. Elision promises
    bits, so every "may this row be left out" check asks this instead.
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def pad_table_id(fingerprint: str, table: torch.Tensor | None) -> str:
    """``"<model fingerprint>/pad:<rows>:<crc32c>"``, or ``""`` when there is no table."""
    if table is None:
        return ""
    return f"{fingerprint}/pad:{table.shape[0]}:{crc32c(tensor_bytes(table)):08x}"


def pad_rows(elided: int, width: int, dtype: torch.dtype, table: torch.Tensor) -> torch.Tensor:
    """The table's first ``elided`` rows as ``[elided, width]`` in ``dtype``, what a rebuilt embedding starts with.

    ``table`` is in the server's compute dtype; it is cast like the rows were
    (an elementwise cast of equal values gives equal values). Raises
    :class:`IntegrityError` when the table cannot supply them.
    """
    if elided > table.shape[0] or table.shape[1] != width:
        raise IntegrityError(
            f"the server left out {elided} rows of width {width}; the pad table has "
            f"{table.shape[0]} rows of width {table.shape[1]}"
        )
    return table[:elided].to(dtype)


def rebuild(rows: torch.Tensor, elided: int, table: torch.Tensor) -> torch.Tensor:
    """The full ``[elided + n, D]`` embedding from its ``[n, D]`` real rows and the table's first ``elided`` rows."""
    if elided == 0:
        return rows
    return torch.cat([pad_rows(elided, rows.shape[1], rows.dtype, table), rows], dim=0)
