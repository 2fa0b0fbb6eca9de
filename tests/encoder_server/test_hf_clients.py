"""The four outside clients of the hosted endpoint, against ``POST /predict`` on loopback.

- diffusers' own ``Flux2RemoteTextEncoderStep`` runs from the installed package,
  with only its ``REMOTE_URL`` class attribute pointed here.
- The DreamBooth script, the FLUX.2-dev model-card snippet and the ComfyUI
  node cannot be imported: each is imitated by a small function written here
  that sends what its published source sends (URL source, headers, body) and
  reads the answer the same way, error path included. docs/hf-compatible-endpoint.md
  says what each one needs set; these tests pin those claims.

No hub token is ever present: ``get_token()`` is made to find none, so what a
client sends without one is what is tested.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import types

import pytest
import requests
import torch

from common.config import AuthConfig, HTTPConfig, ServerConfig
from dit_client.remote import RemoteTextEncoder
from tests.helpers import ServerThread

KEY = "hf-clients-key-0123456789abcdef"
PROMPTS = ["a red fox in fresh snow", "a lighthouse at dusk"]


@pytest.fixture(autouse=True)
def no_hub_token(monkeypatch, tmp_path):
    """``huggingface_hub.get_token()`` finds nothing: no variables, no saved token."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN", "HF_FLUX2_REMOTE_ENCODER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    from huggingface_hub import get_token

    assert get_token() is None


def _start(backend, config: ServerConfig):
    server = ServerThread(backend, config, model_id="tiny-test").__enter__()
    server.url = f"http://127.0.0.1:{server.running.http.port}/predict"
    return server


@pytest.fixture()
def open_server(tiny_backend):
    """A server without --api-key-file: any Authorization header, or none, is the anonymous user."""
    server = _start(tiny_backend, ServerConfig(http=HTTPConfig(port=0)))
    yield server
    server.stop(0)


