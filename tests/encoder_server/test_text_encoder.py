"""The truncated encoder equals diffusers' reference function bit for bit."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Pipeline
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

from common.encoder_spec import FLUX2_DEV
from common.model_source import resolve_model
from encoder_server.text_encoder import ConfigError, TruncatedMistral3Encoder, quantization_config

PROMPTS = [
    "a red fox in fresh snow",
    "",  # the empty prompt
    "Ünïcödé: 東京の夜景, emoji 🦊🌨️, RTL שלום, combining e\u0301",
    "literal control tokens [IMG] [INST] [/INST] [SYSTEM_PROMPT] </s> <pad> stay text",
    "a long prompt " + "with many words " * 300,  # far over 512 tokens: truncated like the reference
    "short",
]


def reference(folder, prompts, dtype):
    """diffusers' own function on the full, untruncated model: the ground truth."""
    text_encoder = Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    with torch.no_grad():
        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(text_encoder, tokenizer, prompts)


def load(folder, dtype):
    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bit_exact_with_reference_mixed_batch(tiny_model_dir, dtype):
    enc = load(tiny_model_dir, dtype)
    out = enc.encode(PROMPTS)
    ref = reference(tiny_model_dir, PROMPTS, dtype)
    assert out.embeddings.shape == ref.shape == (len(PROMPTS), 512, 3 * 16)
    assert out.embeddings.dtype == ref.dtype == dtype
    assert torch.equal(out.embeddings, ref)


def test_bit_exact_with_right_padding(tiny_model_dir_right):
    enc = load(tiny_model_dir_right, torch.bfloat16)
    assert enc.padding_side == "right"
    out = enc.encode(PROMPTS)
    assert torch.equal(out.embeddings, reference(tiny_model_dir_right, PROMPTS, torch.bfloat16))


def test_padding_side_changes_the_embeddings(tiny_model_dir, tiny_model_dir_right):
    # Guards the test above: if padding side were ignored both would agree by accident.
    left = load(tiny_model_dir, torch.float32).tokenize(["a cat"])[0]["attention_mask"][0]
    right = load(tiny_model_dir_right, torch.float32).tokenize(["a cat"])[0]["attention_mask"][0]
    assert left[0] == 0 and left[-1] == 1
    assert right[0] == 1 and right[-1] == 0


def test_result_does_not_depend_on_batch_companions(tiny_backend):
    together = tiny_backend.encode(PROMPTS).embeddings
    alone = torch.cat([tiny_backend.encode([p]).embeddings for p in PROMPTS])
    assert torch.equal(together, alone)


def test_token_counts_and_truncation_flags(tiny_backend):
    out = tiny_backend.encode(PROMPTS)
    inputs, _ = tiny_backend.tokenize(PROMPTS)
    assert out.token_counts == inputs["attention_mask"].sum(dim=1).tolist()
    assert out.truncated == [False, False, False, False, True, False]
    assert out.token_counts[4] == 512
    assert out.token_counts[1] < out.token_counts[0] < 512  # the empty prompt still has the system turn
    assert out.tokenization_ns > 0 and out.inference_ns > 0


def test_img_marker_removed_like_reference(tiny_backend):
    # format_input strips literal "[IMG]" before templating; other control-token text stays.
    a = tiny_backend.encode(["a [IMG]cat"]).embeddings
    b = tiny_backend.encode(["a cat"]).embeddings
    c = tiny_backend.encode(["a [INST]cat"]).embeddings
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_only_needed_layers_are_loaded(tiny_backend):
    lm = tiny_backend._lm
    assert tiny_backend.num_hidden_layers == 40
    assert len(lm.layers) == FLUX2_DEV.computed_layers == 30
    assert isinstance(lm.norm, torch.nn.Identity)
    names = {n for n, _ in lm.named_parameters()}
    assert not any("vision" in n or "lm_head" in n or "projector" in n for n in names)
    assert not any(n.startswith("layers.30.") for n in names)


