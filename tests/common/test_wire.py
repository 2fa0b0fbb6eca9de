"""Wire codec: round trips, and every kind of damage is caught."""

from __future__ import annotations

import pytest
import torch

from common.errors import IntegrityError, InvalidRequest
from common.protocol import pb2
from common.wire import (
    TensorAssembler,
    WireTensor,
    decode_response_frame,
    dtype_from_wire,
    dtype_to_wire,
    encode_response_frame,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(dtype):
    t = torch.randn(512, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    wire = WireTensor.from_tensor(t)
    assert max(len(c) for _, c in wire.spans(64 * 1024)) <= 64 * 1024
    assert wire.nbytes == t.numel() * t.element_size()
    out = torch.empty_like(t)
    asm = TensorAssembler(out, wire.header())
    for offset, piece in wire.spans(64 * 1024):
        asm.add_bytes(offset, piece)
    asm.finish()
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_bytes_are_little_endian_raw_memory():
    t = torch.tensor([1.0, -2.0], dtype=torch.float32)
    wire = WireTensor.from_tensor(t)
    assert bytes(wire.data) == bytes.fromhex("0000803f000000c0")


def _assemble(wire, out, mutate=None):
    asm = TensorAssembler(out, wire.header())
    for i, chunk in enumerate(wire.spans(1024)):
        if mutate:
            chunk = mutate(i, chunk)
        if chunk is not None:
            asm.add_bytes(*chunk)
    asm.finish()


def test_flipped_byte_fails_crc():
    t = torch.randn(64, 64).bfloat16()
    wire = WireTensor.from_tensor(t)

    def flip(i, c):
        if i == 2:
            offset, data = c[0], bytearray(c[1])
            data[5] ^= 1
            return offset, bytes(data)
        return c

    with pytest.raises(IntegrityError, match="CRC"):
        _assemble(wire, torch.empty_like(t), flip)


def test_missing_chunk_is_detected():
    t = torch.randn(64, 64)
    wire = WireTensor.from_tensor(t)
    with pytest.raises(IntegrityError, match="offset"):
        _assemble(wire, torch.empty_like(t), lambda i, c: None if i == 1 else c)


def test_truncated_stream_is_detected():
    t = torch.randn(64, 64)
    wire = WireTensor.from_tensor(t)
    n = len(wire.spans(1024))
    with pytest.raises(IntegrityError, match="stream ended"):
        _assemble(wire, torch.empty_like(t), lambda i, c: None if i == n - 1 else c)


def test_overlong_chunk_is_refused():
    t = torch.randn(4, 4)
    wire = WireTensor.from_tensor(t)
    asm = TensorAssembler(torch.empty_like(t), wire.header())
    with pytest.raises(IntegrityError, match="more bytes"):
        asm.add_bytes(0, b"\0" * (t.numel() * 4 + 1))


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


def _protobuf_built(*, request_id, prompt_index, offset, data, header=None, request_done=False):
    msg = pb2.EncodeResponse(request_id=request_id, prompt_index=prompt_index, request_done=request_done)
    msg.chunk.offset = offset
    msg.chunk.data = bytes(data)
    if header is not None:
        msg.header.CopyFrom(header)
    return msg


FRAME_CASES = [
    dict(request_id="", prompt_index=0, offset=0, data=b""),
    dict(request_id="", prompt_index=0, offset=0, data=b"\x00\x01" * 300),
    dict(request_id="req-é-42", prompt_index=7, offset=1 << 20, data=bytes(range(256)) * 4096, request_done=True),
    dict(request_id="r", prompt_index=300, offset=(1 << 35) + 3, data=b"x" * 127),
]


@pytest.mark.parametrize("case", FRAME_CASES)
@pytest.mark.parametrize("with_header", [False, True])
def test_hand_framed_messages_are_what_protobuf_parses(case, with_header):
    header = WireTensor.from_tensor(torch.ones(3, 2)).header(pb2.PromptMetadata(token_count=5, model_fingerprint="f:1"))
    kwargs = dict(case, header=header if with_header else None)
    frame = encode_response_frame(**kwargs)
    assert pb2.EncodeResponse.FromString(frame) == _protobuf_built(**kwargs)


@pytest.mark.parametrize("case", FRAME_CASES)
def test_decoding_splits_protobuf_serialized_messages(case):
    header = WireTensor.from_tensor(torch.ones(3, 2)).header()
    built = _protobuf_built(**case, header=header)
    msg, offset, data = decode_response_frame(built.SerializeToString())
    assert (offset, bytes(data)) == (case["offset"], case["data"])
    assert msg.header == header and msg.request_id == case["request_id"] and msg.prompt_index == case["prompt_index"]
    assert msg.request_done == case.get("request_done", False)
    assert not msg.HasField("chunk")


def test_decoding_keeps_error_messages():
    built = pb2.EncodeResponse(request_id="x", error=pb2.EncodeError(code=5, message="not cached"), request_done=True)
    msg, _, data = decode_response_frame(built.SerializeToString())
    assert msg.error.code == 5 and msg.error.message == "not cached" and len(data) == 0


@pytest.mark.parametrize("raw", [b"\x22\x05\x12\x10ab", b"\xff\xff", b"\x0f"])
def test_malformed_frames_are_integrity_errors(raw):
    with pytest.raises(IntegrityError, match="malformed"):
        decode_response_frame(raw)


def test_frames_round_trip_a_tensor_through_the_decoder():
    t = torch.randn(64, 96).bfloat16()
    wire = WireTensor.from_tensor(t)
    frames = list(wire.frames(request_id="a", prompt_index=2, metadata=None, chunk_bytes=1000, request_done=True))
    assert len(frames) == -(-t.numel() * 2 // 1000)
    out = torch.empty_like(t)
    asm = None
    for i, raw in enumerate(frames):
        msg, offset, data = decode_response_frame(raw)
        assert msg.HasField("header") == (i == 0)
        assert msg.request_done == (i == len(frames) - 1)
        assert len(data) <= 1000
        asm = asm or TensorAssembler(out, msg.header)
        asm.add_bytes(offset, data)
    asm.finish()
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))
