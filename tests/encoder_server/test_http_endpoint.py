"""The Hugging Face-compatible ``POST /predict`` endpoint.

Bodies that came over the network are checked WITHOUT unpickling them: the
zip archive is opened with ``zipfile``, the pickle is only scanned with
``pickletools.genops``, and the raw storage bytes are compared with what
gRPC returns for the same prompts.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import zipfile

import pytest
import requests
import torch

from common.config import AuthConfig, HTTPConfig, Limits, ServerConfig
from common.errors import EncoderOverloaded
from dit_client.remote import RemoteTextEncoder
from encoder_server.http_endpoint import embeddings_to_torch_save, max_body_bytes
from encoder_server.identity import ANONYMOUS, current_user
from tests.helpers import ServerThread

KEY = "http-test-key-0123456789abcdef"

# What torch.load(weights_only=True) needs for a plain tensor, and nothing else.
ALLOWED_GLOBALS = {"torch._utils _rebuild_tensor_v2", "torch BFloat16Storage", "collections OrderedDict"}
# Pickle opcodes that would call or build arbitrary objects beyond the globals above.
FORBIDDEN_OPS = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4"}


def inspect_torch_save(body: bytes) -> tuple[tuple[int, ...], bytes]:
    """(shape, raw storage bytes) of a torch.save'd bf16 tensor, read without unpickling anything."""
    archive = zipfile.ZipFile(io.BytesIO(body))
    names = archive.namelist()
    root = names[0].split("/")[0]
    assert archive.read(f"{root}/byteorder") == b"little"
    data_files = [n for n in names if n.startswith(f"{root}/data/")]
    assert data_files == [f"{root}/data/0"], "exactly one storage"

    ops = list(pickletools.genops(archive.read(f"{root}/data.pkl")))
    names_used = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert names_used == ALLOWED_GLOBALS
    assert not {op.name for op, _, _ in ops} & FORBIDDEN_OPS
    # _rebuild_tensor_v2(storage, offset, size, stride, ...): after the
    # persistent storage id come the offset, then the size tuple.
    after = [(op.name, arg) for op, arg, _ in ops[[op.name for op, _, _ in ops].index("BINPERSID") + 1 :]]
    ints = []
    for name, arg in after:
        if isinstance(arg, int) and name.startswith(("BININT", "INT", "LONG")):
            ints.append(arg)
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
            break
    offset, shape = ints[0], tuple(ints[1:])
    assert offset == 0
    return shape, archive.read(f"{root}/data/0")


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.int16).numpy().tobytes()


@pytest.fixture()
def http_server(tiny_backend):
    with ServerThread(tiny_backend, ServerConfig(http=HTTPConfig(port=0)), model_id="tiny-test") as s:
        s.url = f"http://127.0.0.1:{s.running.http.port}"
        yield s


