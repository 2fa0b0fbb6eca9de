"""The DiT client: pixels equal diffusers' own pipeline, no text encoder, one fetch per prompt, clear errors."""

from __future__ import annotations

import json
import shutil
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from common.encoder_spec import FLUX2_DEV
from common.errors import EncoderOverloaded, EncoderUnavailable, Unauthenticated
from common.model_source import resolve_model
from dit_client import cli
from dit_client.generate import (
    DIT_COMPONENTS,
    MAX_REFERENCE_IMAGES,
    ClientConfigError,
    DiTClient,
    DiTConfig,
    EmbeddingCache,
    EncoderMismatch,
    apply_offload,
    load_reference_images,
    resolve_quantization,
)
from dit_client.remote import RemoteTextEncoder
from dit_client.retry import RetryPolicy
from dit_client.structured_prompt import render_structured_prompt
from encoder_server.text_encoder import EncodedBatch
from tests.helpers import OverloadedFirst, ServerThread

PROMPT = "a red fox sitting in fresh snow"
SIZE = 32
STEPS = 2
CPU_F32 = dict(device="cpu", dtype="float32", quantization="none")


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_server(tiny_model_dir):
    """The encoder on the tiny model in float32, the dtype of the client pipeline (exactness on CPU),
    with its pad table as `serve` loads it: clients receive only real rows, so every pixel test covers elision."""
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    backend = TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.float32)
    with ServerThread(backend, model_id="tiny-f32", pad_table=True) as server:
        yield server


@pytest.fixture(scope="module")
def reference_pipe(tiny_model_dir):
    """diffusers' own pipeline, with its own text encoder: the ground truth."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dit_only_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with text_encoder/ and tokenizer/ replaced by garbage: opening them would fail."""
    folder = tmp_path_factory.mktemp("dit-only") / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / name)
        (folder / name).mkdir()
        (folder / name / "config.json").write_text("{ not json")
        (folder / name / "model.safetensors").write_bytes(b"\x00garbage")
    return folder


