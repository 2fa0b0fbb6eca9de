"""FLUX.2 [klein]: the truncated Qwen3 encoder equals diffusers' reference function bit for bit.

The reference is ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` run on the full
``Qwen3ForCausalLM`` (all 36 layers, lm_head included), loaded with the same
``from_pretrained`` as real weights from tiny random folders built here.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import Flux2KleinPipeline
from transformers import AutoTokenizer, Qwen3ForCausalLM

from common.demo import TinyKleinSpec, build_tiny_klein
from common.encoder_spec import FLUX2_DEV, FLUX2_KLEIN
from common.fingerprint import fingerprint
from common.model_source import resolve_model
from encoder_server.text_encoder import (
    MISTRAL3,
    QWEN3,
    ConfigError,
    TruncatedMistral3Encoder,
    TruncatedTextEncoder,
    recipe_for_folder,
)

PROMPTS = [
    "a red fox in fresh snow",
    "",  # the empty prompt
    "Ünïcödé: 東京の夜景, emoji 🦊🌨️, RTL שלום, combining e\u0301",
    # The reference renders the template to text and tokenizes that, so literal
    # control-token text becomes control tokens there; it must here too.
    "literal control tokens <|im_end|> <|im_start|>system <think> </think> <|endoftext|> stay as in the reference",
    "a long prompt " + "with many words " * 300,  # far over 512 tokens: truncated like the reference
    "short",
]
HIDDEN = TinyKleinSpec().text_hidden


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    """A complete tiny [klein] folder: tied embeddings like Qwen3-4B, right padding."""
    return build_tiny_klein(tmp_path_factory.mktemp("tiny-klein"), TinyKleinSpec())


@pytest.fixture(scope="module")
def klein_dir_left(tmp_path_factory):
    """Text encoder and tokenizer only: left padding, an untied lm_head like Qwen3-8B, other weights."""
    spec = TinyKleinSpec(padding_side="left", tie_word_embeddings=False, seed=1, with_dit=False)
    return build_tiny_klein(tmp_path_factory.mktemp("tiny-klein-left"), spec)


def load(folder, dtype=torch.bfloat16):
    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    return TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=dtype)


def reference(folder, prompts, dtype):
    """diffusers' own function on the full, untruncated model: the ground truth."""
    text_encoder = Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    with torch.no_grad():
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoder, tokenizer, prompts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bit_exact_with_reference_mixed_batch(klein_dir, dtype):
    enc = load(klein_dir, dtype)
    assert enc.recipe is QWEN3 and enc.padding_side == "right"
    out = enc.encode(PROMPTS)
    ref = reference(klein_dir, PROMPTS, dtype)
    assert out.embeddings.shape == ref.shape == (len(PROMPTS), 512, 3 * HIDDEN)
    assert out.embeddings.dtype == ref.dtype == dtype
    assert torch.equal(out.embeddings, ref)


def test_bit_exact_with_left_padding_and_untied_lm_head(klein_dir_left):
    enc = load(klein_dir_left)
    assert enc.padding_side == "left"
    assert torch.equal(enc.encode(PROMPTS).embeddings, reference(klein_dir_left, PROMPTS, torch.bfloat16))


def test_padding_side_is_the_tokenizers_own(klein_dir, klein_dir_left):
    # Guards the test above: if the side were fixed, both folders would pad alike.
    right = load(klein_dir).tokenize(["a cat"])[0]["attention_mask"][0]
    left = load(klein_dir_left).tokenize(["a cat"])[0]["attention_mask"][0]
    assert right[0] == 1 and right[-1] == 0
    assert left[0] == 0 and left[-1] == 1


def test_prompt_becomes_one_user_turn_and_an_empty_think_block(klein_dir):
    """The ids have Qwen3's structure for enable_thinking=False, with no system turn."""
    enc = load(klein_dir)
    inputs, truncated = enc.tokenize(["a cat"])
    ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    assert (
        enc.tokenizer.decode(ids) == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert enc.tokenizer.convert_tokens_to_ids(token) in ids  # one id each, not spelled out in bytes
    assert truncated == [False]


def test_token_counts_and_truncation_flags(klein_dir):
    enc = load(klein_dir)
    out = enc.encode(PROMPTS)
    inputs, _ = enc.tokenize(PROMPTS)
    assert out.token_counts == inputs["attention_mask"].sum(dim=1).tolist()
    assert out.truncated == [False, False, False, False, True, False]
    assert out.token_counts[4] == 512
    assert out.token_counts[1] < out.token_counts[0] < 512  # the empty prompt still has the template


def test_result_does_not_depend_on_batch_companions(klein_dir):
    enc = load(klein_dir)
    prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[5]]  # empty, truncated and short: every row pads differently
    together = enc.encode(prompts).embeddings
    alone = torch.cat([enc.encode([p]).embeddings for p in prompts])
    assert torch.equal(together, alone)


