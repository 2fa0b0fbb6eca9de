"""Property-based fuzzing of what clients control: the request decoder, validation, the HTTP body parser.

Bounded in examples and time, so CI stays fast. The properties: input is
either accepted or refused with one of our own errors (never an exception a
client would see as INTERNAL or a 500), and a live server answers any bytes on
either transport with a client-error status and keeps serving.
"""

from __future__ import annotations

import json

import grpc
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import HTTPConfig, Limits, ServerConfig
from common.errors import Flux2RemoteError, http_status_of
from common.protocol import SERVICE_NAME, pb2
from encoder_server.http_endpoint import parse_prompts
from encoder_server.validation import UndecodableRequest, tolerant_deserializer, validate_request
from tests.helpers import ServerThread

LIMITS = Limits(max_prompts_per_request=4, max_prompt_chars=64, max_request_id_chars=16)
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)
# Any Python string, lone surrogates included: JSON can carry them (\ud800).
ANY_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=80)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(ANY_TEXT, children, max_size=4),
    max_leaves=20,
)


@FAST
@given(prompts=st.lists(ANY_TEXT, max_size=6), request_id=ANY_TEXT)
def test_validation_accepts_or_refuses_with_our_own_error(prompts, request_id):
    try:
        accepted = validate_request(prompts, LIMITS, request_id=request_id)
    except Flux2RemoteError as exc:
        assert http_status_of(exc) in (400, 413, 504)
        return
    # What passes is safe to hand to the tokenizer and the cache.
    assert 1 <= len(accepted) <= LIMITS.max_prompts_per_request
    for p in accepted:
        assert len(p) <= LIMITS.max_prompt_chars and "\x00" not in p
        p.encode("utf-8")  # no lone surrogate


@FAST
@given(data=st.binary(max_size=512))
def test_the_request_decoder_never_raises(data):
    decoded = tolerant_deserializer(pb2.EncodeRequest.FromString)(data)
    assert isinstance(decoded, (pb2.EncodeRequest, UndecodableRequest))


@FAST
@given(body=JSON_VALUES)
def test_the_http_body_parser_accepts_or_refuses_with_our_own_error(body):
    try:
        prompts = parse_prompts(body, LIMITS)
        validate_request(prompts, LIMITS)
    except Flux2RemoteError as exc:
        assert http_status_of(exc) in (400, 413)


@FAST
@given(prompt=JSON_VALUES)
def test_the_http_body_parser_on_prompt_fields(prompt):
    try:
        validate_request(parse_prompts({"prompt": prompt}, LIMITS), LIMITS)
    except Flux2RemoteError as exc:
        assert http_status_of(exc) in (400, 413)


# -- against a live server ----------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tiny_backend):
    with ServerThread(tiny_backend, ServerConfig(limits=LIMITS, http=HTTPConfig(port=0))) as s:
        yield s


LIVE = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
CLIENT_ERRORS_GRPC = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@LIVE
@given(data=st.binary(max_size=256))
def test_any_bytes_to_encode_get_a_client_status(fuzz_server, data):
    with grpc.insecure_channel(fuzz_server.target) as channel:
        encode = channel.unary_stream(f"/{SERVICE_NAME}/Encode", request_serializer=None, response_deserializer=None)
        try:
            for _ in encode(data, timeout=30):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
    assert code in CLIENT_ERRORS_GRPC


@LIVE
@given(body=st.one_of(st.binary(max_size=256), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_any_body_to_predict_gets_a_client_status_as_json(fuzz_server, body):
    reply = requests.post(f"http://127.0.0.1:{fuzz_server.running.http.port}/predict", data=body, timeout=30)
    assert reply.status_code in (200, 400, 413)
    if reply.status_code != 200:
        assert reply.json()["error"]
