"""Several models on one encoder server: FLUX.2 [dev] and [klein] side by side.

Each model's answers equal its own backend's (which tests/encoder_server/test_text_encoder.py
and tests/encoder_server/test_klein_encoder.py prove bit-exact with diffusers), batches
never mix models, and a request that names no model, or one the server does
not have, gets a clear INVALID_ARGUMENT.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
import torch

from common.config import HTTPConfig, ModelConfig, ServerConfig
from common.demo import TinyKleinSpec, build_tiny_klein
from common.model_source import resolve_model
from common.protocol import pb2, pb2_grpc
from encoder_server.server import LoadedModel
from encoder_server.text_encoder import TruncatedTextEncoder
from tests.helpers import ProxyBackend, ServerThread


@pytest.fixture(scope="module")
def klein_backend(tmp_path_factory):
    folder = build_tiny_klein(tmp_path_factory.mktemp("tiny-klein"), TinyKleinSpec(with_dit=False))
    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    return TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


@pytest.fixture()
def two_models(tiny_backend, klein_backend):
    dev, klein = ProxyBackend(tiny_backend), ProxyBackend(klein_backend)  # each remembers its prompts
    config = ServerConfig(
        models=(ModelConfig("dev", "tiny-dev"), ModelConfig("klein", "tiny-klein")), http=HTTPConfig(port=0)
    )
    models = [LoadedModel("dev", dev, "tiny-dev"), LoadedModel("klein", klein, "tiny-klein")]
    with ServerThread(None, config, models=models) as s:
        yield s, dev, klein


def grpc_encode(target: str, prompts: list[str], model: str) -> list[pb2.EncodeResponse]:
    with grpc.insecure_channel(target) as channel:
        return list(
            pb2_grpc.TextEncoderStub(channel).Encode(pb2.EncodeRequest(prompts=prompts, model=model), timeout=60)
        )


def test_get_info_lists_every_model(two_models, tiny_backend, klein_backend):
    s, _, _ = two_models
    with grpc.insecure_channel(s.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        info = stub.GetInfo(pb2.GetInfoRequest(), timeout=10)
        klein = stub.GetInfo(pb2.GetInfoRequest(model="klein"), timeout=10)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.GetInfo(pb2.GetInfoRequest(model="schnell"), timeout=10)
    by_name = {m.name: m for m in info.models}
    assert set(by_name) == {"dev", "klein"}
    assert by_name["dev"].fingerprint == tiny_backend.fingerprint and by_name["dev"].family == "flux2-dev"
    assert by_name["klein"].fingerprint == klein_backend.fingerprint and by_name["klein"].family == "flux2-klein"
    assert list(by_name["dev"].hidden_states_layers) == [10, 20, 30]
    assert list(by_name["klein"].hidden_states_layers) == [9, 18, 27] and by_name["klein"].computed_layers == 27
    assert by_name["klein"].embedding_dim == 3 * klein_backend.hidden_size
    # The top-level fields describe the first model, or the one asked for.
    assert info.model_name == "dev" and info.fingerprint == tiny_backend.fingerprint
    assert (
        klein.model_name == "klein" and klein.family == "flux2-klein" and klein.fingerprint == klein_backend.fingerprint
    )
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dev, klein" in unknown.value.details()


def embeddings_of(messages: list[pb2.EncodeResponse], dim: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Reassemble the raw frames of one Encode answer (one prompt per request here)."""
    data = b"".join(m.chunk.data for m in messages if m.HasField("chunk"))
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(-1, 512, dim)


@pytest.mark.parametrize("name", ["dev", "klein"])
def test_each_model_answers_with_its_own_embedding(two_models, tiny_backend, klein_backend, name):
    s, _, _ = two_models
    backend = {"dev": tiny_backend, "klein": klein_backend}[name]
    messages = grpc_encode(s.target, ["a red fox in fresh snow"], name)
    got = embeddings_of(messages, 3 * backend.hidden_size)
    assert torch.equal(got, backend.encode(["a red fox in fresh snow"]).embeddings)
    header = next(m for m in messages if m.HasField("header"))
    assert header.header.metadata.model_fingerprint == backend.fingerprint