def test_only_27_of_36_layers_are_loaded(klein_dir):
    enc = load(klein_dir)
    assert enc.num_hidden_layers == 36
    assert len(enc._lm.layers) == FLUX2_KLEIN.computed_layers == 27
    assert len(enc._lm.config.layer_types) == 27
    assert isinstance(enc._lm.norm, torch.nn.Identity)
    names = {n for n, _ in enc._lm.named_parameters()}
    assert not any("lm_head" in n or n.startswith("layers.27.") for n in names)


def test_last_requested_state_is_not_normed(klein_dir):
    # transformers ties hidden_states[-1] to the final-normed output; cut at layer 27,
    # state 27 would be normed unless the norm is removed.
    enc = load(klein_dir, torch.float32)
    full = Qwen3ForCausalLM.from_pretrained(klein_dir / "text_encoder", dtype=torch.float32).eval()
    inputs, _ = enc.tokenize(["a cat"])
    with torch.no_grad():
        states = full(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    ours = enc.encode(["a cat"]).embeddings[0, :, 2 * HIDDEN :]  # third block = hidden_states[27]
    assert torch.equal(ours, states[27][0])
    assert not torch.equal(ours, full.model.norm(states[27])[0])


# -- what the loader reads -----------------------------------------------------


def _rewrite_checkpoint(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (path,) = (dst / "text_encoder").glob("*.safetensors")
    tensors = edit(load_file(path))
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_lm_head_final_norm_and_layers_past_27_are_never_read(klein_dir_left, tmp_path):
    """Tensors of impossible shapes there would fail any loader that materialised them."""
    unread = ("lm_head.", "model.norm.", *(f"model.layers.{i}." for i in range(27, 36)))

    def garble(tensors):
        assert any(k.startswith("lm_head.") for k in tensors)  # untied: the checkpoint has one
        return {k: (torch.zeros(3, 3) if k.startswith(unread) else v) for k, v in tensors.items()}

    folder = _rewrite_checkpoint(klein_dir_left, tmp_path / "garbled", garble)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the full model cannot load it...
        Qwen3ForCausalLM.from_pretrained(folder / "text_encoder")
    # ...the server never looks at those weights (it refuses any mismatched weight it does read).
    assert torch.equal(load(folder).encode(PROMPTS[:3]).embeddings, load(klein_dir_left).encode(PROMPTS[:3]).embeddings)
    assert [
        QWEN3.is_needed_weight(k + "weight") for k in ("lm_head.", "model.norm.", "model.layers.27.mlp.up_proj.")
    ] == [False, False, False]
    assert QWEN3.is_needed_weight("model.layers.26.mlp.up_proj.weight")
    assert QWEN3.is_needed_weight("model.embed_tokens.weight")


def test_weights_in_an_unknown_layout_are_refused_not_randomised(klein_dir, tmp_path):
    def rename(tensors):
        return {k.replace("model.", "somebody.", 1): v for k, v in tensors.items()}

    folder = _rewrite_checkpoint(klein_dir, tmp_path / "renamed", rename)
    with pytest.raises(ConfigError, match="does not hold the Qwen3 language model weights"):
        load(folder)


# -- which recipe a folder gets --------------------------------------------------


def test_recipe_comes_from_the_text_encoder_config(klein_dir, klein_dir_left, tiny_model_dir):
    assert recipe_for_folder(klein_dir) is QWEN3
    assert recipe_for_folder(klein_dir_left) is QWEN3  # no model_index.json: the config alone decides
    assert recipe_for_folder(tiny_model_dir) is MISTRAL3


def test_a_mixed_up_folder_is_refused(klein_dir, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(klein_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2Pipeline"}))
    with pytest.raises(ConfigError, match="names Flux2Pipeline"):
        recipe_for_folder(folder)


def test_an_unknown_text_encoder_is_refused(klein_dir, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(klein_dir, folder)
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    (folder / "text_encoder" / "config.json").write_text(json.dumps({**config, "model_type": "gemma3"}))
    with pytest.raises(ConfigError, match="model_type 'gemma3'; this server knows mistral3 .*qwen3"):
        load(folder)


def test_the_dev_class_refuses_a_klein_folder(klein_dir):
    source = resolve_model(str(klein_dir), components=("text_encoder", "tokenizer"))
    with pytest.raises(ConfigError, match="not a Mistral-3 text encoder"):
        TruncatedMistral3Encoder(source, device=torch.device("cpu"))


# -- fingerprints ----------------------------------------------------------------


def test_klein_fingerprint_is_stable_and_depends_on_dtype_and_weights(klein_dir, klein_dir_left):
    a = load(klein_dir).fingerprint
    assert a.startswith("flux2-klein:")
    assert a == load(klein_dir).fingerprint
    assert a != load(klein_dir, torch.float32).fingerprint
    assert a != load(klein_dir_left).fingerprint


def test_dev_fingerprint_is_unchanged_by_the_recipes(tiny_model_dir):
    """Stores and caches are keyed by it: the generic loader gives [dev] the fingerprint it always had."""
    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    generic = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert generic.recipe is MISTRAL3
    direct = fingerprint(tiny_model_dir / "text_encoder", tiny_model_dir / "tokenizer", FLUX2_DEV, "bfloat16", "none")
    assert generic.fingerprint == direct == load(tiny_model_dir).fingerprint
    assert direct.startswith("flux2-dev:")


def test_hub_download_skips_shards_the_klein_server_never_reads(klein_dir_left, tmp_path, monkeypatch):
    """Shards with only lm_head, the final norm or layers 28-36 are not fetched; the result is bit-exact."""
    import fnmatch

    import huggingface_hub

    from common.config import ServerConfig
    from encoder_server.text_encoder import load_backend

    repo = tmp_path / "repo"
    shutil.copytree(klein_dir_left / "tokenizer", repo / "tokenizer")
    Qwen3ForCausalLM.from_pretrained(klein_dir_left / "text_encoder").save_pretrained(
        repo / "text_encoder", max_shard_size="20KB"
    )
    weight_map = json.loads((repo / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {shard for name, shard in weight_map.items() if QWEN3.is_needed_weight(name)}
    unneeded = set(weight_map.values()) - needed
    assert needed and unneeded and weight_map["lm_head.weight"] in unneeded

    fetched: set[str] = set()

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        snapshot = tmp_path / "hf-cache" / "snapshots" / "4567cdef"
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if (
                f.is_file()
                and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"])
                and not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or [])
            ):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snapshot / rel)
                fetched.add(rel)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("FLUX2_REMOTE_CACHE", str(tmp_path / "ours"))
    backend, source = load_backend(ServerConfig(model="some-org/klein-like", device="cpu"))

    assert {f"text_encoder/{s}" for s in needed} <= fetched
    assert not {f"text_encoder/{s}" for s in unneeded} & fetched
    assert backend.spec is FLUX2_KLEIN
    assert backend.fingerprint == load(repo).fingerprint  # as for every shard present, in a plain local folder
    # The full model from every shard is the ground truth.
    assert torch.equal(backend.encode(PROMPTS[2:4]).embeddings, reference(repo, PROMPTS[2:4], torch.bfloat16))


def test_the_server_serves_klein_embeddings_unchanged(klein_dir):
    """No server code knows the family: GetInfo and Encode follow the backend's recipe."""
    from dit_client import RemoteTextEncoder
    from tests.helpers import ServerThread

    backend = load(klein_dir)
    with ServerThread(backend, model_id="tiny-klein") as server:
        client = RemoteTextEncoder(server.target)
        info = client.info()
        got = client.encode(PROMPTS[:3])
    assert tuple(info.hidden_states_layers) == (9, 18, 27)
    assert (info.num_hidden_layers, info.computed_layers, info.embedding_dim) == (36, 27, 3 * HIDDEN)
    assert info.fingerprint == backend.fingerprint and info.padding_side == "right"
    assert torch.equal(got, reference(klein_dir, PROMPTS[:3], torch.bfloat16))


def test_specs_name_the_pipelines_and_text_encoders_they_serve():
    from common.encoder_spec import SPECS, spec_for_pipeline, spec_for_text_encoder

    assert spec_for_pipeline("Flux2Pipeline") is FLUX2_DEV
    for pipeline in ("Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline"):
        assert spec_for_pipeline(pipeline) is FLUX2_KLEIN
    assert spec_for_pipeline("StableDiffusionPipeline") is None
    assert spec_for_text_encoder("qwen3") is FLUX2_KLEIN and spec_for_text_encoder("mistral3") is FLUX2_DEV
    assert [r.spec for r in (MISTRAL3, QWEN3)] == list(SPECS)  # every spec has a recipe on the server
    assert (FLUX2_KLEIN.computed_layers, FLUX2_KLEIN.family, FLUX2_KLEIN.embedding_dim(2560)) == (
        27,
        "flux2-klein",
        7680,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bit_exact_on_cuda_and_nf4_loads(klein_dir):
    """Same weights, dtype and device: the reference on the GPU is the ground truth there."""
    source = resolve_model(str(klein_dir), components=("text_encoder", "tokenizer"))
    enc = TruncatedTextEncoder(source, device=torch.device("cuda"), dtype=torch.bfloat16)
    text_encoder = Qwen3ForCausalLM.from_pretrained(klein_dir / "text_encoder", dtype=torch.bfloat16).to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(klein_dir / "tokenizer")
    with torch.no_grad():
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoder.eval(), tokenizer, PROMPTS)
    assert torch.equal(enc.encode(PROMPTS).embeddings, ref.cpu())
    nf4 = TruncatedTextEncoder(source, device=torch.device("cuda"), dtype=torch.bfloat16, quantization="nf4")
    out = nf4.encode(["a cat"]).embeddings
    assert out.shape == (1, 512, 3 * HIDDEN) and torch.isfinite(out.float()).all()
