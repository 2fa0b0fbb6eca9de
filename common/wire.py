"""Tensors on the wire: raw little-endian bytes, a dtype from an allow-list, a shape, a CRC-32C.

No pickle, no ``torch.load``: a receiver only ever copies bytes into a buffer
it allocated itself from a validated dtype and shape.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import crc32c as _crc32c
import numpy as np
import torch
from google.protobuf.message import DecodeError

from common.dtypes import DTYPE_NAMES, DTYPES, UnknownDtype, row_of, wire_row
from common.errors import IntegrityError, InvalidRequest
from common.protocol import pb2

if sys.byteorder != "little":  # pragma: no cover - the wire is little-endian and we copy raw memory
    raise ImportError("flux2-remote supports little-endian hosts only")

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message limit

# Integer types of the same width: numpy has no bfloat16, and bytes are bytes.
_RAW_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def dtype_to_wire(dtype: torch.dtype) -> pb2.DType:
    try:
        return cast("pb2.DType", row_of(dtype).wire)  # the table holds the enum's numbers
    except UnknownDtype:
        raise InvalidRequest(f"dtype {dtype} cannot be sent; allowed: {', '.join(DTYPE_NAMES.values())}") from None


def dtype_from_wire(value: int, default: torch.dtype | None = None) -> torch.dtype:
    """The torch dtype of a wire enum; ``DTYPE_UNSPECIFIED`` gives ``default``."""
    if value == pb2.DTYPE_UNSPECIFIED and default is not None:
        return default
    row = wire_row(value)
    if row is None:
        allowed = ", ".join(pb2.DType.Name(r.wire) for r in DTYPES)
        raise InvalidRequest(f"unknown dtype enum value {value}; allowed: {allowed}")
    return row.torch


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in little-endian order, without copying where possible (CPU tensors)."""
    t = tensor.detach().contiguous().cpu()
    raw = t.view(_RAW_VIEW[t.element_size()]).numpy()
    return memoryview(raw).cast("B")  # type: ignore[arg-type]  # numpy arrays export the buffer protocol


