"""The client side of FLUX.2 [klein] and of servers with several models.

- ``RemoteTextEncoder`` names a server model per call (or as its default) and
  caches ``GetInfo`` per model.
- ``flux2-dit generate`` picks the server model from the DiT's pipeline class
  and ``joint_attention_dim``, refuses a mismatch before any weight loads, and
  its pixels equal ``Flux2KleinPipeline`` run locally with its own text encoder
  (distilled, and base with classifier-free guidance on a negative prompt).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ModelConfig, ServerConfig
from common.demo import TinyKleinSpec, build_tiny_klein
from common.encoder_spec import FLUX2_DEV, FLUX2_KLEIN
from common.errors import InvalidRequest
from common.model_source import resolve_model
from dit_client import cli
from dit_client.frames import EncoderInfo, ModelInfo
from dit_client.generate import ClientConfigError, DiTClient, DiTConfig
from dit_client.model_match import EncoderMismatch, PipelineKind, choose_encoder_model
from dit_client.remote import RemoteTextEncoder
from encoder_server.models import served_pad_table
from encoder_server.server import LoadedModel
from encoder_server.text_encoder import TruncatedMistral3Encoder, TruncatedTextEncoder
from tests.helpers import ServerThread

PROMPT = "a red fox sitting in fresh snow"
SIZE = 32
STEPS = 2
CPU_F32 = dict(device="cpu", dtype="float32", quantization="none")
TEXT = ("text_encoder", "tokenizer")


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    """A complete tiny Flux2KleinPipeline folder, step-distilled (like FLUX.2-klein-4B)."""
    return build_tiny_klein(tmp_path_factory.mktemp("klein") / "tiny-klein", TinyKleinSpec())


@pytest.fixture(scope="module")
def klein_base_dir(klein_dir, tmp_path_factory):
    """The same weights as a base model (like FLUX.2-klein-base-4B): model_index.json says is_distilled false."""
    folder = tmp_path_factory.mktemp("klein-base") / "tiny-klein-base"
    shutil.copytree(klein_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["is_distilled"] = False
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def backends(tiny_model_dir, klein_dir):
    """Both encoders in float32, the client pipeline's dtype (exactness on the CPU)."""
    dev = TruncatedMistral3Encoder(
        resolve_model(str(tiny_model_dir), components=TEXT), device=torch.device("cpu"), dtype=torch.float32
    )
    klein = TruncatedTextEncoder(
        resolve_model(str(klein_dir), components=TEXT), device=torch.device("cpu"), dtype=torch.float32
    )
    return {"dev": dev, "klein": klein}


def serve(backends, *names):
    config = ServerConfig(models=tuple(ModelConfig(n, f"tiny-{n}") for n in names))
    # Each with its pad table, as `serve` loads them: dev's (left padding) elides, klein's (right) has none.
    models = [LoadedModel(n, backends[n], f"tiny-{n}", pad_table=served_pad_table(backends[n])) for n in names]
    return ServerThread(None, config, models=models)


@pytest.fixture(scope="module")
def studio(backends):
    """One server, two models: 'dev' and 'klein' (like `serve --model dev=... --model klein=...`)."""
    with serve(backends, "dev", "klein") as s:
        yield s


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB"))


def run_cli(*args: str) -> int:
    return cli.main(["generate", *args])


def generate_args(server, model, out, *extra):
    return (
        "--encoder",
        server.target,
        "--model",
        str(model),
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
        "--seed",
        "7",
        "--quantization",
        "none",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    )


