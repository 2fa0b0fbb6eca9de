"""The demo models ([dev] and [klein]): deterministic, built once, atomically, loadable like real weights."""

from __future__ import annotations

import hashlib
import json

import pytest

from common.demo import (
    TinyFlux2Spec,
    TinyKleinSpec,
    build_tiny_flux2,
    build_tiny_klein,
    default_demo_dir,
    ensure_demo_model,
    is_demo_folder,
)
from common.fingerprint import file_digest


def digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_build_is_deterministic(tmp_path):
    spec = TinyFlux2Spec(with_dit=False)
    a = digests(build_tiny_flux2(tmp_path / "a", spec))
    b = digests(build_tiny_flux2(tmp_path / "b", spec))
    assert a and a == b
    assert digests(build_tiny_flux2(tmp_path / "c", TinyFlux2Spec(with_dit=False, seed=3))) != a


def test_ensure_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX2_REMOTE_CACHE", str(tmp_path))
    first = ensure_demo_model()
    assert is_demo_folder(first)
    for part in ("text_encoder", "tokenizer", "transformer", "vae", "scheduler", "model_index.json"):
        assert (first / part).exists()
    mtime = (first / "text_encoder" / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model() == first
    assert (first / "text_encoder" / "model.safetensors").stat().st_mtime_ns == mtime
    # No temporary build folders are left behind.
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_ensure_replaces_a_torn_folder(tmp_path):
    target = tmp_path / "demo"
    (target / "text_encoder").mkdir(parents=True)  # e.g. a crash of an older writer
    assert not is_demo_folder(target)
    ensure_demo_model(target)
    assert is_demo_folder(target) and (target / "text_encoder" / "model.safetensors").is_file()


def test_large_files_are_sampled_but_still_sensitive_to_content(tmp_path, monkeypatch):
    import common.fingerprint as fp

    monkeypatch.setattr(fp, "_FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(fp, "_SAMPLE", 256)
    path = tmp_path / "w.safetensors"
    data = bytearray((8).to_bytes(8, "little") + b"{}      " + bytes(range(256)) * 64)
    path.write_bytes(bytes(data))
    a = file_digest(path)
    assert a.startswith("sampled-sha256:")
    data[-1] ^= 1  # the last block is always sampled
    path.write_bytes(bytes(data))
    assert file_digest(path) != a


# -- demo-klein --------------------------------------------------------------------


def test_klein_build_is_deterministic(tmp_path):
    spec = TinyKleinSpec(with_dit=False)
    a = digests(build_tiny_klein(tmp_path / "a", spec))
    assert a and a == digests(build_tiny_klein(tmp_path / "b", spec))
    assert digests(build_tiny_klein(tmp_path / "c", TinyKleinSpec(with_dit=False, seed=3))) != a


def test_demo_klein_resolves_to_a_complete_klein_pipeline(tmp_path, monkeypatch):
    """``--model demo-klein`` is built once beside ``demo`` and loads as a Flux2KleinPipeline
    whose DiT takes the [klein] recipe's embeddings."""
    from diffusers import Flux2KleinPipeline

    from common.encoder_spec import FLUX2_KLEIN, spec_for_pipeline
    from common.model_source import resolve_model

    monkeypatch.setenv("FLUX2_REMOTE_CACHE", str(tmp_path))
    source = resolve_model("demo-klein", components=("text_encoder", "tokenizer"))
    assert source.demo and source.model_id == "demo-klein"
    assert source.folder == default_demo_dir("klein") != default_demo_dir("dev")
    assert ensure_demo_model(variant="klein") == source.folder
    assert [p.name for p in tmp_path.iterdir()] == [source.folder.name]  # "demo" itself is not built

    index = json.loads((source.folder / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert spec_for_pipeline(index["_class_name"]) is FLUX2_KLEIN
    pipe = Flux2KleinPipeline.from_pretrained(source.folder)
    hidden = pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.joint_attention_dim == FLUX2_KLEIN.embedding_dim(hidden)
    assert pipe.text_encoder.config.num_hidden_layers == 36 >= FLUX2_KLEIN.computed_layers
    assert pipe.transformer.config.guidance_embeds is False
    # The pipeline's own encode_prompt runs on it: the reference path works end to end.
    embeds, _ = pipe.encode_prompt("a cat", device="cpu")
    assert embeds.shape == (1, 512, 3 * hidden)
    # ...and so does denoising from given embeddings, the way a remote encoder's are used.
    image = pipe(prompt_embeds=embeds, height=32, width=32, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_unknown_demo_variant_is_refused():
    with pytest.raises(ValueError, match="unknown demo variant"):
        default_demo_dir("schnell")