def crc32c(data: bytes | memoryview, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``value``; hardware-accelerated, no copy."""
    return _crc32c.crc32c(data, value=value)


# -- framing ---------------------------------------------------------------
#
# protobuf-python copies a ``bytes`` field on every assignment, read and
# serialisation: three copies of each 1 MiB chunk per side. EncodeResponse
# messages are therefore framed here, straight from the tensor's memory on the
# server and straight into the output buffer on the client, in exactly the
# protobuf wire format (field numbers read from the generated descriptors), so
# any protobuf client in any language reads them as usual. Tests check both
# directions against the protobuf library itself.

_RESPONSE = {f.name: f.number for f in pb2.EncodeResponse.DESCRIPTOR.fields}
_CHUNK = {f.name: f.number for f in pb2.TensorChunk.DESCRIPTOR.fields}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise IntegrityError("malformed response: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """Yield ``(field, wire_type, start, value_start, end)`` for each top-level field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        value_start = pos
        if wire_type == _VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire_type == _LEN:
            n, value_start = _read_varint(buf, pos)
            pos = value_start + n
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        else:
            raise IntegrityError(f"malformed response: wire type {wire_type}")
        if pos > len(buf):
            raise IntegrityError("malformed response: field runs past the end")
        yield field, wire_type, start, value_start, pos


_K_REQUEST_ID = _key(_RESPONSE["request_id"], _LEN)
_K_PROMPT_INDEX = _key(_RESPONSE["prompt_index"], _VARINT)
_K_HEADER = _key(_RESPONSE["header"], _LEN)
_K_CHUNK = _key(_RESPONSE["chunk"], _LEN)
_K_DONE = _key(_RESPONSE["request_done"], _VARINT)
_K_OFFSET = _key(_CHUNK["offset"], _VARINT)
_K_DATA = _key(_CHUNK["data"], _LEN)


def encode_response_frame(
    *,
    request_id: str,
    prompt_index: int,
    offset: int,
    data: bytes | memoryview,
    header: pb2.TensorHeader | None = None,
    request_done: bool = False,
) -> bytes:
    """A serialized ``EncodeResponse`` carrying one chunk; ``data`` is copied once, into the result."""
    parts: list[bytes | memoryview] = []
    if request_id:
        rid = request_id.encode()
        parts += [_K_REQUEST_ID, _varint(len(rid)), rid]
    if prompt_index:
        parts += [_K_PROMPT_INDEX, _varint(prompt_index)]
    if header is not None:
        head = header.SerializeToString()
        parts += [_K_HEADER, _varint(len(head)), head]
    chunk_head = (_K_OFFSET + _varint(offset) if offset else b"") + _K_DATA + _varint(len(data))
    parts += [_K_CHUNK, _varint(len(chunk_head) + len(data)), chunk_head, data]
    if request_done:
        parts += [_K_DONE, b"\x01"]
    return b"".join(parts)


def decode_response_frame(raw: bytes) -> tuple[pb2.EncodeResponse, int, memoryview]:
    """Split a serialized ``EncodeResponse`` into (message without its chunk, chunk offset, chunk bytes).

    The chunk bytes are a view into ``raw``, not a copy. Every other field
    (header, error, ids...) is parsed by protobuf itself.
    """
    buf = memoryview(raw)
    rest: list[memoryview] = []
    offset, data = 0, buf[0:0]
    for field, wire_type, start, value_start, end in _fields(buf):
        if field == _RESPONSE["chunk"] and wire_type == _LEN:
            inner = buf[value_start:end]
            for f, wt, _s, vs, e in _fields(inner):
                if f == _CHUNK["offset"] and wt == _VARINT:
                    offset, _ = _read_varint(inner, vs)
                elif f == _CHUNK["data"] and wt == _LEN:
                    data = inner[vs:e]
        else:
            rest.append(buf[start:end])
    try:
        msg = pb2.EncodeResponse.FromString(b"".join(rest))
    except DecodeError as exc:
        raise IntegrityError(f"malformed response: {exc}") from None
    return msg, offset, data


@dataclass(frozen=True)
class WireTensor:
    """One tensor ready to send: its bytes (a view, no copy), dtype, shape and CRC-32C.

    Attributes:
        dtype: element type.
        shape: tensor shape, e.g. ``(512, 15360)`` for one FLUX.2-dev prompt.
        data: raw little-endian bytes of the tensor (a view that keeps the tensor alive).
        crc32c: CRC-32C of ``data``.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: memoryview
    crc32c: int

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> WireTensor:
        data = tensor_bytes(tensor)
        return cls(tensor.dtype, tuple(tensor.shape), data, crc32c(data))

    def header(self, metadata: pb2.PromptMetadata | None = None) -> pb2.TensorHeader:
        return pb2.TensorHeader(
            dtype=dtype_to_wire(self.dtype),
            shape=list(self.shape),
            total_bytes=self.nbytes,
            crc32c=self.crc32c,
            metadata=metadata,
        )

    def spans(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[tuple[int, memoryview]]:
        """``(offset, bytes)`` pieces of at most ``chunk_bytes``; an empty tensor gives one empty piece."""
        n = len(self.data)
        return [(off, self.data[off : off + chunk_bytes]) for off in range(0, n, chunk_bytes)] or [(0, self.data)]

    def frames(
        self,
        *,
        request_id: str,
        prompt_index: int,
        metadata: pb2.PromptMetadata | None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        request_done: bool = False,
    ) -> Iterator[bytes]:
        """Serialized ``EncodeResponse`` messages for this tensor: the header rides on the first,
        ``request_done`` (if asked) on the last."""
        spans = self.spans(chunk_bytes)
        for i, (off, piece) in enumerate(spans):
            yield encode_response_frame(
                request_id=request_id,
                prompt_index=prompt_index,
                offset=off,
                data=piece,
                header=self.header(metadata) if i == 0 else None,
                request_done=request_done and i == len(spans) - 1,
            )


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

    def add_bytes(self, offset: int, data: bytes | memoryview) -> None:
        """Take the chunk at ``offset`` (e.g. a view from :func:`decode_response_frame`)."""
        n = len(data)
        if offset != self._filled:
            raise IntegrityError(f"chunk at offset {offset}, expected {self._filled}")
        if self._filled + n > len(self._raw):
            raise IntegrityError("more bytes than the announced tensor size")
        self._raw[self._filled : self._filled + n] = np.frombuffer(data, dtype=np.uint8)
        self._crc = crc32c(data, self._crc)
        self._filled += n

    @property
    def complete(self) -> bool:
        return self._filled == len(self._raw)

    def finish(self) -> None:
        if not self.complete:
            raise IntegrityError(f"stream ended after {self._filled} of {len(self._raw)} bytes")
        if self._crc != self._expected_crc:
            raise IntegrityError("CRC-32C mismatch: the embedding was damaged in transit")