@pytest.mark.parametrize(
    "model, message",
    [
        ("", "serves 2 models; name one in the request: dev, klein"),
        ("schnell", "does not serve a model named 'schnell'; it serves: dev, klein"),
    ],
)
def test_a_request_must_name_a_served_model(two_models, model, message):
    s, _, _ = two_models
    with pytest.raises(grpc.RpcError) as info:
        grpc_encode(s.target, ["x"], model)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


@pytest.mark.slow  # many clients against both models
def test_concurrent_load_on_both_models_is_exact_and_batches_never_mix(two_models, tiny_backend, klein_backend):
    s, dev, klein = two_models
    prompts = [f"prompt {i}" for i in range(12)]
    expected = {
        "dev": {p: tiny_backend.encode([p]).embeddings[0] for p in prompts},
        "klein": {p: klein_backend.encode([p]).embeddings[0] for p in prompts},
    }
    dims = {"dev": 3 * tiny_backend.hidden_size, "klein": 3 * klein_backend.hidden_size}
    jobs = [(name, p) for p in prompts for name in ("dev", "klein")]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: (job, grpc_encode(s.target, [job[1]], job[0])), jobs))
    for (name, prompt), messages in results:
        assert torch.equal(embeddings_of(messages, dims[name])[0], expected[name][prompt]), (name, prompt)
    assert sorted(dev.prompts) == sorted(prompts) and sorted(klein.prompts) == sorted(prompts)


def test_http_predict_is_devs_and_every_model_has_its_own_path(two_models):
    s, _, _ = two_models
    base = f"http://127.0.0.1:{s.running.http.port}"
    dev = requests.post(f"{base}/predict", json={"prompt": "a fox"}, timeout=30)
    klein = requests.post(f"{base}/models/klein/predict", json={"prompt": "a fox"}, timeout=30)
    missing = requests.post(f"{base}/models/schnell/predict", json={"prompt": "a fox"}, timeout=30)
    assert dev.status_code == 200 and klein.status_code == 200
    assert dev.headers["X-Flux2-Fingerprint"] != klein.headers["X-Flux2-Fingerprint"]
    assert klein.headers["X-Flux2-Fingerprint"].startswith("flux2-klein:")
    assert missing.status_code == 404 and "it serves: dev, klein" in missing.json()["error"]


def test_predict_on_a_klein_only_server_says_where_to_go(klein_backend):
    config = ServerConfig(models=(ModelConfig("klein", "tiny-klein"),), http=HTTPConfig(port=0))
    with ServerThread(None, config, models=[LoadedModel("klein", klein_backend, "tiny-klein")]) as s:
        reply = requests.post(f"http://127.0.0.1:{s.running.http.port}/predict", json={"prompt": "x"}, timeout=30)
        assert reply.status_code == 404
        assert "/models/klein/predict" in reply.json()["error"]
        # One model: a request without a name uses it.
        assert grpc_encode(s.target, ["x"], "")[-1].request_done


def test_a_second_model_with_the_same_name_refuses_to_start(tmp_path):
    cmd = [sys.executable, "-m", "encoder_server.cli", "serve", "--port", "0", "--model", "demo", "--model", "demo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "two --model flags use the name 'demo'" in proc.stderr


def test_per_model_dtype_and_names_from_flags():
    from encoder_server.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "dev=black-forest-labs/FLUX.2-dev",
            "--model",
            "klein=black-forest-labs/FLUX.2-klein-4B",
            "--dtype",
            "float16",
            "--dtype",
            "klein=float32",
            "--quantization",
            "dev=nf4",
        ]
    )
    config = config_from_args(args)
    assert config.dtype == "float16"
    assert config.served_models() == (
        ModelConfig("dev", "black-forest-labs/FLUX.2-dev", quantization="nf4"),
        ModelConfig("klein", "black-forest-labs/FLUX.2-klein-4B", dtype="float32"),
    )
    with pytest.raises(Exception, match="no model is named 'schnell'"):
        config_from_args(build_parser().parse_args(["serve", "--model", "demo", "--dtype", "schnell=float32"]))