@pytest.fixture()
def keyed_http_server(tiny_backend, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# test\nalice:{KEY}\n")
    os.chmod(keys, 0o600)
    config = ServerConfig(http=HTTPConfig(port=0), auth=AuthConfig(api_key_file=str(keys), rate_limit_rpm=30))
    with ServerThread(tiny_backend, config, model_id="tiny-test") as s:
        s.url = f"http://127.0.0.1:{s.running.http.port}"
        yield s


def post(server, body, *, key: str | None = "none", raw: bytes | None = None, **headers) -> requests.Response:
    """POST like diffusers' Flux2RemoteTextEncoderStep does (it sends 'Bearer None' without a hub token)."""
    h = {"Content-Type": "application/json", **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(f"{server.url}/predict", data=data, headers=h, timeout=60)


def spy_on_users(server) -> list[tuple[str, str]]:
    seen = []
    real = server.running.engine.encode

    async def spy(prompts, **kwargs):
        seen.append((kwargs.get("user"), current_user.get()))
        return await real(prompts, **kwargs)

    server.running.engine.encode = spy
    return seen


# -- the body -------------------------------------------------------------


def test_body_is_the_same_embedding_as_grpc_in_the_hosted_format(http_server):
    prompts = ["a red fox in the snow", "", 'a poster that says "FLUX.2"']
    with RemoteTextEncoder(http_server.target) as enc:
        expected = enc.encode(prompts)
        info = enc.info()
    assert expected.dtype == torch.bfloat16

    reply = post(http_server, {"prompt": prompts})
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers["X-Flux2-Fingerprint"] == info.fingerprint
    shape, data = inspect_torch_save(reply.content)
    assert shape == (3, 512, info.embedding_dim)
    assert data == raw_bytes(expected)

    # A single string gives a batch of one, like the hosted endpoint.
    reply = post(http_server, {"prompt": prompts[0]})
    shape, data = inspect_torch_save(reply.content)
    assert shape == (1, 512, info.embedding_dim)
    assert data == raw_bytes(expected[:1])


def test_serializer_output_loads_with_weights_only_true():
    # These bytes never left this process: loading them shows that what the
    # endpoint writes is what the published clients' torch.load accepts.
    t = torch.randn(2, 512, 48).to(torch.float32)
    body = embeddings_to_torch_save([t[0], t[1]])
    loaded = torch.load(io.BytesIO(body), weights_only=True)
    assert loaded.dtype == torch.bfloat16 and loaded.shape == (2, 512, 48)
    assert torch.equal(loaded, t.to(torch.bfloat16))
    # Views of a larger tensor do not drag the whole storage along.
    big = torch.randn(8, 512, 48)
    shape, data = inspect_torch_save(embeddings_to_torch_save([big[3]]))
    assert shape == (1, 512, 48) and len(data) == 512 * 48 * 2


# -- users ----------------------------------------------------------------


def test_keys_are_required_when_configured(keyed_http_server):
    seen = spy_on_users(keyed_http_server)
    for key, message in [(None, "needs an API key"), ("wrong-key-0123456789abcdef", "not recognised")]:
        reply = post(keyed_http_server, {"prompt": "x"}, key=key)
        assert reply.status_code == 401
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert message in reply.json()["error"] and reply.json()["code"] == "UNAUTHENTICATED"
    reply = post(keyed_http_server, {"prompt": "x"}, key=None, Authorization=KEY)  # no scheme
    assert reply.status_code == 401 and "malformed" in reply.json()["error"]
    assert seen == []  # nothing reached the engine
    reply = post(keyed_http_server, {"prompt": "x"}, key=KEY)
    assert reply.status_code == 200
    assert seen == [("alice", "alice")]


def test_requests_are_counted_by_status_and_user_beside_grpc(keyed_http_server):
    metrics = keyed_http_server.running.engine.metrics

    def count(status, user):
        return metrics.sample(
            "flux2_encoder_requests_total", {"method": "HTTP /predict", "status": status, "user": user}
        )

    assert post(keyed_http_server, {"prompt": "x"}, key=KEY).status_code == 200
    assert post(keyed_http_server, {"prompt": 7}, key=KEY).status_code == 400
    assert post(keyed_http_server, {"prompt": "x"}, key="wrong-key-0123456789abcdef").status_code == 401
    assert count("OK", "alice") == 1
    assert count("INVALID_ARGUMENT", "alice") == 1
    assert count("UNAUTHENTICATED", ANONYMOUS) == 1
    assert b'method="HTTP /predict"' in metrics.exposition()


def test_without_keys_any_bearer_is_anonymous(http_server):
    seen = spy_on_users(http_server)
    assert post(http_server, {"prompt": "x"}, key="None").status_code == 200
    assert post(http_server, {"prompt": "x"}, key=None).status_code == 200
    assert seen == [(ANONYMOUS, ANONYMOUS)] * 2


def test_rate_limit_is_shared_with_grpc_and_answers_429(tiny_backend, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{KEY}\n")
    os.chmod(keys, 0o600)
    config = ServerConfig(http=HTTPConfig(port=0), auth=AuthConfig(api_key_file=str(keys), rate_limit_rpm=2))
    with ServerThread(tiny_backend, config) as s:
        s.url = f"http://127.0.0.1:{s.running.http.port}"
        with RemoteTextEncoder(s.target, api_key=KEY) as enc:
            enc.encode("grpc call")
        assert post(s, {"prompt": "http call"}, key=KEY).status_code == 200
        reply = post(s, {"prompt": "one too many"}, key=KEY)
        assert reply.status_code == 429
        assert reply.json()["code"] == "RESOURCE_EXHAUSTED" and "2 requests per minute" in reply.json()["error"]
        assert 1 <= int(reply.headers["Retry-After"]) <= 30
        with RemoteTextEncoder(s.target, api_key=KEY) as enc, pytest.raises(EncoderOverloaded):
            enc.encode("and over gRPC too")


def test_overloaded_engine_answers_429_with_retry_after(http_server):
    async def overloaded(prompts, **kwargs):
        raise EncoderOverloaded("queue full (1024 prompts waiting); retry later", retry_after_s=2.2)

    http_server.running.engine.encode = overloaded
    reply = post(http_server, {"prompt": "x"})
    assert reply.status_code == 429 and "queue full" in reply.json()["error"]
    assert reply.headers["Retry-After"] == "3"  # whole seconds, rounded up


# -- bad input ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'["a fox"]', "must be a JSON object"),
        (b"{}", 'missing "prompt"'),
        (b'{"prompt": 3}', "string or a list of strings"),
        (b'{"prompt": ["ok", 3]}', "string or a list of strings"),
        (b'{"prompt": null}', "string or a list of strings"),
        (b'{"prompt": []}', "no prompts"),
        (b'{"prompt": "x", "max_sequence_length": 256}', "unknown field(s) 'max_sequence_length'"),
        (b'{"prompt": "nul \\u0000 inside"}', "NUL"),
    ],
)
def test_bad_bodies_are_400_with_a_json_error_and_the_server_keeps_serving(http_server, raw, message):
    reply = post(http_server, None, raw=raw)
    assert reply.status_code == 400, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    assert message in reply.json()["error"]
    assert reply.json()["code"] == "INVALID_ARGUMENT"
    assert post(http_server, {"prompt": "still serving"}).status_code == 200


def test_too_large_is_413(http_server):
    limits = Limits()
    reply = post(http_server, {"prompt": ["p"] * (limits.max_prompts_per_request + 1)})
    assert reply.status_code == 413 and "prompts in one request" in reply.json()["error"]
    reply = post(http_server, {"prompt": "x" * (limits.max_prompt_chars + 1)})
    assert reply.status_code == 413 and "characters" in reply.json()["error"]
    reply = post(http_server, None, raw=b'{"prompt": "' + b"x" * max_body_bytes(limits) + b'"}')
    assert reply.status_code == 413 and "bytes" in reply.json()["error"]
    assert post(http_server, {"prompt": "still serving"}).status_code == 200


def test_only_post_predict_and_get_health(http_server):
    assert requests.get(f"{http_server.url}/predict", timeout=10).status_code == 405
    assert requests.post(f"{http_server.url}/other", json={"prompt": "x"}, timeout=10).status_code == 404
    health = requests.get(f"{http_server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "SERVING"}


def test_shutting_down_answers_503(http_server):
    http_server.running.admission.close()
    reply = post(http_server, {"prompt": "x"})
    assert reply.status_code == 503 and "shutting down" in reply.json()["error"]
    assert requests.get(f"{http_server.url}/health", timeout=10).status_code == 503


def test_http_is_off_and_loopback_by_default_and_set_by_flags():
    from encoder_server.cli import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["serve"])).http == HTTPConfig(host="127.0.0.1", port=None)
    args = build_parser().parse_args(["serve", "--http-port", "8080", "--http-host", "0.0.0.0"])
    assert config_from_args(args).http == HTTPConfig(host="0.0.0.0", port=8080)
