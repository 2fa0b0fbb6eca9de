"""The command lines: clear exit codes and messages, files that round-trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dit_client.embeddings_io import load_embeddings


def run(args, tmp_path, timeout=120):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "FLUX2_REMOTE_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_serve_missing_folder_exits_2(tmp_path):
    proc = run(["encoder_server.cli", "serve", "--model", str(tmp_path / "nope")], tmp_path)
    assert proc.returncode == 2
    assert "no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_folder_without_text_encoder_exits_2(tmp_path):
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    proc = run(["encoder_server.cli", "serve", "--model", str(tmp_path / "model")], tmp_path)
    assert proc.returncode == 2
    assert "has no text_encoder, tokenizer/ folder" in proc.stderr


def test_serve_uncached_hub_id_offline_exits_2(tmp_path):
    proc = run(["encoder_server.cli", "serve", "--model", "black-forest-labs/FLUX.2-dev"], tmp_path)
    assert proc.returncode == 2
    assert "not in the local Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_serve_nf4_on_cpu_exits_2(tmp_path, tiny_model_dir):
    proc = run(
        ["encoder_server.cli", "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--quantization", "nf4"],
        tmp_path,
    )
    assert proc.returncode == 2
    assert "--quantization nf4 needs a CUDA GPU" in proc.stderr


def test_serve_bad_flag_value_is_a_usage_error(tmp_path):
    proc = run(["encoder_server.cli", "serve", "--dtype", "int3"], tmp_path)
    assert proc.returncode == 2
    assert "'int3' is not one of" in proc.stderr


def test_encode_writes_safetensors_equal_to_the_service(server, tiny_backend, tmp_path):
    out = tmp_path / "embeds.safetensors"
    proc = run(
        [
            "dit_client.cli",
            "encode",
            "--encoder",
            server.target,
            "--prompt",
            "a cat",
            "--prompt",
            "",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "prompt_embeds [2, 512, 48] bfloat16" in proc.stdout
    embeds, prompts, fingerprint = load_embeddings(out)
    assert prompts == ["a cat", ""]
    assert fingerprint == tiny_backend.fingerprint
    assert torch.equal(embeds, tiny_backend.encode(["a cat", ""]).embeddings)


def test_encode_against_a_dead_server_exits_1_with_a_message(tmp_path):
    proc = run(
        [
            "dit_client.cli",
            "encode",
            "--encoder",
            "127.0.0.1:1",
            "--prompt",
            "a",
            "--out",
            str(tmp_path / "x.st"),
            "--timeout",
            "5",
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    assert "cannot reach the encoder at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.st").exists()


def test_info_shows_what_the_encoder_serves(server, tiny_backend, capsys):
    from dit_client import cli

    assert cli.main(["info", "--encoder", server.target]) == 0
    out = capsys.readouterr().out
    assert f"encoder at {server.target}" in out
    assert tiny_backend.fingerprint in out and "max_concurrent_calls=64" in out

    assert cli.main(["info", "--encoder", server.target, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"] == tiny_backend.fingerprint
    assert info["embedding_dim"] == 48 and info["dtype"] == "bfloat16" and info["max_sequence_length"] == 512


def test_info_against_a_dead_server_exits_1(capsys):
    from dit_client import cli

    assert cli.main(["info", "--encoder", "127.0.0.1:1", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the encoder at 127.0.0.1:1" in err and "Traceback" not in err


def test_encode_says_token_counts_include_the_template(server, tmp_path, capsys):
    from dit_client import cli
    from dit_client.remote import RemoteTextEncoder

    assert (
        cli.main(["encode", "--encoder", server.target, "--prompt", "a cat", "--out", str(tmp_path / "e.safetensors")])
        == 0
    )
    out = capsys.readouterr().out
    assert "token counts include the chat template and system message the encoder adds" in out
    with RemoteTextEncoder(server.target) as enc:
        (meta,) = enc.encode_with_metadata("a cat")[1]
    assert meta.token_count > 2  # "a cat" alone is two words: the template is in the count
    assert f"{meta.token_count:4d} tokens" in out