def test_last_requested_state_is_not_normed(tiny_model_dir):
    # transformers ties hidden_states[-1] to the final-normed output. With the
    # model cut at layer 30, index 30 would silently be normed; compare with
    # the untruncated model's state 30 to prove it is not.
    enc = load(tiny_model_dir, torch.float32)
    full = Mistral3ForConditionalGeneration.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch.float32)
    inputs, _ = enc.tokenize(["a cat"])
    with torch.no_grad():
        states = full(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    ours = enc.encode(["a cat"]).embeddings[0, :, 2 * 16 :]  # third block = hidden_states[30]
    assert torch.equal(ours, states[30][0])
    assert not torch.equal(ours, full.model.language_model.norm(states[30])[0])


def test_fingerprint_depends_on_dtype_and_weights(tiny_model_dir, tiny_model_dir_right):
    a = load(tiny_model_dir, torch.bfloat16).fingerprint
    assert a == load(tiny_model_dir, torch.bfloat16).fingerprint
    assert a != load(tiny_model_dir, torch.float32).fingerprint
    assert a != load(tiny_model_dir_right, torch.bfloat16).fingerprint
    assert a.startswith("flux2-dev:")


def test_empty_prompt_list_is_refused(tiny_backend):
    from common.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        tiny_backend.encode([])


@pytest.mark.parametrize("quant", ["fp8", "nf4"])
def test_quantization_needs_cuda_with_a_clear_error(quant):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        quantization_config(quant, torch.bfloat16, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes NF4 needs a CUDA GPU")
def test_nf4_loads_and_encodes_on_cuda(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    enc = TruncatedMistral3Encoder(source, device=torch.device("cuda"), dtype=torch.bfloat16, quantization="nf4")
    out = enc.encode(["a cat"]).embeddings
    assert out.shape == (1, 512, 48) and torch.isfinite(out.float()).all()


# -- the tokenizer folder FLUX.2-dev really ships: a PixtralProcessor ----------


def test_pixtral_processor_folder_is_bit_exact_with_reference(tiny_model_dir, tmp_path, pixtral_processor_class):
    """FLUX.2-dev's ``tokenizer/`` is a PixtralProcessor, and diffusers calls the processor's own
    ``apply_chat_template``; the server loads that folder as a tokenizer. Both must give the same ids."""
    import shutil

    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    processor = pixtral_processor_class(
        image_processor=PixtralImageProcessorPil(), tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    folder = tmp_path / "flux2-like"
    shutil.copytree(tiny_model_dir / "text_encoder", folder / "text_encoder")
    processor.save_pretrained(folder / "tokenizer")
    assert (folder / "tokenizer" / "processor_config.json").is_file()
    processor = pixtral_processor_class.from_pretrained(folder / "tokenizer")

    enc = load(folder, torch.bfloat16)
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    messages = format_input(prompts=PROMPTS, system_message=SYSTEM_MESSAGE)
    kwargs = dict(
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=512,
    )
    theirs = processor.apply_chat_template(messages, **kwargs)
    ours, _ = enc.tokenize(PROMPTS)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])

    text_encoder = Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(text_encoder.eval(), processor, PROMPTS)
    assert torch.equal(enc.encode(PROMPTS).embeddings, ref)


# -- what the loader reads -----------------------------------------------------


def _rewrite_checkpoint(src, dst, edit):
    """Copy the folder at ``src`` to ``dst`` with ``edit(dict_of_tensors)`` applied to the text encoder weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (path,) = (dst / "text_encoder").glob("*.safetensors")
    tensors = edit(load_file(path))
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_checkpoint_in_the_in_memory_key_layout_loads_bit_exact(tiny_model_dir, tmp_path):
    """Checkpoints saved as ``model.language_model.*`` load like ``language_model.model.*`` ones."""

    def relayout(tensors):
        return {k.replace("language_model.model.", "model.language_model.", 1): v for k, v in tensors.items()}

    folder = _rewrite_checkpoint(tiny_model_dir, tmp_path / "relaid", relayout)
    assert torch.equal(
        load(folder, torch.bfloat16).encode(PROMPTS[:3]).embeddings,
        load(tiny_model_dir, torch.bfloat16).encode(PROMPTS[:3]).embeddings,
    )


def test_vision_tower_lm_head_final_norm_and_layers_past_30_are_never_read(tiny_model_dir, tmp_path):
    """Tensors of impossible shapes there would fail any loader that materialised them."""
    unread = ("language_model.model.norm.", *(f"language_model.model.layers.{i}." for i in range(30, 40)))

    def garble(tensors):
        assert any(k.startswith(unread[1:]) for k in tensors)
        return {
            k: (torch.zeros(3, 3) if k.startswith(unread) or not k.startswith("language_model.model.") else v)
            for k, v in tensors.items()
        }

    folder = _rewrite_checkpoint(tiny_model_dir, tmp_path / "garbled", garble)
    with pytest.raises(Exception):  # noqa: B017 - any load error will do: the full model cannot load it...
        Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder")
    # ...the server never looks at those weights.
    assert torch.equal(
        load(folder, torch.bfloat16).encode(["a cat"]).embeddings,
        load(tiny_model_dir, torch.bfloat16).encode(["a cat"]).embeddings,
    )


def test_weights_in_an_unknown_layout_are_refused_not_randomised(tiny_model_dir, tmp_path):
    def rename(tensors):
        return {k.replace("language_model.model.", "somebody.else.", 1): v for k, v in tensors.items()}

    folder = _rewrite_checkpoint(tiny_model_dir, tmp_path / "renamed", rename)
    with pytest.raises(ConfigError, match="does not hold the Mistral-3 language model weights"):
        load(folder, torch.bfloat16)


def test_load_backend_runs_one_warm_up_pass_before_serving(tiny_model_dir, monkeypatch):
    from common.config import ServerConfig
    from encoder_server.text_encoder import TruncatedTextEncoder, load_backend

    seen = []
    real = TruncatedTextEncoder.encode
    monkeypatch.setattr(
        TruncatedTextEncoder, "encode", lambda self, prompts: seen.append(prompts) or real(self, prompts)
    )
    backend, _ = load_backend(ServerConfig(model=str(tiny_model_dir), device="cpu"))
    assert seen == [[""]]
    assert backend.encode(["a cat"]).embeddings.shape == (1, 512, 48)


def test_hub_download_skips_shards_the_server_never_reads(tiny_model_dir, tmp_path, monkeypatch):
    """Only shards with embeddings or layers 1-30 are fetched; the result equals a complete folder's, bit for bit."""
    import fnmatch
    import json
    import shutil

    import huggingface_hub

    from common.config import ServerConfig
    from encoder_server.text_encoder import MISTRAL3, load_backend

    # A "hub repo" whose text encoder is split into many small shards.
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_dir / "tokenizer", repo / "tokenizer")
    Mistral3ForConditionalGeneration.from_pretrained(tiny_model_dir / "text_encoder").save_pretrained(
        repo / "text_encoder", max_shard_size="20KB"
    )
    weight_map = json.loads((repo / "text_encoder" / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {shard for name, shard in weight_map.items() if MISTRAL3.is_needed_weight(name)}
    unneeded = set(weight_map.values()) - needed
    assert needed and unneeded  # the layout this test needs

    fetched: set[str] = set()

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        snapshot = tmp_path / "hf-cache" / "snapshots" / "0123abcd"
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
    backend, source = load_backend(ServerConfig(model="some-org/flux2-like", device="cpu"))

    assert {f"text_encoder/{s}" for s in needed} <= fetched
    assert not {f"text_encoder/{s}" for s in unneeded} & fetched
    assert source.revision == "0123abcd" and source.folder.is_relative_to(tmp_path / "ours")
    _, again = load_backend(ServerConfig(model="some-org/flux2-like", device="cpu"))
    assert again.folder == source.folder  # the view is reused, not rebuilt under a running server
    complete = load(repo, torch.bfloat16)  # every shard present, as in a plain local folder
    assert backend.fingerprint == complete.fingerprint
    assert torch.equal(backend.encode(PROMPTS).embeddings, complete.encode(PROMPTS).embeddings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda:0", "torch sees no CUDA device"), ("mps", "not supported")])
def test_an_unusable_device_is_a_config_error(device, message):
    """The shared common.devices reading, refused as ConfigError so the CLI exits with code 2."""
    from encoder_server.text_encoder import resolve_device

    with pytest.raises(ConfigError, match=message):
        resolve_device(device)
