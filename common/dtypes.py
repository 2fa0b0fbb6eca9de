"""The one table of tensor dtypes flux2-remote knows: name, torch dtype, wire enum, safetensors tag.

Every other module reads this table instead of keeping its own dict, so a dtype
is added (or renamed) in one row. Lookups raise :class:`UnknownDtype` (a
``ValueError``) with the allowed values in the message.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.protocol import pb2


@dataclass(frozen=True)
class DtypeRow:
    """One dtype in every spelling.

    Attributes:
        name: the command-line and JSON spelling (``"bfloat16"``).
        torch: the torch dtype.
        wire: the ``flux2.encoder.v1.DType`` enum value.
        safetensors: the tag safetensors writes in a file header (``"BF16"``).
        element_bytes: bytes per element.
    """

    name: str
    torch: torch.dtype
    wire: int
    safetensors: str
    element_bytes: int


DTYPES: tuple[DtypeRow, ...] = (
    DtypeRow("bfloat16", torch.bfloat16, pb2.DTYPE_BFLOAT16, "BF16", 2),
    DtypeRow("float16", torch.float16, pb2.DTYPE_FLOAT16, "F16", 2),
    DtypeRow("float32", torch.float32, pb2.DTYPE_FLOAT32, "F32", 4),
)

_BY_NAME = {row.name: row for row in DTYPES}
_BY_TORCH = {row.torch: row for row in DTYPES}
_BY_WIRE = {row.wire: row for row in DTYPES}

# torch dtype -> name, for messages and metadata (the mapping common.wire has always exported).
DTYPE_NAMES: dict[torch.dtype, str] = {row.torch: row.name for row in DTYPES}


class UnknownDtype(ValueError):
    """A dtype outside :data:`DTYPES`."""


def dtype_names(allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The names of the table's dtypes (or of ``allowed``, checked against the table), in table order."""
    if allowed is None:
        return tuple(_BY_NAME)
    unknown = [n for n in allowed if n not in _BY_NAME]
    if unknown:
        raise UnknownDtype(f"not in the dtype table: {', '.join(unknown)}")
    return tuple(n for n in _BY_NAME if n in allowed)


def row_of(dtype: str | torch.dtype) -> DtypeRow:
    """The table row of a dtype given by name or as a torch dtype."""
    row = _BY_NAME.get(dtype) if isinstance(dtype, str) else _BY_TORCH.get(dtype)
    if row is None:
        raise UnknownDtype(f"unknown dtype {dtype!r}; choose from {', '.join(_BY_NAME)}")
    return row


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    return row_of(name).torch


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return row_of(dtype).name


def wire_row(value: int) -> DtypeRow | None:
    """The row of a wire enum value, or None for ``DTYPE_UNSPECIFIED`` and unknown values."""
    return _BY_WIRE.get(value)