def local_klein(folder):
    """diffusers' own Flux2KleinPipeline with its own Qwen3 text encoder: the ground truth."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def no_weights(monkeypatch):
    """Loading any DiT weights fails the test: refusals must come first."""
    from diffusers import Flux2Transformer2DModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(Flux2Transformer2DModel, "from_pretrained", refuse)


# -- RemoteTextEncoder and several models ----------------------------------------


def test_info_lists_the_models_and_is_cached_per_model(studio, backends, monkeypatch):
    with RemoteTextEncoder(studio.target) as enc:
        calls = []
        real = enc.connection.get_info
        monkeypatch.setattr(enc.connection, "get_info", lambda model="": calls.append(model) or real(model))
        info = enc.info()
        klein = enc.info(model="klein")
        assert enc.info(model="klein") is klein and enc.info() is info
        assert calls == ["", "klein"]
    assert info.model_names == ("dev", "klein")
    assert info.model_name == "dev" and info.family == "flux2-dev"
    assert klein.model_name == "klein" and klein.family == "flux2-klein"
    assert klein.fingerprint == backends["klein"].fingerprint
    assert klein.hidden_states_layers == (9, 18, 27) and klein.computed_layers == 27
    assert info.model("klein").embedding_dim == klein.embedding_dim and info.model("schnell") is None


def test_encode_names_the_model_per_call_or_by_default(studio, backends):
    prompts = ["a red fox", "a blue bird"]
    expected = {n: backends[n].encode(prompts).embeddings for n in ("dev", "klein")}
    with RemoteTextEncoder(studio.target) as enc:
        for name in ("dev", "klein"):
            got, meta = enc.encode_with_metadata(prompts, model=name)
            assert torch.equal(got, expected[name])
            assert {m.model_fingerprint for m in meta} == {backends[name].fingerprint}
            # Rows were left out for dev (its table) and not for klein (right padding: none).
            assert [m.pad_rows_elided > 0 for m in meta] == [name == "dev"] * len(prompts)
        with pytest.raises(InvalidRequest, match=r"serves 2 models \(dev, klein\); name one: model=NAME"):
            enc.encode(prompts)
        with pytest.raises(InvalidRequest, match=r"serves 2 models \(dev, klein\)"):
            list(enc.encode_stream(prompts))
        with pytest.raises(InvalidRequest, match="dev, klein"):
            enc.encode(prompts, model="schnell")
    with RemoteTextEncoder(studio.target, model="klein") as enc:
        assert torch.equal(enc.encode(prompts), expected["klein"])
        assert torch.equal(enc.encode(prompts, model="dev"), expected["dev"])  # a call's name wins
        streamed = sorted(enc.encode_stream(prompts * 3, batch_size=2), key=lambda r: r.index)
        assert [r.index for r in streamed] == list(range(6))
        for r in streamed:
            assert torch.equal(r.embedding, expected["klein"][r.index % 2])


def test_one_model_server_needs_no_name(backends):
    with serve(backends, "klein") as s, RemoteTextEncoder(s.target) as enc:
        assert torch.equal(enc.encode(["x"]), backends["klein"].encode(["x"]).embeddings)
        assert enc.info().models[0].name == "klein" and enc.info().family == "flux2-klein"


# -- choosing the server model ----------------------------------------------------


def model_info(name, family, width, fingerprint=None, model_id=""):
    return ModelInfo(
        name=name,
        model_id=model_id,
        fingerprint=fingerprint or f"{family}:{name}",
        family=family,
        hidden_states_layers=(),
        num_hidden_layers=0,
        computed_layers=0,
        hidden_size=width // 3,
        embedding_dim=width,
        max_sequence_length=512,
        dtype=torch.bfloat16,
        quantization="none",
        device="cpu",
        demo=False,
        padding_side="left",
    )


def server_info(*models):
    first = models[0]
    return EncoderInfo(
        model_id=first.model_id,
        revision="",
        fingerprint=first.fingerprint,
        hidden_states_layers=(),
        num_hidden_layers=0,
        computed_layers=0,
        hidden_size=0,
        embedding_dim=first.embedding_dim,
        max_sequence_length=512,
        dtype=torch.bfloat16,
        quantization="none",
        device="cpu",
        server_version="",
        demo=False,
        padding_side="left",
        models=tuple(models),
    )


DEV_DIT = PipelineKind("Flux2Pipeline", FLUX2_DEV, False, 15360)
KLEIN_4B = PipelineKind("Flux2KleinPipeline", FLUX2_KLEIN, True, 7680)
STUDIO = server_info(
    model_info("dev", "flux2-dev", 15360),
    model_info("klein-4b", "flux2-klein", 7680),
    model_info("klein-9b", "flux2-klein", 12288),
)


@pytest.mark.parametrize(
    "kind, wanted, expected",
    [
        (DEV_DIT, None, "dev"),
        (KLEIN_4B, None, "klein-4b"),
        (PipelineKind("Flux2KleinPipeline", FLUX2_KLEIN, False, 12288), None, "klein-9b"),
        (KLEIN_4B, "klein-4b", "klein-4b"),
    ],
)
def test_the_model_is_chosen_by_family_and_width(kind, wanted, expected):
    assert choose_encoder_model(STUDIO, kind, wanted=wanted, target="box", dit_model="m") == expected


@pytest.mark.parametrize(
    "info, kind, wanted, message",
    [
        (
            server_info(model_info("klein", "flux2-klein", 7680)),
            DEV_DIT,
            None,
            "serves no model for this DiT: m is a Flux2Pipeline (flux2-dev, joint_attention_dim 15360), and it serves: "
            "klein (flux2-klein, 7680 wide",
        ),
        (STUDIO, DEV_DIT, "klein-4b", "makes 7680-wide embeddings, but m is a Flux2Pipeline"),
        (server_info(model_info("k", "flux2-klein", 15360)), DEV_DIT, "k", "is a flux2-klein encoder"),
        (STUDIO, KLEIN_4B, "schnell", "has no model named 'schnell'; it serves: dev (flux2-dev"),
        (
            server_info(model_info("a", "flux2-klein", 7680), model_info("b", "flux2-klein", 7680)),
            KLEIN_4B,
            None,
            "choose one with --encoder-model NAME",
        ),
    ],
)
def test_mismatches_say_what_the_server_serves(info, kind, wanted, message):
    with pytest.raises(EncoderMismatch, match=None) as err:
        choose_encoder_model(info, kind, wanted=wanted, target="box", dit_model="m")
    assert message in str(err.value)


def test_same_encoder_under_two_names_or_named_like_the_dit_is_not_ambiguous():
    twins = server_info(model_info("a", "flux2-klein", 7680, "fp"), model_info("b", "flux2-klein", 7680, "fp"))
    assert choose_encoder_model(twins, KLEIN_4B, wanted=None, target="box", dit_model="m") == "a"
    named = server_info(model_info("a", "flux2-klein", 7680), model_info("b", "flux2-klein", 7680, model_id="org/k"))
    assert choose_encoder_model(named, KLEIN_4B, wanted=None, target="box", dit_model="org/k") == "b"


# -- generate: pixel parity -------------------------------------------------------


def test_klein_png_equals_local_klein_pipeline(studio, klein_dir, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert run_cli(*generate_args(studio, klein_dir, out)) == 0
    assert "(klein)" in capsys.readouterr().out  # the server model it picked
    expected = local_klein(klein_dir)(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    got = pixels(out)
    assert got.shape == (SIZE, SIZE, 3) and got.std() > 0
    np.testing.assert_array_equal(got, pixels(expected))


def test_dev_dit_picks_dev_on_the_same_server(studio, tiny_model_dir):
    with DiTClient(studio.target, DiTConfig(model=str(tiny_model_dir), **CPU_F32), progress=False) as client:
        result = client.generate(PROMPT, height=SIZE, width=SIZE, steps=1, seed=1)
    assert result.encoder_model == "dev" and result.parameters["pipeline"] == "Flux2Pipeline"


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_base_klein_uses_cfg_with_the_negative_prompt_and_equals_local(studio, klein_base_dir, negative, tmp_path):
    out = tmp_path / "fox.png"
    assert run_cli(*generate_args(studio, klein_base_dir, out, "--guidance", "3.5", "--negative-prompt", negative)) == 0
    pipe = local_klein(klein_base_dir)
    assert not pipe.config.is_distilled
    # Flux2KleinPipeline's own negative prompt is the empty string; another goes in as its embedding,
    # made by the same local text encoder.
    kwargs = {}
    if negative:
        kwargs["negative_prompt_embeds"] = pipe.encode_prompt(negative, device=torch.device("cpu"))[0]
    common = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS)
    expected = pipe(**common, guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(7), **kwargs)
    np.testing.assert_array_equal(pixels(out), pixels(expected.images[0]))
    # CFG ran: without it (guidance 1) the picture differs.
    without = pipe(**common, guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert not np.array_equal(pixels(out), pixels(without))


def test_base_klein_without_a_negative_embedding_is_refused_before_weights(studio, klein_base_dir, no_weights):
    with DiTClient(studio.target, DiTConfig(model=str(klein_base_dir), **CPU_F32), progress=False) as client:
        with pytest.raises(ClientConfigError, match="needs a negative prompt's embedding"):
            client.generate(PROMPT, height=SIZE, width=SIZE, steps=1, seed=1, negative_prompt=None)


# -- generate: refusals before any weight loads ------------------------------------


def test_klein_dit_against_a_dev_only_server_exits_2(backends, klein_dir, tmp_path, capsys, no_weights):
    with serve(backends, "dev") as s:
        rc = run_cli(*generate_args(s, klein_dir, tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "serves no model for this DiT" in err and "Flux2KleinPipeline (flux2-klein" in err
    assert "it serves: dev (flux2-dev, 48 wide" in err


def test_dev_dit_against_a_klein_only_server_exits_2(backends, tiny_model_dir, tmp_path, capsys, no_weights):
    # The tiny models are both 48 wide: the family tells them apart, as the width does for real ones.
    with serve(backends, "klein") as s:
        rc = run_cli(*generate_args(s, tiny_model_dir, tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert rc == 2 and "Flux2Pipeline (flux2-dev" in err and "klein (flux2-klein, 48 wide" in err


@pytest.mark.parametrize("name, says", [("dev", "is a flux2-dev encoder"), ("schnell", "no model named 'schnell'")])
def test_encoder_model_flag_is_checked_too(studio, klein_dir, tmp_path, capsys, no_weights, name, says):
    rc = run_cli(*generate_args(studio, klein_dir, tmp_path / "x.png", "--encoder-model", name))
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err


def test_width_mismatch_with_the_right_family_exits_2(studio, klein_dir, tmp_path, capsys, no_weights):
    wide = tmp_path / "wide-klein"
    shutil.copytree(klein_dir, wide)
    config = json.loads((wide / "transformer" / "config.json").read_text())
    config["joint_attention_dim"] = 96
    (wide / "transformer" / "config.json").write_text(json.dumps(config))
    rc = run_cli(*generate_args(studio, wide, tmp_path / "x.png", "--encoder-model", "klein"))
    err = capsys.readouterr().err
    assert rc == 2 and "makes 48-wide embeddings, but" in err and "joint_attention_dim 96" in err


def test_inpaint_pipeline_is_not_a_generate(studio, klein_dir, tmp_path, capsys, no_weights):
    folder = tmp_path / "inpaint"
    shutil.copytree(klein_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "Flux2KleinInpaintPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    rc = run_cli(*generate_args(studio, folder, tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert rc == 2 and "Flux2KleinInpaintPipeline" in err and "runs Flux2Pipeline, Flux2KleinPipeline" in err


def test_info_command_lists_the_models(studio, capsys):
    assert cli.main(["info", "--encoder", studio.target, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["models"]] == ["dev", "klein"]
    assert data["models"][1]["family"] == "flux2-klein" and data["models"][1]["dtype"] == "float32"
    assert cli.main(["info", "--encoder", studio.target, "--encoder-model", "klein"]) == 0
    out = capsys.readouterr().out
    assert "model_name           klein" in out and "family               flux2-klein" in out
    assert "models               2" in out


# -- precompute: one store per model -------------------------------------------------


def test_precompute_writes_a_store_per_model(studio, backends, klein_dir, tmp_path, capsys):
    from dit_client.training.store import EmbeddingStore

    captions = tmp_path / "captions.txt"
    captions.write_text("a red fox\na blue bird\n")
    common = ["precompute", "--encoder", studio.target, "--captions", str(captions), "--no-progress"]
    # The DiT's configs pick the server model, as generate does; or name it.
    assert cli.main([*common, "--out", str(tmp_path / "klein"), "--model", str(klein_dir)]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "dev"), "--encoder-model", "dev"]) == 0
    for name in ("klein", "dev"):
        store = EmbeddingStore(tmp_path / name, expected_model=name, expected_fingerprint=backends[name].fingerprint)
        assert store.info.family == f"flux2-{name}"
        assert torch.equal(store["a blue bird"], backends[name].encode(["a blue bird"]).embeddings[0])
    capsys.readouterr()
    # Another model's embeddings never go into a store.
    assert cli.main([*common, "--out", str(tmp_path / "klein"), "--encoder-model", "dev"]) == 1
    err = capsys.readouterr().err
    assert "one store never mixes models" in err and "model 'klein' (flux2-klein" in err
    # Two models and no name: the server's refusal, listing them.
    assert cli.main([*common, "--out", str(tmp_path / "none")]) == 1
    assert "serves 2 models (dev, klein); name the one to precompute with" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_defaults_follow_the_pipeline():
    assert (DEV_DIT.default_steps(), DEV_DIT.default_guidance()) == (28, 4.0)
    assert (KLEIN_4B.default_steps(), KLEIN_4B.default_guidance()) == (4, 1.0)
    base = PipelineKind("Flux2KleinPipeline", FLUX2_KLEIN, False, 7680)
    assert (base.default_steps(), base.default_guidance()) == (50, 4.0) and base.uses_cfg(4.0)
    assert not base.uses_cfg(1.0) and not KLEIN_4B.uses_cfg(4.0)
    kv = PipelineKind("Flux2KleinKVPipeline", FLUX2_KLEIN, True, 7680)
    assert not kv.takes_guidance() and not kv.uses_cfg(4.0)


def test_klein_kv_pipeline_png_equals_local(studio, klein_dir, tmp_path, capsys):
    from diffusers import Flux2KleinKVPipeline

    folder = tmp_path / "kv"
    shutil.copytree(klein_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "Flux2KleinKVPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "kv.png"
    assert run_cli(*generate_args(studio, folder, out)) == 0
    pipe = Flux2KleinKVPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    np.testing.assert_array_equal(pixels(out), pixels(expected))
    # It takes no guidance: asking for one is refused before any weight loads.
    assert run_cli(*generate_args(studio, folder, tmp_path / "x.png", "--guidance", "3")) == 2
    assert "takes no guidance" in capsys.readouterr().err


def test_training_helper_names_the_model_and_checks_the_store(studio, backends, tmp_path):
    from common.errors import IntegrityError
    from dit_client.training.remote_fn import remote_text_encoder
    from dit_client.training.store import EmbeddingStore

    captions = tmp_path / "captions.txt"
    captions.write_text("a blue bird\n")
    assert (
        cli.main(
            [
                "precompute",
                "--encoder",
                studio.target,
                "--captions",
                str(captions),
                "--no-progress",
                "--out",
                str(tmp_path / "klein"),
                "--encoder-model",
                "klein",
            ]
        )
        == 0
    )
    store = EmbeddingStore(tmp_path / "klein", expected_model="klein")
    with RemoteTextEncoder(studio.target) as enc:
        embeds, text_ids = remote_text_encoder(["a blue bird", "a new one"], encoder=enc, model="klein", store=store)
        assert torch.equal(embeds, backends["klein"].encode(["a blue bird", "a new one"]).embeddings)
        assert text_ids.shape == (2, 512, 4)
        with pytest.raises(IntegrityError, match="fingerprint"):
            remote_text_encoder(["x"], encoder=enc, model="dev", store=store)


def test_encode_command_takes_the_encoder_model(studio, backends, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "klein.safetensors"
    assert (
        cli.main(
            [
                "encode",
                "--encoder",
                studio.target,
                "--encoder-model",
                "klein",
                "--prompt",
                "a red fox",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert backends["klein"].fingerprint in capsys.readouterr().out
    assert torch.equal(load_file(out)["prompt_embeds"], backends["klein"].encode(["a red fox"]).embeddings)
    # Without a name, a two-model server says which names it has.
    assert (
        cli.main(["encode", "--encoder", studio.target, "--prompt", "x", "--out", str(tmp_path / "x.safetensors")]) == 1
    )
    assert (
        "serves 2 models (dev, klein); name one: model=NAME (flux2-dit: --encoder-model NAME)"
        in capsys.readouterr().err
    )