@pytest.fixture()
def keyed_server(tiny_backend, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{KEY}\n")
    os.chmod(keys, 0o600)
    server = _start(tiny_backend, ServerConfig(http=HTTPConfig(port=0), auth=AuthConfig(api_key_file=str(keys))))
    yield server
    server.stop(0)


def grpc_embeddings(server, prompts, api_key=None) -> torch.Tensor:
    with RemoteTextEncoder(server.target, api_key=api_key) as enc:
        return enc.encode(prompts, dtype=torch.bfloat16)


# -- 1. diffusers' Flux2RemoteTextEncoderStep, from the installed package --------------


def _run_step(url: str, prompt, monkeypatch) -> torch.Tensor:
    from diffusers.modular_pipelines import PipelineState
    from diffusers.modular_pipelines.flux2 import Flux2RemoteTextEncoderStep

    monkeypatch.setattr(Flux2RemoteTextEncoderStep, "REMOTE_URL", url)  # the documented one-line change
    state = PipelineState()
    state.set("prompt", prompt)
    # The step reads only the execution device from the pipeline's components.
    components = types.SimpleNamespace(_execution_device=torch.device("cpu"))
    _, state = Flux2RemoteTextEncoderStep()(components, state)
    return state.get("prompt_embeds")


def test_modular_step_against_a_keyless_server(open_server, monkeypatch):
    embeds = _run_step(open_server.url, PROMPTS, monkeypatch)  # it sends "Bearer None"
    assert embeds.dtype == torch.bfloat16  # so the modular pipeline must run in bf16 (docs)
    assert torch.equal(embeds, grpc_embeddings(open_server, PROMPTS))


def test_modular_step_with_a_key_in_hf_token(keyed_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", KEY)
    assert torch.equal(
        _run_step(keyed_server.url, "a red fox", monkeypatch), grpc_embeddings(keyed_server, ["a red fox"], api_key=KEY)
    )


def test_modular_step_without_a_key_raises_the_servers_401(keyed_server, monkeypatch):
    with pytest.raises(requests.HTTPError) as err:
        _run_step(keyed_server.url, "a red fox", monkeypatch)
    assert err.value.response.status_code == 401
    assert err.value.response.json()["code"] == "UNAUTHENTICATED"


# -- 2. the DreamBooth script's compute_remote_text_embeddings ------------------------


def dreambooth_encode(url: str, prompts: str | list[str], hub_token: str | None = None) -> torch.Tensor:
    """What train_dreambooth_lora_flux2.py --remote_text_encoder does (diffusers examples/dreambooth).

    The token is --hub_token, else huggingface_hub.get_token(); with neither the
    script stops before sending anything. Each prompt is its own request, in
    sequence, body {"prompt": "<one prompt>"}; any status but 200 fails an
    assert, which the script wraps in RuntimeError; the body goes to torch.load
    (torch's default, weights_only=True since torch 2.6).
    """
    from huggingface_hub import get_token

    token = hub_token if hub_token is not None else get_token()
    if token is None:
        raise ValueError("no Hugging Face token: log in or pass --hub_token")

    def one(prompt: str) -> torch.Tensor:
        reply = requests.post(
            url,
            json={"prompt": prompt},
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        if reply.status_code != 200:
            raise AssertionError(f"status {reply.status_code}")
        return torch.load(io.BytesIO(reply.content))

    try:
        batch = prompts if isinstance(prompts, (list, tuple)) else [prompts]
        return torch.cat([one(p) for p in batch], dim=0)
    except Exception as exc:
        raise RuntimeError("Remote text encoder inference failed.") from exc


def test_dreambooth_refuses_to_start_without_any_token(open_server, monkeypatch):
    sent = []
    monkeypatch.setattr(requests, "post", lambda *a, **k: sent.append(a))
    with pytest.raises(ValueError, match="no Hugging Face token"):
        dreambooth_encode(open_server.url, PROMPTS)
    assert sent == []  # even a keyless server never sees a request: the docs' fix is --hub_token


def test_dreambooth_with_any_hub_token_against_a_keyless_server(open_server):
    embeds = dreambooth_encode(open_server.url, PROMPTS, hub_token="not-checked")
    assert torch.equal(embeds, grpc_embeddings(open_server, PROMPTS))


def test_dreambooth_with_the_flux2_key_as_hub_token(keyed_server):
    assert torch.equal(
        dreambooth_encode(keyed_server.url, "a red fox", hub_token=KEY),
        grpc_embeddings(keyed_server, ["a red fox"], api_key=KEY),
    )


def test_dreambooth_error_path_shows_only_the_status(keyed_server):
    with pytest.raises(RuntimeError, match="Remote text encoder inference failed") as err:
        dreambooth_encode(keyed_server.url, "a red fox", hub_token="hf_someone_elses_token")
    assert "status 401" in str(err.value.__cause__)


# -- 3. the FLUX.2-dev model-card snippet ------------------------------------------------


def model_card_encode(url: str, prompts: str | list[str]) -> torch.Tensor:
    """The model card's remote_text_encoder(prompts): one request with the whole list,
    Bearer get_token(), and the body straight into torch.load, whatever the status."""
    from huggingface_hub import get_token

    reply = requests.post(
        url,
        json={"prompt": prompts},
        headers={"Authorization": f"Bearer {get_token()}", "Content-Type": "application/json"},
    )
    return torch.load(io.BytesIO(reply.content))


def model_card_encode_checked(url: str, prompts: str | list[str]) -> torch.Tensor:
    """The same with the one line docs/hf-compatible-endpoint.md adds: raise_for_status() before torch.load."""
    from huggingface_hub import get_token

    reply = requests.post(
        url,
        json={"prompt": prompts},
        headers={"Authorization": f"Bearer {get_token()}", "Content-Type": "application/json"},
    )
    reply.raise_for_status()
    return torch.load(io.BytesIO(reply.content))


def test_model_card_snippet_against_a_keyless_server(open_server):
    assert torch.equal(model_card_encode(open_server.url, PROMPTS), grpc_embeddings(open_server, PROMPTS))


def test_model_card_snippet_turns_an_error_into_torchs_misleading_advice(keyed_server):
    # The JSON error body is unpickled: torch blames weights_only, which is not the problem.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        model_card_encode(keyed_server.url, PROMPTS)
    # With raise_for_status() the real cause shows, with the server's JSON message.
    with pytest.raises(requests.HTTPError) as err:
        model_card_encode_checked(keyed_server.url, PROMPTS)
    assert err.value.response.status_code == 401
    assert "API key" in err.value.response.json()["error"]


# -- 4. the ComfyUI community node (Remote FLUX.2 Text Encoder (HF)) -----------------------


def comfy_node_encode(prompt: str, endpoint_url: str = "", api_token: str = "") -> torch.Tensor:
    """What the node sends: URL from its field, else $HF_FLUX2_REMOTE_ENCODER_URL, else the hosted one;
    token from its field, $HF_TOKEN, $HUGGINGFACEHUB_API_TOKEN or get_token(), and no
    Authorization header at all without one; one prompt per request, sent as a string;
    raise_for_status(), then torch.load onto the CPU."""
    from huggingface_hub import get_token

    url = endpoint_url or os.environ.get(
        "HF_FLUX2_REMOTE_ENCODER_URL", "https://remote-text-encoder-flux-2.huggingface.co/predict"
    )
    token = api_token or os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACEHUB_API_TOKEN") or get_token()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    reply = requests.post(url, headers=headers, data=json.dumps({"prompt": prompt}), timeout=60)
    reply.raise_for_status()
    return torch.load(io.BytesIO(reply.content), map_location="cpu")


def test_comfy_node_url_from_its_environment_variable(open_server, monkeypatch):
    monkeypatch.setenv("HF_FLUX2_REMOTE_ENCODER_URL", open_server.url)  # no source edit needed
    assert torch.equal(comfy_node_encode("a red fox"), grpc_embeddings(open_server, ["a red fox"]))


def test_comfy_node_url_and_key_from_its_fields(keyed_server):
    embeds = comfy_node_encode("a red fox", endpoint_url=keyed_server.url, api_token=KEY)
    assert torch.equal(embeds, grpc_embeddings(keyed_server, ["a red fox"], api_key=KEY))


def test_comfy_node_sends_no_header_without_a_token(keyed_server):
    with pytest.raises(requests.HTTPError) as err:
        comfy_node_encode("a red fox", endpoint_url=keyed_server.url)
    assert err.value.response.status_code == 401
    assert "needs an API key" in err.value.response.json()["error"]  # no header at all, not a wrong one
