"""The gRPC service end to end: results, limits, bad input, health, reflection."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.config import Limits, ServerConfig
from common.errors import DeadlineExceeded, EncoderUnavailable, IntegrityError, InvalidRequest
from common.protocol import SERVICE_NAME, pb2, pb2_grpc
from dit_client.remote import RemoteTextEncoder
from tests.helpers import ServerThread

PROMPTS = ["a red fox in fresh snow", "", "東京の夜景 🦊"]


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb2_grpc.TextEncoderStub(channel)


def assert_still_serving(target: str) -> None:
    with RemoteTextEncoder(target) as enc:
        assert enc.encode(["still here"]).shape == (1, 512, 48)


def test_get_info_describes_the_model(server, tiny_backend):
    with RemoteTextEncoder(server.target) as enc:
        info = enc.info()
    assert info.model_id == "tiny-test"
    assert info.fingerprint == tiny_backend.fingerprint
    assert info.hidden_states_layers == (10, 20, 30)
    assert (info.computed_layers, info.num_hidden_layers) == (30, 40)
    assert (info.hidden_size, info.embedding_dim, info.max_sequence_length) == (16, 48, 512)
    assert info.dtype is torch.bfloat16
    assert info.padding_side == "left"
    assert info.limits["max_prompts_per_request"] == Limits().max_prompts_per_request
    assert info.limits["max_chunk_bytes"] == 1 << 20


@pytest.fixture(params=["whole", "elided"])
def either_server(request, tiny_backend):
    """A server without a pad table (older servers), and one with it, whose clients receive only real rows."""
    with ServerThread(tiny_backend, model_id="tiny-test", pad_table=request.param == "elided") as s:
        yield s


def test_encode_matches_the_backend_bit_for_bit(either_server, tiny_backend):
    with RemoteTextEncoder(either_server.target) as enc:
        embeds, meta = enc.encode_with_metadata(PROMPTS)
    expected = tiny_backend.encode(PROMPTS)
    assert embeds.dtype is torch.bfloat16 and embeds.shape == (3, 512, 48)
    assert torch.equal(embeds, expected.embeddings)
    assert [m.token_count for m in meta] == expected.token_counts
    assert all(m.model_fingerprint == tiny_backend.fingerprint for m in meta)
    assert all(m.total_time_ns >= m.inference_time_ns > 0 for m in meta)


def test_output_dtype_is_a_plain_cast(either_server, tiny_backend):
    with RemoteTextEncoder(either_server.target) as enc:
        f32 = enc.encode(PROMPTS[:1], dtype=torch.float32)
    assert f32.dtype is torch.float32
    assert torch.equal(f32, tiny_backend.encode(PROMPTS[:1]).embeddings.float())


def test_chunks_respect_the_limit(tiny_backend):
    config = ServerConfig(limits=Limits(max_chunk_bytes=4096))
    with ServerThread(tiny_backend, config) as srv, grpc.insecure_channel(srv.target) as channel:
        msgs = list(pb2_grpc.TextEncoderStub(channel).Encode(pb2.EncodeRequest(prompts=["a", "b"])))
        # 512 x 48 bf16 = 49152 bytes = 12 chunks of 4096 per prompt; header on the first of each.
        assert len(msgs) == 24
        assert all(len(m.chunk.data) <= 4096 for m in msgs)
        assert [m.HasField("header") for m in msgs].count(True) == 2
        assert [m.prompt_index for m in msgs] == [0] * 12 + [1] * 12
        with RemoteTextEncoder(srv.target) as enc:
            assert torch.equal(enc.encode(["a", "b"]), tiny_backend.encode(["a", "b"]).embeddings)


def test_client_splits_lists_longer_than_the_server_limit(tiny_backend):
    config = ServerConfig(limits=Limits(max_prompts_per_request=2))
    prompts = [f"prompt {i}" for i in range(5)]
    with ServerThread(tiny_backend, config) as srv, RemoteTextEncoder(srv.target) as enc:
        assert torch.equal(enc.encode(prompts), tiny_backend.encode(prompts).embeddings)


@pytest.mark.parametrize(
    "request_kwargs,match",
    [
        ({"prompts": ["x"] * 33}, "33 prompts in one request; the limit is 32"),
        ({"prompts": ["x" * 16_385]}, "16385 characters; the limit is 16384"),
        ({"prompts": []}, "no prompts"),
        ({"prompts": ["a\x00b"]}, "NUL"),
        ({"prompts": ["a"], "dtype": 99}, "unknown dtype"),
    ],
)
def test_bad_requests_get_invalid_argument_and_the_server_goes_on(server, stub, request_kwargs, match):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Encode(pb2.EncodeRequest(**request_kwargs)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in info.value.details()
    assert_still_serving(server.target)


def test_non_utf8_prompt_is_invalid_argument_not_internal(server):
    # Field 1 (prompts), length 2, bytes FF FE: protobuf refuses it as a string.
    raw = b"\x0a\x02\xff\xfe"
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream(
            f"/{SERVICE_NAME}/Encode", request_serializer=None, response_deserializer=pb2.EncodeResponse.FromString
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(raw))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()
    assert_still_serving(server.target)


def test_library_raises_readable_errors(server):
    with RemoteTextEncoder(server.target) as enc, pytest.raises(InvalidRequest, match="the limit is 16384"):
        enc.encode(["x" * 20_000])


@pytest.mark.parametrize("timeout", [0.001, 0.004])  # both under Limits.min_deadline_ms
def test_zero_or_tiny_deadline_is_deadline_exceeded(server, timeout):
    with RemoteTextEncoder(server.target, timeout=timeout) as enc:
        enc._info = RemoteTextEncoder(server.target).info()  # GetInfo with a sane deadline
        with pytest.raises(DeadlineExceeded):
            enc.encode(["a cat"])
    assert_still_serving(server.target)


def test_client_disconnect_mid_stream_leaves_the_server_serving(tiny_backend):
    config = ServerConfig(limits=Limits(max_chunk_bytes=1024))
    with ServerThread(tiny_backend, config) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            call = pb2_grpc.TextEncoderStub(channel).Encode(pb2.EncodeRequest(prompts=["a", "b", "c"]))
            first = next(call)
            assert first.HasField("header")
            call.cancel()
        assert_still_serving(srv.target)


def test_encode_stream_answers_each_request_and_survives_a_bad_one(server, tiny_backend):
    requests = [
        pb2.EncodeRequest(request_id="r1", prompts=["a cat"]),
        pb2.EncodeRequest(request_id="bad", prompts=["x"] * 99),
        pb2.EncodeRequest(request_id="r2", prompts=["a dog", "a bird"]),
    ]
    with grpc.insecure_channel(server.target) as channel:
        msgs = list(pb2_grpc.TextEncoderStub(channel).EncodeStream(iter(requests)))
    by_id: dict[str, list] = {}
    order = []
    for m in msgs:
        by_id.setdefault(m.request_id, []).append(m)
        if not order or order[-1] != m.request_id:
            order.append(m.request_id)
    assert sorted(order) == ["bad", "r1", "r2"]  # each request's messages are contiguous
    bad = by_id["bad"]
    assert len(bad) == 1 and bad[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad[0].request_done
    for rid, prompts in (("r1", ["a cat"]), ("r2", ["a dog", "a bird"])):
        got = by_id[rid]
        assert got[-1].request_done and not any(m.HasField("error") for m in got)
        expected = tiny_backend.encode(prompts).embeddings
        for i in range(len(prompts)):
            data = b"".join(m.chunk.data for m in got if m.prompt_index == i)
            assert data == expected[i].contiguous().view(torch.int16).numpy().tobytes()


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


def test_unreachable_server_is_a_clear_error():
    with RemoteTextEncoder("127.0.0.1:1", timeout=5) as enc:
        with pytest.raises(EncoderUnavailable, match="cannot reach the encoder at 127.0.0.1:1"):
            enc.encode(["a cat"])


def test_expected_fingerprint_is_enforced(server, tiny_backend):
    with RemoteTextEncoder(server.target, expected_fingerprint=tiny_backend.fingerprint) as enc:
        assert enc.encode(["ok"]).shape[0] == 1
    with RemoteTextEncoder(server.target, expected_fingerprint="flux2-dev:0000000000000000") as enc:
        with pytest.raises(IntegrityError, match="different model"):
            enc.encode(["ok"])