class SpyEncoder(RemoteTextEncoder):
    """A real client that records what it sends to the service."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[list[str]] = []

    def encode(self, prompts, **kwargs):
        self.sent.append(list(prompts))
        return super().encode(prompts, **kwargs)


def reference_images(pipe, prompt, *, seed, num_images=1, image=None):
    return pipe(
        prompt=prompt,
        image=image,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB"))


def run_cli(*args: str) -> int:
    return cli.main(["generate", *args])


# -- fidelity ------------------------------------------------------------------


def test_cli_png_equals_local_pipeline_pixel_for_pixel(f32_server, tiny_model_dir, reference_pipe, tmp_path):
    out = tmp_path / "fox.png"
    rc = run_cli(
        "--encoder",
        f32_server.target,
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(out),
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--steps",
        str(STEPS),
        "--guidance",
        "4",
        "--seed",
        "7",
        "--quantization",
        "none",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
    )
    assert rc == 0
    expected = reference_images(reference_pipe, PROMPT, seed=7)[0]
    got = pixels(out)
    assert got.shape == (SIZE, SIZE, 3)
    assert got.std() > 0  # a real picture, not a blank one
    np.testing.assert_array_equal(got, pixels(expected))
    # The seed changes the picture: the comparison above is not vacuous.
    other = reference_images(reference_pipe, PROMPT, seed=8)[0]
    assert not np.array_equal(got, pixels(other))


def test_num_images_match_num_images_per_prompt(f32_server, tiny_model_dir, reference_pipe, tmp_path):
    rc = run_cli(
        "--encoder",
        f32_server.target,
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "many.png"),
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--steps",
        str(STEPS),
        "--seed",
        "3",
        "--num-images",
        "2",  # default --quantization auto
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
    )
    assert rc == 0
    expected = reference_images(reference_pipe, PROMPT, seed=3, num_images=2)
    for i in range(2):
        np.testing.assert_array_equal(pixels(tmp_path / f"many-{i}.png"), pixels(expected[i]))
    assert not (tmp_path / "many.png").exists()


def test_reference_image_is_encoded_locally_and_matches(f32_server, tiny_model_dir, reference_pipe, tmp_path):
    ref_path = tmp_path / "ref.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 72, 3), dtype=np.uint8)).save(ref_path)
    with (
        SpyEncoder(f32_server.target) as enc,
        DiTClient(enc, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client,
    ):
        result = client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=5, images=[ref_path])
        assert enc.sent == [[PROMPT]]  # only the text went to the service
    expected = reference_images(reference_pipe, PROMPT, seed=5, image=[Image.open(ref_path).convert("RGB")])[0]
    np.testing.assert_array_equal(pixels(result.images[0]), pixels(expected))
    without = reference_images(reference_pipe, PROMPT, seed=5)[0]
    assert not np.array_equal(pixels(result.images[0]), pixels(without))


# -- the text encoder is never touched ----------------------------------------------


def test_text_encoder_is_never_opened_or_instantiated(f32_server, dit_only_dir, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the DiT client tried to instantiate or load a text encoder or tokenizer")

    monkeypatch.setattr(transformers.Mistral3ForConditionalGeneration, "__init__", refuse)
    monkeypatch.setattr(transformers.Mistral3ForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)

    with DiTClient(f32_server.target, DiTConfig(model=str(dit_only_dir), **CPU_F32), progress=False) as client:
        result = client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=1)
        pipe = client.pipe
    assert result.images[0].size == (SIZE, SIZE)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    loaded = {type(m).__name__ for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()}
    assert not any("Mistral" in name or "Pixtral" in name for name in loaded)


def test_hub_download_asks_for_dit_components_only(f32_server, dit_only_dir, monkeypatch):
    import huggingface_hub

    asked: list[list[str]] = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns))
        return str(dit_only_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with DiTClient(f32_server.target, DiTConfig(model="some-org/flux2-like", **CPU_F32), progress=False) as client:
        client.load()
    assert len(asked) == 2
    for patterns in asked:
        assert all(not p.startswith(("text_encoder", "tokenizer")) for p in patterns)
        assert {p.split("/")[0] for p in patterns} == {*DIT_COMPONENTS, "model_index.json"}
    # First only the configs, to check settings and the encoder; the weights after.
    assert all(p.endswith(".json") for p in asked[0])
    assert not all(p.endswith(".json") for p in asked[1])


# -- embeddings: one fetch per prompt, canonical structured text -----------------------------


def test_same_prompt_other_seeds_fetches_embedding_once(f32_server, tiny_model_dir):
    with (
        SpyEncoder(f32_server.target) as enc,
        DiTClient(enc, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client,
    ):
        a = client.generate(PROMPT, height=SIZE, width=SIZE, steps=1, seed=1)
        b = client.generate(PROMPT, height=SIZE, width=SIZE, steps=1, seed=2, num_images=2)
        assert enc.sent == [[PROMPT]]
        client.generate("a different prompt", height=SIZE, width=SIZE, steps=1, seed=1)
        assert enc.sent == [[PROMPT], ["a different prompt"]]
        assert (client.cache.hits, client.cache.misses) == (1, 2)
    assert len(b.images) == 2
    assert not np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_embedding_cache_is_lru_and_keyed_by_fingerprint():
    cache = EmbeddingCache(max_entries=2)
    t = torch.zeros(1)
    cache.put("fp1", "a", t)
    cache.put("fp1", "b", t)
    assert cache.get("fp1", "a") is t  # "a" is now the most recent
    cache.put("fp1", "c", t)
    assert cache.get("fp1", "b") is None  # evicted
    assert cache.get("fp1", "a") is t and cache.get("fp1", "c") is t
    assert cache.get("fp2", "a") is None  # another model's embedding is another entry
    assert len(cache) == 2


def test_structured_prompt_sends_one_canonical_text(f32_server, tiny_model_dir, tmp_path):
    doc = {
        "scene": "a snowy forest at dawn",
        "subjects": [{"description": "a red fox", "position": "center", "color_palette": ["#C1440E"]}],
        "camera": {"angle": "low", "lens-mm": 85, "f-number": 2.8, "ISO": 200},
    }
    pretty, compact = tmp_path / "pretty.json", tmp_path / "compact.json"
    pretty.write_text(json.dumps(doc, indent=4))
    compact.write_text(json.dumps(doc, separators=(",", ":")))
    canonical = render_structured_prompt(doc)
    common = [
        "--encoder",
        f32_server.target,
        "--model",
        str(tiny_model_dir),
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--steps",
        "1",
        "--seed",
        "1",
        "--quantization",
        "none",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert run_cli(*common, "--prompt-file", str(pretty), "--out", str(tmp_path / "a.png")) == 0
    assert run_cli(*common, "--prompt", compact.read_text(), "--out", str(tmp_path / "b.png")) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    meta = json.loads(Image.open(tmp_path / "a.png").info["flux2-remote"])
    assert meta["prompt"] == canonical and meta["seed"] == 1
    # The library sends exactly that text, and hits its cache for the second spelling.
    with (
        SpyEncoder(f32_server.target) as enc,
        DiTClient(enc, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client,
    ):
        client.generate(json.loads(pretty.read_text()), height=SIZE, width=SIZE, steps=1, seed=1)
        client.generate(json.loads(compact.read_text()), height=SIZE, width=SIZE, steps=1, seed=2)
        assert enc.sent == [[canonical]]


def test_invalid_structured_prompt_exits_2_with_json_path(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scene": "x", "subjects": [{"description": "y", "color_palette": ["#36758"]}]}))
    rc = run_cli("--encoder", "127.0.0.1:1", "--prompt-file", str(bad), "--out", str(tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "$.subjects[0].color_palette[0]" in err and "Traceback" not in err


# -- seeds and output files ------------------------------------------------------------


def test_random_seed_is_reported_and_reproduces(f32_server, tiny_model_dir, tmp_path):
    with DiTClient(f32_server.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client:
        first = client.generate(PROMPT, height=SIZE, width=SIZE, steps=1)
        again = client.generate(PROMPT, height=SIZE, width=SIZE, steps=1, seed=first.seed)
    np.testing.assert_array_equal(pixels(first.images[0]), pixels(again.images[0]))
    paths = first.save(tmp_path / "out" / "x.png")
    assert paths == [tmp_path / "out" / "x.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]  # no temp files left
    assert json.loads(Image.open(paths[0]).info["flux2-remote"])["seed"] == first.seed


def test_lora_scale_zero_is_base_model_and_one_changes_it(f32_server, tiny_model_dir, tmp_path):
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "proj_out"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=64, init_lora_weights=False, target_modules=targets))
    Flux2Pipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer))

    def image(**lora):
        with DiTClient(
            f32_server.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32, **lora), progress=False
        ) as client:
            return pixels(client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=4).images[0])

    base = image()
    np.testing.assert_array_equal(image(lora=str(tmp_path / "lora"), lora_scale=0.0), base)
    assert np.abs(image(lora=str(tmp_path / "lora"), lora_scale=1.0).astype(int) - base.astype(int)).max() > 2


def test_missing_lora_is_a_clear_error(f32_server, tiny_model_dir, tmp_path):
    client = DiTClient(
        f32_server.target, DiTConfig(model=str(tiny_model_dir), lora=str(tmp_path / "nope"), **CPU_F32), progress=False
    )
    with client, pytest.raises(ClientConfigError, match="cannot load LoRA"):
        client.load()


# -- memory modes ----------------------------------------------------------------------


def test_nf4_on_cpu_is_refused_before_anything_loads(tiny_model_dir, tmp_path, capsys):
    # Port 1 is closed: a refusal that came from the encoder would say so instead.
    rc = run_cli(
        "--encoder",
        "127.0.0.1:1",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--quantization",
        "nf4",
        "--device",
        "cpu",
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "needs a CUDA GPU" in err and "Traceback" not in err


def test_prequantized_bnb_model_on_cpu_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "bnb"
    shutil.copytree(tiny_model_dir, folder)
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    cfg_path.write_text(json.dumps(cfg))
    for quantization in ("auto", "nf4"):
        client = DiTClient("127.0.0.1:1", DiTConfig(model=str(folder), device="cpu", quantization=quantization))
        with client, pytest.raises(ClientConfigError, match="needs a CUDA GPU"):
            client.load()
    client = DiTClient("127.0.0.1:1", DiTConfig(model=str(folder), device="cpu", quantization="none"))
    with client, pytest.raises(ClientConfigError, match="pre-quantized"):
        client.load()


def test_int8_on_cpu_is_refused_before_anything_loads(tiny_model_dir, tmp_path, capsys):
    rc = run_cli(
        "--encoder",
        "127.0.0.1:1",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--quantization",
        "int8",
        "--device",
        "cpu",
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "--quantization int8 uses bitsandbytes, which needs a CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "quantization,offload", [("nf4", "sequential"), ("int8", "model"), ("int8", "group"), ("int8", "sequential")]
)
def test_an_offload_the_weights_do_not_support_is_refused_at_once(quantization, offload, tmp_path, capsys):
    # The same table `flux2-dit plan` reads: no row of it recommends these pairs.
    with pytest.raises(ClientConfigError, match=f"--offload {offload} is not supported with"):
        DiTConfig(quantization=quantization, offload=offload).check()
    rc = run_cli(
        "--encoder",
        "127.0.0.1:1",
        "--model",
        "demo",
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--quantization",
        quantization,
        "--offload",
        offload,
    )
    assert rc == 2 and "is not supported with" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["model", "group", "sequential"])
def test_offload_on_cpu_is_refused(mode, tiny_model_dir, tmp_path, capsys):
    rc = run_cli(
        "--encoder",
        "127.0.0.1:1",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--offload",
        mode,
        "--device",
        "cpu",
        "--quantization",
        "none",
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--offload {mode}" in err and "CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("mode", ["model", "group"])
def test_offload_hooks_keep_pixels_identical(mode, f32_server, tiny_model_dir):
    """The diffusers calls behind --offload model/group, run with CPU as the onload device, change nothing."""
    with DiTClient(f32_server.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client:
        base = pixels(client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=9).images[0])
    with DiTClient(f32_server.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client:
        pipe = client.load()
        apply_offload(pipe, mode, torch.device("cpu"))
        offloaded = pixels(client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=9).images[0])
    np.testing.assert_array_equal(offloaded, base)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes NF4 and offload need CUDA")


@needs_cuda
@pytest.mark.parametrize("offload", ["none", "model", "group"])
def test_nf4_on_cuda_generates(offload, server, tiny_model_dir):
    with DiTClient(
        server.target,
        DiTConfig(model=str(tiny_model_dir), device="cuda", quantization="nf4", offload=offload),
        progress=False,
    ) as client:
        result = client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=1)
        assert client.quantization == "nf4"
        assert type(client.pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "Linear4bit"
    assert pixels(result.images[0]).std() > 0


@needs_cuda
def test_int8_on_cuda_generates(server, tiny_model_dir):
    with DiTClient(
        server.target, DiTConfig(model=str(tiny_model_dir), device="cuda", quantization="int8"), progress=False
    ) as client:
        result = client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=1)
        assert client.quantization == "int8"
        assert type(client.pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "Linear8bitLt"
    assert pixels(result.images[0]).std() > 0


@needs_cuda
@pytest.mark.parametrize("offload", ["model", "group", "sequential"])
def test_bf16_offload_on_cuda_matches_resident(offload, server, tiny_model_dir):
    def image(mode):
        with DiTClient(
            server.target,
            DiTConfig(model=str(tiny_model_dir), device="cuda", quantization="none", offload=mode),
            progress=False,
        ) as client:
            return pixels(client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=1).images[0])

    assert np.abs(image(offload).astype(int) - image("none").astype(int)).max() <= 1


# -- clear errors ----------------------------------------------------------------------


def test_encoder_down_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    rc = run_cli(
        "--encoder",
        "127.0.0.1:1",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--quantization",
        "none",
        "--device",
        "cpu",
        "--timeout",
        "5",
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot reach the encoder at 127.0.0.1:1" in err and "Traceback" not in err
    with DiTClient("127.0.0.1:1", DiTConfig(model=str(tiny_model_dir), **CPU_F32)) as client:
        with pytest.raises(EncoderUnavailable):
            client.load()


def test_a_busy_encoder_is_retried_then_generation_goes_on(f32_server, tiny_model_dir, caplog):
    backend = OverloadedFirst(f32_server.backend, failures=2, retry_after_s=0.2)
    with (
        ServerThread(backend, model_id="tiny-f32") as s,
        DiTClient(s.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client,
    ):
        with caplog.at_level("WARNING", logger="dit_client.retry"):
            result = client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=1)
    assert len(result.images) == 1 and backend.calls == 3
    assert caplog.text.count("retrying in") == 2


def test_a_refused_prompt_fails_before_any_weight_is_loaded(f32_server, tiny_model_dir, monkeypatch):
    from diffusers import Flux2Transformer2DModel

    loaded = []
    monkeypatch.setattr(Flux2Transformer2DModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    backend = OverloadedFirst(f32_server.backend, failures=100)
    with (
        ServerThread(backend, model_id="tiny-f32") as s,
        DiTClient(
            s.target,
            DiTConfig(model=str(tiny_model_dir), **CPU_F32),
            progress=False,
            retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01),
        ) as client,
        pytest.raises(EncoderOverloaded, match="busy"),
    ):
        client.generate(PROMPT, height=SIZE, width=SIZE, steps=STEPS, seed=1)
    assert loaded == []


@pytest.mark.parametrize(
    "size,says",
    [
        (dict(height=SIZE + 1), "height 33 must be a multiple of"),
        (dict(width=100_000), "width 100000 must be an integer in"),
    ],
)
def test_a_bad_size_fails_before_the_encode_and_the_load(f32_server, tiny_model_dir, monkeypatch, size, says):
    from diffusers import Flux2Transformer2DModel

    loaded = []
    monkeypatch.setattr(Flux2Transformer2DModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    backend = OverloadedFirst(f32_server.backend, failures=0)
    with (
        ServerThread(backend, model_id="tiny-f32") as s,
        DiTClient(s.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client,
    ):
        with pytest.raises(ClientConfigError, match=says):
            client.generate(PROMPT, **{"height": SIZE, "width": SIZE, **size}, steps=STEPS, seed=1)
    assert backend.calls == 0 and loaded == []


class _RefuseAll(grpc.GenericRpcHandler):
    def service(self, handler_call_details):
        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")

        return grpc.unary_unary_rpc_method_handler(refuse)


def test_refused_key_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[_RefuseAll()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        rc = run_cli(
            "--encoder",
            f"127.0.0.1:{port}",
            "--api-key",
            "wrong",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path / "x.png"),
            "--quantization",
            "none",
            "--device",
            "cpu",
        )
        err = capsys.readouterr().err
        with DiTClient(f"127.0.0.1:{port}", DiTConfig(model=str(tiny_model_dir), **CPU_F32)) as client:
            with pytest.raises(Unauthenticated):
                client.load()
    finally:
        server.stop(0)
    assert rc == 1
    assert "invalid API key" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


class _NarrowBackend:
    """An encoder of another model family: 3 x 8 = 24-wide embeddings (the tiny DiT reads 48)."""

    spec = FLUX2_DEV
    fingerprint = "other:0000000000000000"
    hidden_size = 8
    num_hidden_layers = 30
    dtype = torch.float32
    quantization = "none"
    compute = "exact"
    device = torch.device("cpu")
    padding_side = "left"

    def encode(self, prompts):
        return EncodedBatch(torch.zeros(len(prompts), 512, 24), [1] * len(prompts), [False] * len(prompts), 0, 0)


def test_embedding_width_mismatch_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from diffusers import Flux2Transformer2DModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the encoder was checked")

    monkeypatch.setattr(Flux2Transformer2DModel, "from_pretrained", refuse)
    with ServerThread(_NarrowBackend(), model_id="narrow") as server:
        rc = run_cli(
            "--encoder",
            server.target,
            "--model",
            str(tiny_model_dir),
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path / "x.png"),
            "--quantization",
            "none",
            "--device",
            "cpu",
        )
        err = capsys.readouterr().err
        with DiTClient(server.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32)) as client:
            with pytest.raises(EncoderMismatch, match="joint_attention_dim 48"):
                client.load()
    assert rc == 2  # a settings mistake (which server, which model), like the other refusals before loading
    assert "serves no model for this DiT" in err and "joint_attention_dim 48" in err and "24 wide" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--height", "30", "multiple of 4"),
        ("--width", "0", "must be an integer in"),
        ("--steps", "0", "steps 0"),
        ("--num-images", "99", "num_images 99"),
        ("--guidance", "-1", "guidance"),
        ("--seed", "-5", "seed -5"),
    ],
)
def test_bad_generation_arguments_exit_2(flag, value, message, f32_server, tiny_model_dir, tmp_path, capsys):
    args = {"--height": str(SIZE), "--width": str(SIZE), "--steps": "1", flag: value}
    flat = [x for kv in args.items() for x in kv]
    rc = run_cli(
        "--encoder",
        f32_server.target,
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--quantization",
        "none",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
        *flat,
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err


def test_unknown_model_folder_exits_2(tmp_path, capsys):
    rc = run_cli(
        "--encoder",
        "127.0.0.1:1",
        "--model",
        str(tmp_path / "missing"),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--device",
        "cpu",
        "--quantization",
        "none",
    )
    assert rc == 2
    assert "no such folder" in capsys.readouterr().err


def test_reference_image_errors(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), "red").save(good)
    assert [im.mode for im in load_reference_images([good])] == ["RGB"]
    with pytest.raises(ClientConfigError, match=f"at most {MAX_REFERENCE_IMAGES}"):
        load_reference_images([good] * (MAX_REFERENCE_IMAGES + 1))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ClientConfigError, match="not an image Pillow can read"):
        load_reference_images([text])
    with pytest.raises(ClientConfigError, match="does not exist"):
        load_reference_images([tmp_path / "missing.png"])
    with pytest.raises(ClientConfigError, match="is a directory"):
        load_reference_images([tmp_path])
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (64, 80), (1, 2, 3, 4)).save(rgba)
    assert load_reference_images([rgba])[0].mode == "RGB"
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8)).save(tiny)
    with pytest.raises(ClientConfigError, match="too small"):
        load_reference_images([tiny])
    strip = tmp_path / "strip.png"
    Image.new("RGB", (64 * 9, 64)).save(strip)
    with pytest.raises(ClientConfigError, match="Aspect ratio"):
        load_reference_images([strip])


def test_eleven_reference_images_exit_2(f32_server, tiny_model_dir, tmp_path, capsys):
    ref = tmp_path / "r.png"
    Image.new("RGB", (64, 64)).save(ref)
    refs = [x for _ in range(MAX_REFERENCE_IMAGES + 1) for x in ("--image", str(ref))]
    rc = run_cli(
        "--encoder",
        f32_server.target,
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.png"),
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--quantization",
        "none",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
        *refs,
    )
    assert rc == 2
    assert "at most 10" in capsys.readouterr().err


def test_unknown_attention_backend_is_a_clear_error(f32_server, tiny_model_dir):
    client = DiTClient(
        f32_server.target,
        DiTConfig(model=str(tiny_model_dir), attention_backend="warp-drive", **CPU_F32),
        progress=False,
    )
    with client, pytest.raises(ClientConfigError, match="unknown attention backend 'warp-drive'"):
        client.load()


def test_attention_backend_native_keeps_pixels(f32_server, tiny_model_dir):
    def image(**extra):
        with DiTClient(
            f32_server.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32, **extra), progress=False
        ) as client:
            return pixels(client.generate(PROMPT, height=SIZE, width=SIZE, steps=1, seed=2).images[0])

    # "native" is PyTorch SDPA through diffusers' dispatcher: the same numbers as the default path.
    np.testing.assert_array_equal(image(attention_backend="native"), image())


def test_output_must_be_png(f32_server, tiny_model_dir, tmp_path, capsys):
    rc = run_cli(
        "--encoder",
        f32_server.target,
        "--model",
        str(tiny_model_dir),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "x.jpg"),
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--steps",
        "1",
        "--quantization",
        "none",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
    )
    assert rc == 2
    assert "must end in .png" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_auto_quantization_is_none_on_cpu_and_prequantized_is_kept():
    cpu = torch.device("cpu")
    assert resolve_quantization(DiTConfig(quantization="auto"), {"joint_attention_dim": 48}, cpu) == "none"
    assert resolve_quantization(DiTConfig(quantization="none"), {}, cpu) == "none"
    gguf = {"quantization_config": {"quant_method": "gguf"}}
    assert resolve_quantization(DiTConfig(quantization="auto"), gguf, cpu) == "prequantized"


def test_bad_config_values_are_refused():
    for kwargs in ({"dtype": "int8"}, {"quantization": "fp8"}, {"offload": "disk"}, {"embedding_cache_size": -1}):
        with pytest.raises(ClientConfigError):
            DiTConfig(**kwargs).check()
