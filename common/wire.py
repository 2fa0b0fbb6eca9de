"""Tensors on the wire: raw little-endian bytes, a dtype from an allow-list, a shape, a CRC-32C.

No pickle, no ``torch.load``: a receiver only ever copies bytes into a buffer
it allocated itself from a validated dtype and shape.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import google_crc32c
import numpy as np
import torch

from common.errors import IntegrityError, InvalidRequest
from common.protocol import pb2

if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian and we copy raw memory
    raise ImportError("flux2-remote supports little-endian hosts only")

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message limit

_TORCH_BY_WIRE = {
    pb2.DTYPE_BFLOAT16: torch.bfloat16,
    pb2.DTYPE_FLOAT16: torch.float16,
    pb2.DTYPE_FLOAT32: torch.float32,
}
_WIRE_BY_TORCH = {v: k for k, v in _TORCH_BY_WIRE.items()}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Integer types of the same width: numpy has no bfloat16, and bytes are bytes.
_RAW_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def dtype_to_wire(dtype: torch.dtype) -> int:
    try:
        return _WIRE_BY_TORCH[dtype]
    except KeyError:
        raise InvalidRequest(f"dtype {dtype} cannot be sent; allowed: {', '.join(DTYPE_NAMES.values())}") from None


def dtype_from_wire(value: int, default: torch.dtype | None = None) -> torch.dtype:
    """The torch dtype of a wire enum; ``DTYPE_UNSPECIFIED`` gives ``default``."""
    if value == pb2.DTYPE_UNSPECIFIED and default is not None:
        return default
    try:
        return _TORCH_BY_WIRE[value]
    except KeyError:
        raise InvalidRequest(
            f"unknown dtype enum value {value}; allowed: DTYPE_BFLOAT16, DTYPE_FLOAT16, DTYPE_FLOAT32"
        ) from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in little-endian order, without copying where possible (CPU tensors)."""
    t = tensor.detach().contiguous().cpu()
    raw = t.view(_RAW_VIEW[t.element_size()]).numpy()
    return memoryview(raw).cast("B")


@dataclass(frozen=True)
class WireTensor:
    """One tensor cut into chunks, ready to send (and cheap to send again from a cache).

    Attributes:
        dtype: element type.
        shape: tensor shape, e.g. ``(512, 15360)`` for one FLUX.2-dev prompt.
        chunks: raw little-endian bytes, each at most the chunk size; one empty chunk for an empty tensor.
        crc32c: CRC-32C of all bytes in order.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[bytes, ...]
    crc32c: int

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "WireTensor":
        data = tensor_bytes(tensor)
        chunks = tuple(bytes(data[off : off + chunk_bytes]) for off in range(0, len(data), chunk_bytes)) or (b"",)
        crc = 0
        for c in chunks:
            crc = google_crc32c.extend(crc, c)
        return cls(tensor.dtype, tuple(tensor.shape), chunks, crc)

    def header(self, metadata: pb2.PromptMetadata | None = None) -> pb2.TensorHeader:
        return pb2.TensorHeader(
            dtype=dtype_to_wire(self.dtype),
            shape=list(self.shape),
            total_bytes=self.nbytes,
            crc32c=self.crc32c,
            metadata=metadata,
        )

    def iter_chunks(self) -> Iterator[pb2.TensorChunk]:
        off = 0
        for c in self.chunks:
            yield pb2.TensorChunk(offset=off, data=c)
            off += len(c)


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects: it allocates the buffer from this, never from the sender's claims alone."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


class TensorAssembler:
    """Writes incoming chunks of one tensor straight into ``out`` (a preallocated CPU tensor).

    Checks every chunk against the header (dtype, shape, size, bounds, order)
    and the CRC-32C at the end; raises :class:`IntegrityError` on any mismatch.
    """

    def __init__(self, out: torch.Tensor, header: pb2.TensorHeader):
        if dtype_from_wire(header.dtype) != out.dtype:
            raise IntegrityError(f"server sent {dtype_from_wire(header.dtype)}, expected {out.dtype}")
        if tuple(header.shape) != tuple(out.shape):
            raise IntegrityError(f"server sent shape {tuple(header.shape)}, expected {tuple(out.shape)}")
        nbytes = out.numel() * out.element_size()
        if header.total_bytes != nbytes:
            raise IntegrityError(f"server announced {header.total_bytes} bytes, shape needs {nbytes}")
        self._raw = out.view(_RAW_VIEW[out.element_size()]).numpy().reshape(-1).view(np.uint8)
        self._expected_crc = header.crc32c
        self._crc = 0
        self._filled = 0

    def add(self, chunk: pb2.TensorChunk) -> None:
        # Each read of a upb bytes field builds a new bytes object (a full copy): read it once.
        data = chunk.data
        n = len(data)
        if chunk.offset != self._filled:
            raise IntegrityError(f"chunk at offset {chunk.offset}, expected {self._filled}")
        if self._filled + n > len(self._raw):
            raise IntegrityError("more bytes than the announced tensor size")
        self._raw[self._filled : self._filled + n] = np.frombuffer(data, dtype=np.uint8)
        self._crc = google_crc32c.extend(self._crc, data)
        self._filled += n

    @property
    def complete(self) -> bool:
        return self._filled == len(self._raw)

    def finish(self) -> None:
        if not self.complete:
            raise IntegrityError(f"stream ended after {self._filled} of {len(self._raw)} bytes")
        if self._crc != self._expected_crc:
            raise IntegrityError("CRC-32C mismatch: the embedding was damaged in transit")
