"""A standing table of bad input, on gRPC and HTTP.

Each case sends one thing a careless or hostile client might send, checks the
status and the message a person would read, and then checks that the server
still serves a normal call. Every bad case is sent as alice; at the end alice's
daily quota must be untouched, because a refused request costs nothing.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
from dataclasses import dataclass

import grpc
import pytest
import requests

from common.config import AuthConfig, HTTPConfig, Limits, ServerConfig, UpsamplingConfig
from common.protocol import SERVICE_NAME, pb2, pb2_grpc
from tests.helpers import GatedUpsampler, ServerThread

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
LIMITS = Limits(max_prompts_per_request=4, max_prompt_chars=64, max_request_id_chars=16)
UPSAMPLING = UpsamplingConfig(max_prompts_per_request=2, max_image_bytes=20_000, max_request_image_bytes=30_000)
MODEL = ServerConfig().served_models()[0].name


@pytest.fixture(scope="module")
def policy_server(tiny_backend, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    keys.chmod(0o600)
    config = ServerConfig(
        limits=LIMITS,
        auth=AuthConfig(api_key_file=str(keys), quota_prompts_per_day=1000),
        http=HTTPConfig(port=0),
        upsampling=UPSAMPLING,
    )
    upsampler = GatedUpsampler(takes_images=True)
    upsampler.gate.release.set()
    with ServerThread(tiny_backend, config, model_id="tiny-test", upsamplers={MODEL: upsampler}) as s:
        yield s


def alice_used(server: ServerThread) -> int:
    return server.running.admission.limiter.used_today("alice")


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# -- gRPC --------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcCase:
    name: str
    metadata: tuple = bearer(ALICE)
    request: pb2.EncodeRequest | pb2.UpsampleRequest | bytes | None = None
    timeout: float = 30.0
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    message: str = ""

    def __str__(self):
        return self.name


def _req(**kwargs) -> pb2.EncodeRequest:
    kwargs.setdefault("prompts", ["a fox"])
    return pb2.EncodeRequest(**kwargs)


def _raw_prompt(data: bytes) -> bytes:
    """An EncodeRequest whose prompt field holds raw bytes (field 1, length-delimited)."""
    return b"\x0a" + bytes([len(data)]) + data


GRPC_CASES = [
    GrpcCase("no key", metadata=(), request=_req(), code=grpc.StatusCode.UNAUTHENTICATED, message="needs an API key"),
    GrpcCase(
        "unknown key",
        metadata=bearer("x" * 30),
        request=_req(),
        code=grpc.StatusCode.UNAUTHENTICATED,
        message="not recognised",
    ),
    GrpcCase(
        "no scheme",
        metadata=(("authorization", ALICE),),
        request=_req(),
        code=grpc.StatusCode.UNAUTHENTICATED,
        message="malformed",
    ),
    GrpcCase(
        "basic scheme",
        metadata=(("authorization", f"Basic {ALICE}"),),
        request=_req(),
        code=grpc.StatusCode.UNAUTHENTICATED,
        message="malformed",
    ),
    GrpcCase(
        "two keys, good then bad",
        metadata=bearer(ALICE) + bearer("y" * 30),
        request=_req(),
        code=grpc.StatusCode.UNAUTHENTICATED,
        message="exactly one",
    ),
    GrpcCase(
        "key with a space",
        metadata=(("authorization", "Bearer a b"),),
        request=_req(),
        code=grpc.StatusCode.UNAUTHENTICATED,
        message="malformed",
    ),
    GrpcCase("no prompts", request=pb2.EncodeRequest(), message="no prompts"),
    GrpcCase("too many prompts", request=_req(prompts=["p"] * 5), message="5 prompts in one request; the limit is 4"),
    GrpcCase("prompt too long", request=_req(prompts=["x" * 65]), message="65 characters; the limit is 64"),
    GrpcCase("NUL in a prompt", request=_req(prompts=["a\x00b"]), message="NUL"),
    GrpcCase("prompt not UTF-8", request=_raw_prompt(b"\xff\xfe"), message="valid UTF-8"),
    GrpcCase("request_id too long", request=_req(request_id="r" * 17), message="request_id has 17 characters"),
    GrpcCase("3 MiB request_id", request=_req(request_id="r" * (3 << 20)), message="the limit is 16"),
    GrpcCase("unknown dtype", request=_req(dtype=42), message="unknown dtype enum value 42"),
    GrpcCase("deadline too short", request=_req(), timeout=0.002, code=grpc.StatusCode.DEADLINE_EXCEEDED),
    GrpcCase(
        "cache_only miss",
        request=_req(prompts=["never sent before"], cache_only=True),
        code=grpc.StatusCode.NOT_FOUND,
        message="not cached",
    ),
    GrpcCase(
        "message over the receive limit",
        request=_raw_prompt(b"") + b"\x22\x80\x80\x80\x03" + b"r" * (6 << 20),
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    GrpcCase("garbage bytes", request=b"\xff\xff\xff\xff", message="not a valid protobuf"),
]


def _png(width: int = 32, height: int = 24) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(side: int) -> bytes:
    """A PNG that does not compress: about ``3 * side**2`` bytes."""
    import random

    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3)).save(buf, format="PNG")
    return buf.getvalue()


def _images(*entries: list[bytes]) -> list[pb2.UpsampleImages]:
    return [pb2.UpsampleImages(images=e) for e in entries]


# (name, prompts, images per prompt, temperature, what the message says, HTTP status): one table for both transports.
UPSAMPLE_BAD = [
    ("temperature 0", ["a"], None, 0.0, "temperature 0.0 is outside (0, 5.0]", 400),
    ("temperature above the cap", ["a"], None, 6.0, "temperature 6.0 is outside", 400),
    ("temperature NaN", ["a"], None, float("nan"), "temperature nan is outside", 400),
    ("too many prompts", ["a", "b", "c"], None, None, "3 prompts in one Upsample call; the limit is 2", 413),
    ("images for some prompts", ["a", "b"], [[_png()], []], None, "give every prompt at least one image", 400),
    ("too many images", ["a"], [[_png()] * 5], None, "prompt 0 has 5 images; the limit is 4", 413),
    ("empty image", ["a"], [[b""]], None, "image 0 of prompt 0 is empty", 400),
    ("image over its limit", ["a"], [[_noise_png(90)]], None, "bytes; the limit is 20000", 413),
    ("images over the request's", ["a", "b"], [[_noise_png(75)], [_noise_png(76)]], None, "bytes together", 413),
    ("not an image", ["a"], [[b"GIF89a not a png"]], None, "cannot be decoded as PNG or JPEG", 400),
    ("600000x1 image", ["a"], [[_png(600_000, 1)]], None, "its longer side may be at most 32 times", 400),
    ("1x40000 image", ["a"], [[_png(1, 40_000)]], None, "its longer side may be at most 32 times", 400),
]

GRPC_CASES += [
    GrpcCase(
        f"Upsample: {name}",
        request=pb2.UpsampleRequest(
            prompts=prompts, images=_images(*(images or [])), **({} if t is None else {"temperature": t})
        ),
        message=says,
    )
    for name, prompts, images, t, says, _ in UPSAMPLE_BAD
] + [
    GrpcCase(
        "Upsample: deadline too short",
        request=pb2.UpsampleRequest(prompts=["a"]),
        timeout=0.5,
        code=grpc.StatusCode.DEADLINE_EXCEEDED,
        message="cannot see a generation through",
    ),
    GrpcCase(
        "Upsample: over the message limit",
        request=pb2.UpsampleRequest(prompts=["a"], images=_images([b"x" * (5 << 20)])),
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
]


def call_upsample(target: str, case: GrpcCase) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        upsample = channel.unary_unary(
            f"/{SERVICE_NAME}/Upsample",
            request_serializer=None if isinstance(case.request, bytes) else pb2.UpsampleRequest.SerializeToString,
            response_deserializer=pb2.UpsampleResponse.FromString,
        )
        try:
            upsample(case.request, metadata=case.metadata, timeout=case.timeout)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def call_encode(target: str, case: GrpcCase) -> tuple[grpc.StatusCode, str]:
    if isinstance(case.request, pb2.UpsampleRequest) or case.name.startswith("Upsample"):
        return call_upsample(target, case)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        raw = isinstance(case.request, bytes)
        encode = channel.unary_stream(
            f"/{SERVICE_NAME}/Encode",
            request_serializer=None if raw else pb2.EncodeRequest.SerializeToString,
            response_deserializer=pb2.EncodeResponse.FromString,
        )
        try:
            for _ in encode(case.request, metadata=case.metadata, timeout=case.timeout):
                pass
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def grpc_still_serves(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        messages = list(stub.Encode(pb2.EncodeRequest(prompts=["a normal prompt"]), metadata=bearer(BOB), timeout=30))
        upsampled = stub.Upsample(
            pb2.UpsampleRequest(prompts=["ok"], images=_images([_png()])), metadata=bearer(BOB), timeout=30
        )
    assert messages[-1].request_done
    assert upsampled.results[0].text == "OK"


@pytest.mark.parametrize("case", GRPC_CASES, ids=str)
def test_grpc_bad_input_gets_its_status_and_the_server_goes_on(policy_server, case):
    used = alice_used(policy_server)
    code, details = call_encode(policy_server.target, case)
    assert code == case.code, details
    assert case.message in details
    assert alice_used(policy_server) == used, "a refused request must cost no quota"
    grpc_still_serves(policy_server.target)


def test_a_refused_message_in_a_stream_is_answered_and_the_stream_goes_on(policy_server):
    used = alice_used(policy_server)
    requests_ = [
        pb2.EncodeRequest(request_id="ok-1", prompts=["fine"]),
        pb2.EncodeRequest(request_id="nul", prompts=["a\x00b"]),
        pb2.EncodeRequest(request_id="r" * 1000, prompts=["long id"]),
        pb2.EncodeRequest(request_id="many", prompts=["p"] * 5),
        pb2.EncodeRequest(request_id="ok-2", prompts=["fine too"]),
    ]
    with grpc.insecure_channel(policy_server.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        answers = {}
        for m in stub.EncodeStream(iter(requests_), metadata=bearer(ALICE), timeout=30):
            if m.request_done:
                answers[m.request_id] = m.error.message if m.HasField("error") else "ok"
    assert answers["ok-1"] == answers["ok-2"] == "ok"
    assert "NUL" in answers["nul"]
    assert "limit is 4" in answers["many"]
    assert "request_id has 1000 characters" in answers[""]  # an over-long id is not echoed back
    assert alice_used(policy_server) == used + 2  # the two served prompts, nothing for the refused ones


# -- HTTP --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    name: str
    body: bytes | None = b'{"prompt": "a fox"}'
    headers: tuple = (("Authorization", f"Bearer {ALICE}"),)
    method: str = "POST"
    query: str = ""
    status: int = 400
    message: str = ""
    path: str = "/predict"

    def __str__(self):
        return self.name


def _upsample_body(prompts, images, temperature) -> bytes:
    body: dict = {"prompt": prompts}
    if images is not None:
        body["images"] = [[base64.b64encode(b).decode() for b in entry] for entry in images]
    if temperature is not None:
        body["temperature"] = temperature
    return json.dumps(body).encode()  # NaN goes out as the NaN token, which Python's json reads back


HTTP_CASES = [
    HttpCase("no key", headers=(), status=401, message="needs an API key"),
    HttpCase("unknown key", headers=(("Authorization", "Bearer " + "z" * 30),), status=401, message="not recognised"),
    HttpCase("no scheme", headers=(("Authorization", ALICE),), status=401, message="malformed"),
    HttpCase(
        "two keys, good then bad",
        headers=(("Authorization", f"Bearer {ALICE}"), ("Authorization", "Bearer " + "z" * 30)),
        status=401,
        message="exactly one",
    ),
    HttpCase("key in the query string", headers=(), query=f"api_key={ALICE}", status=400, message="never in the URL"),
    HttpCase("any query string", query="x=1", status=400, message="no query parameters"),
    HttpCase("not JSON", body=b"prompt=a fox", message="not valid JSON"),
    HttpCase("empty body", body=b"", message="not valid JSON"),
    HttpCase("not UTF-8", body=b'{"prompt": "\xff"}', message="not valid JSON"),
    HttpCase("JSON array", body=b'["a fox"]', message="JSON object"),
    HttpCase("missing prompt", body=b'{"text": "a fox"}', message="unknown field"),
    HttpCase("empty object", body=b"{}", message='missing "prompt"'),
    HttpCase("extra field", body=b'{"prompt": "a", "seed": 1}', message="unknown field"),
    HttpCase("prompt is a number", body=b'{"prompt": 3}', message="string or a list of strings"),
    HttpCase("list with a number", body=b'{"prompt": ["a", 3]}', message="string or a list of strings"),
    HttpCase("prompt is null", body=b'{"prompt": null}', message="string or a list of strings"),
    HttpCase("empty list", body=b'{"prompt": []}', message="no prompts"),
    HttpCase("too many prompts", body=json.dumps({"prompt": ["p"] * 5}).encode(), status=413, message="limit is 4"),
    HttpCase(
        "prompt too long",
        body=json.dumps({"prompt": "x" * 65}).encode(),
        status=413,
        message="65 characters; the limit is 64",
    ),
    HttpCase("NUL", body=b'{"prompt": "a\\u0000b"}', message="NUL"),
    HttpCase("lone surrogate", body=b'{"prompt": "a\\ud800b"}', message="lone surrogate"),
    HttpCase("deeply nested", body=b"[" * 100_000 + b"]" * 100_000, status=413, message="limit"),
    HttpCase(
        "nested within the size limit", body=b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", message="not valid JSON"
    ),
    HttpCase("body over the size limit", body=b'{"prompt": "' + b"x" * (2 << 20) + b'"}', status=413, message="limit"),
    HttpCase("GET /predict", method="GET", body=None, status=405, message="send POST /predict"),
    HttpCase("PUT /predict", method="PUT", status=405, message="send POST /predict"),
]
HTTP_CASES += [
    HttpCase(f"/upsample: {name}", body=_upsample_body(p, i, t), status=status, message=says, path="/upsample")
    for name, p, i, t, says, status in UPSAMPLE_BAD
] + [
    HttpCase(
        "/upsample: temperature a string",
        body=b'{"prompt": "a", "temperature": "hot"}',
        path="/upsample",
        message='"temperature" must be a number',
    ),
    HttpCase(
        "/upsample: images not base64",
        body=b'{"prompt": "a", "images": [["%%%"]]}',
        path="/upsample",
        message="not base64",
    ),
    HttpCase(
        "/upsample: unknown field", body=b'{"prompt": "a", "steps": 4}', path="/upsample", message="unknown field"
    ),
    HttpCase(
        "/upsample: body over the size limit",
        body=b'{"prompt": "' + b"x" * (8 << 20) + b'"}',
        status=413,
        path="/upsample",
        message="limit",
    ),
]


def send_http(server: ServerThread, case: HttpCase) -> requests.Response:
    url = f"http://127.0.0.1:{server.running.http.port}{case.path}" + (f"?{case.query}" if case.query else "")
    # requests merges repeated headers; a raw list of tuples through http.client keeps both.
    if len([k for k, _ in case.headers if k.lower() == "authorization"]) > 1:
        return _send_raw(server.running.http.port, case)
    return requests.request(case.method, url, data=case.body, headers=dict(case.headers), timeout=30)


class _RawResponse:
    def __init__(self, status: int, body: bytes):
        self.status_code = status
        self._body = body

    def json(self):
        return json.loads(self._body)


def _send_raw(port: int, case: HttpCase) -> _RawResponse:
    head = [
        f"{case.method} {case.path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: close",
        "Content-Type: application/json",
        f"Content-Length: {len(case.body)}",
    ]
    head += [f"{k}: {v}" for k, v in case.headers]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + case.body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return _RawResponse(int(status_line.split()[1]), body)


def http_still_serves(server: ServerThread) -> None:
    url = f"http://127.0.0.1:{server.running.http.port}/predict"
    reply = requests.post(
        url, json={"prompt": "a normal prompt"}, headers={"Authorization": f"Bearer {BOB}"}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    body = json.loads(_upsample_body(["ok"], [[_png()]], None))
    upsampled = requests.post(
        url[: -len("/predict")] + "/upsample", json=body, headers={"Authorization": f"Bearer {BOB}"}
    )
    assert upsampled.status_code == 200 and upsampled.json()["upsampled"] == ["OK"], upsampled.text


@pytest.mark.parametrize("case", HTTP_CASES, ids=str)
def test_http_bad_input_gets_its_status_and_a_json_error_and_the_server_goes_on(policy_server, case, caplog):
    used = alice_used(policy_server)
    with caplog.at_level(logging.INFO):
        reply = send_http(policy_server, case)
    assert alice_used(policy_server) == used, "a refused request must cost no quota"
    assert reply.status_code == case.status
    error = reply.json()
    assert case.message in error["error"]
    assert error["code"]
    assert ALICE not in caplog.text, "a key must never reach the log"
    http_still_serves(policy_server)


def test_served_requests_are_charged_on_both_transports(policy_server):
    """The other side of 'refused requests cost nothing': the quota checks above can fail."""
    limiter = policy_server.running.admission.limiter
    before = limiter.used_today("bob")
    grpc_still_serves(policy_server.target)
    http_still_serves(policy_server)
    assert limiter.used_today("bob") == before + 4  # a prompt encoded and one upsampled, on each transport


def test_every_grpc_method_is_in_the_policy_registry():
    """A method added to the proto must be added to the registry too (the interceptor refuses it otherwise)."""
    from encoder_server.admission import GRPC_METHODS

    service = pb2.DESCRIPTOR.services_by_name["TextEncoder"]
    assert {f"/{SERVICE_NAME}/{m.name}" for m in service.methods} == set(GRPC_METHODS)


def test_table_has_at_least_forty_cases():
    assert len(GRPC_CASES) + len(HTTP_CASES) >= 40


@pytest.mark.parametrize(
    "request_", [pb2.UpsampleRequest(prompts=["a"], temperature=0.0), pb2.UpsampleRequest(prompts=["a", "b", "c"])]
)
def test_upsample_checks_are_the_policy_s_validation_step(request_):
    """Step 4 refuses them, before a slot or quota is taken, whatever serves Upsample afterwards."""
    import asyncio

    from common.errors import InvalidRequest
    from encoder_server.admission import UPSAMPLE, Admission
    from encoder_server.auth import Authenticator
    from encoder_server.metrics import EncoderMetrics
    from encoder_server.usage import UsageLimiter

    limiter = UsageLimiter(prompts_per_day=10)
    admission = Admission(Authenticator(None), limiter, LIMITS, EncoderMetrics(), upsampling=UPSAMPLING)

    async def admit():
        return await admission.admit_request(UPSAMPLE, "alice", list(request_.prompts), request=request_)

    with pytest.raises(InvalidRequest):
        asyncio.run(admit())
    assert limiter.used_today("alice") == 0 and admission._slots == 0
