"""Wire codec: round trips, and every kind of damage is caught."""

from __future__ import annotations

import pytest
import torch

from common.errors import IntegrityError, InvalidRequest
from common.protocol import pb2
from common.wire import TensorAssembler, WireTensor, dtype_from_wire, dtype_to_wire


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(dtype):
    t = torch.randn(512, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    wire = WireTensor.from_tensor(t, chunk_bytes=64 * 1024)
    assert max(len(c) for c in wire.chunks) <= 64 * 1024
    assert wire.nbytes == t.numel() * t.element_size()
    out = torch.empty_like(t)
    asm = TensorAssembler(out, wire.header())
    for chunk in wire.iter_chunks():
        asm.add(chunk)
    asm.finish()
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_bytes_are_little_endian_raw_memory():
    t = torch.tensor([1.0, -2.0], dtype=torch.float32)
    wire = WireTensor.from_tensor(t)
    assert b"".join(wire.chunks) == bytes.fromhex("0000803f000000c0")


def _assemble(wire, out, mutate=None):
    asm = TensorAssembler(out, wire.header())
    for i, chunk in enumerate(wire.iter_chunks()):
        if mutate:
            chunk = mutate(i, chunk)
        if chunk is not None:
            asm.add(chunk)
    asm.finish()


def test_flipped_byte_fails_crc():
    t = torch.randn(64, 64).bfloat16()
    wire = WireTensor.from_tensor(t, chunk_bytes=1024)

    def flip(i, c):
        if i == 2:
            data = bytearray(c.data)
            data[5] ^= 1
            return pb2.TensorChunk(offset=c.offset, data=bytes(data))
        return c

    with pytest.raises(IntegrityError, match="CRC"):
        _assemble(wire, torch.empty_like(t), flip)


def test_missing_chunk_is_detected():
    t = torch.randn(64, 64)
    wire = WireTensor.from_tensor(t, chunk_bytes=1024)
    with pytest.raises(IntegrityError, match="offset"):
        _assemble(wire, torch.empty_like(t), lambda i, c: None if i == 1 else c)


def test_truncated_stream_is_detected():
    t = torch.randn(64, 64)
    wire = WireTensor.from_tensor(t, chunk_bytes=1024)
    n = len(wire.chunks)
    with pytest.raises(IntegrityError, match="stream ended"):
        _assemble(wire, torch.empty_like(t), lambda i, c: None if i == n - 1 else c)


def test_overlong_chunk_is_refused():
    t = torch.randn(4, 4)
    wire = WireTensor.from_tensor(t)
    asm = TensorAssembler(torch.empty_like(t), wire.header())
    with pytest.raises(IntegrityError, match="more bytes"):
        asm.add(pb2.TensorChunk(offset=0, data=b"\0" * (t.numel() * 4 + 1)))


@pytest.mark.parametrize(
    "field,value,match",
    [("shape", [4, 5], "shape"), ("dtype", pb2.DTYPE_FLOAT16, "sent"), ("total_bytes", 7, "announced")],
)
def test_header_must_match_the_buffer(field, value, match):
    t = torch.randn(4, 4)
    header = WireTensor.from_tensor(t).header()
    if field == "shape":
        del header.shape[:]
        header.shape.extend(value)
    else:
        setattr(header, field, value)
    with pytest.raises(IntegrityError, match=match):
        TensorAssembler(torch.empty_like(t), header)


def test_dtype_allow_list():
    assert dtype_from_wire(pb2.DTYPE_UNSPECIFIED, default=torch.bfloat16) is torch.bfloat16
    assert dtype_from_wire(dtype_to_wire(torch.float16)) is torch.float16
    with pytest.raises(InvalidRequest, match="unknown dtype"):
        dtype_from_wire(99)
    with pytest.raises(InvalidRequest):
        dtype_from_wire(pb2.DTYPE_UNSPECIFIED)
    with pytest.raises(InvalidRequest):
        dtype_to_wire(torch.int64)
