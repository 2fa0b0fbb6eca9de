"""The client's prompt upsampling: RemoteTextEncoder.upsample, `flux2-dit upsample`, `generate --upsample`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from common.config import ServerConfig
from common.errors import UpsamplingUnavailable
from common.model_source import resolve_model
from dit_client import cli
from dit_client.remote import RemoteTextEncoder
from tests.helpers import GatedUpsampler, ServerThread

MODEL_NAME = ServerConfig().served_models()[0].name


@pytest.fixture(scope="module")
def f32_backend(tiny_model_dir):
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture()
def upsampling_server(f32_backend):
    """The tiny encoder with an upsampler that answers each prompt in upper case (and takes images)."""
    upsampler = GatedUpsampler(takes_images=True)
    upsampler.gate.release.set()
    with ServerThread(f32_backend, upsamplers={MODEL_NAME: upsampler}) as server:
        server.upsampler = upsampler
        yield server


def test_upsample_returns_one_text_per_prompt(upsampling_server):
    with RemoteTextEncoder(upsampling_server.target) as client:
        assert client.upsample(["a fox", "a cat"], seed=4) == ["A FOX", "A CAT"]
        assert client.upsample("one") == ["ONE"]
        image = Image.new("RGB", (16, 16), "red")
        assert client.upsample(["edit"], images=[[image]], temperature=0.3) == ["EDIT"]
    calls = upsampling_server.upsampler.calls
    assert calls[0]["seed"] == 4 and calls[0]["temperature"] == 0.15
    assert calls[2]["temperature"] == 0.3 and calls[2]["images"][0][0].size == (16, 16)


def test_cli_upsample_prints_the_rewritten_prompts(upsampling_server, tmp_path, capsys):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (20, 10), "blue").save(ref)
    rc = cli.main(
        ["upsample", "--encoder", upsampling_server.target, "--prompt", "a fox", "--prompt", "a cat", "--seed", "9"]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and out.splitlines() == ["A FOX", "A CAT"] and "seed 9" in err
    rc = cli.main(["upsample", "--encoder", upsampling_server.target, "--prompt", "make it night", "--image", str(ref)])
    assert rc == 0 and capsys.readouterr().out.strip() == "MAKE IT NIGHT"
    assert upsampling_server.upsampler.calls[-1]["images"][0][0].size == (20, 10)


def test_a_server_without_upsampling_is_a_clear_error(f32_backend, capsys):
    with ServerThread(f32_backend) as server:
        with RemoteTextEncoder(server.target) as client, pytest.raises(UpsamplingUnavailable, match="--upsampling"):
            client.upsample(["a fox"])
        rc = cli.main(["upsample", "--encoder", server.target, "--prompt", "a fox"])
    err = capsys.readouterr().err
    assert rc == 1 and "--upsampling" in err and len(err.strip().splitlines()) == 1


def test_generate_upsample_encodes_the_rewritten_prompt_and_keeps_both(
    upsampling_server, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "fox.png"
    args = ["generate", "--encoder", upsampling_server.target, "--model", str(tiny_model_dir), "--prompt", "a red fox"]
    args += ["--out", str(out), "--height", "32", "--width", "32", "--steps", "2", "--seed", "1", "--quiet"]
    args += ["--quantization", "none", "--dtype", "float32", "--device", "cpu", "--upsample-temperature", "0.5"]
    assert cli.main(args) == 0
    assert "upsampled prompt (seed 5): A RED FOX" in capsys.readouterr().out
    metadata = json.loads(Image.open(out).text["flux2-remote"])
    assert metadata["prompt"] == "A RED FOX" and metadata["original_prompt"] == "a red fox"
    assert metadata["upsample_temperature"] == 0.5 and metadata["upsample_seed"] == 5
    assert upsampling_server.upsampler.calls[-1]["prompts"] == ["a red fox"]
    # Without the flag nothing is upsampled, and the metadata says nothing of it.
    plain = tmp_path / "plain.png"
    args[args.index(str(out))] = str(plain)
    assert cli.main(args[:-2]) == 0
    assert "original_prompt" not in json.loads(Image.open(plain).text["flux2-remote"])
    assert len(upsampling_server.upsampler.calls) == 1


def test_info_says_which_models_upsample(upsampling_server, f32_backend, capsys):
    with RemoteTextEncoder(upsampling_server.target) as client:
        described = client.info().described
        assert described.upsampling and described.upsampling_images and described.upsampling_unavailable == ""
    assert cli.main(["info", "--encoder", upsampling_server.target]) == 0
    assert "prompt upsampling: yes, with images" in capsys.readouterr().out
    with ServerThread(f32_backend) as plain:
        assert cli.main(["info", "--encoder", plain.target]) == 0
    assert "prompt upsampling: no (the server was started without --upsampling)" in capsys.readouterr().out


@pytest.mark.slow  # the real serve command in a process
def test_flux2_encoder_serve_upsampling_end_to_end(tmp_path, capsys):
    """The real commands: `flux2-encoder serve --model demo --upsampling` in a process, `flux2-dit upsample` here."""
    from tests.replica_procs import ReplicaProcess

    with ReplicaProcess(tmp_path, extra_args=("--upsampling", "--upsampling-max-new-tokens", "3")) as server:
        assert cli.main(["upsample", "--encoder", server.target, "--prompt", "a fox", "--seed", "11"]) == 0
        first = capsys.readouterr().out
        assert cli.main(["upsample", "--encoder", server.target, "--prompt", "a fox", "--seed", "11"]) == 0
        assert capsys.readouterr().out == first  # the same seed, the same text
        assert 0 < server.metric("flux2_encoder_generated_tokens_total") <= 6
        assert server.metric("flux2_encoder_requests_total", method="Upsample", status="OK") == 2
