"""Prompt upsampling: the reference's texts, one copy of the weights, the policy, the limits."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import pytest
import torch
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

from common.config import ServerConfig, UpsamplingConfig
from common.demo import TinyFlux2Spec, build_tiny_flux2, end_generation_soon
from common.errors import (
    Cancelled,
    DeadlineExceeded,
    EncoderOverloaded,
    InvalidRequest,
    PayloadTooLarge,
    UpsamplingUnavailable,
)
from common.model_source import resolve_model
from common.protocol import pb2
from encoder_server.admission import GRPC_METHODS
from encoder_server.text_encoder import TruncatedMistral3Encoder, TruncatedTextEncoder
from encoder_server.upsampling import (
    DEFAULT_TEMPERATURE,
    GenerationQueue,
    Upsampler,
    check_temperature,
    decode_images,
    reference_upsample,
)
from tests.helpers import Gate, GatedUpsampler

PROMPTS = [
    "a red fox in fresh snow",
    "Ünïcödé: 東京の夜景 🦊 and a literal [IMG] marker",
    "",
]


@pytest.fixture(scope="module")
def shallow_model_dir(tmp_path_factory):
    """A tiny FLUX.2 text encoder two layers deep: generating 512 tokens is then quick on a CPU."""
    return build_tiny_flux2(tmp_path_factory.mktemp("tiny-2-layers"), TinyFlux2Spec(text_layers=2, with_dit=False))


def _load_full(folder, dtype=torch.bfloat16, *, ends_soon=True):
    """The tiny text encoder, whole, and its tokenizer; with ``ends_soon``, bent so answers end
    within tens of tokens (see :func:`common.demo.end_generation_soon`)."""
    model = Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=dtype).eval()
    if ends_soon:
        end_generation_soon(model)
    return model, AutoTokenizer.from_pretrained(folder / "tokenizer")


# -- the reference's texts -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_seeded_text_to_image_equals_the_reference(shallow_model_dir, dtype):
    model, tokenizer = _load_full(shallow_model_dir, dtype)
    upsampler = Upsampler(model, tokenizer)
    ours = upsampler.upsample(PROMPTS, seed=1234)
    theirs = reference_upsample(model, tokenizer, PROMPTS, seed=1234)
    assert ours.texts == theirs
    assert ours.seed == 1234
    assert any(ours.texts)
    assert all(0 < n < 512 for n in ours.generated_tokens)  # each ended with its EOS, which is counted
    # The seed is what decides: another seed gives other texts (so the equality above can fail).
    assert upsampler.upsample(PROMPTS, seed=1235).texts != ours.texts


def test_unseeded_calls_draw_a_seed_that_reproduces_them(shallow_model_dir):
    model, tokenizer = _load_full(shallow_model_dir)
    upsampler = Upsampler(model, tokenizer, max_new_tokens=24)
    first = upsampler.upsample(PROMPTS[:2])
    second = upsampler.upsample(PROMPTS[:2])
    assert first.seed != second.seed
    assert upsampler.upsample(PROMPTS[:2], seed=first.seed).texts == first.texts


def test_temperature_reaches_generation(shallow_model_dir):
    model, tokenizer = _load_full(shallow_model_dir, ends_soon=False)
    upsampler = Upsampler(model, tokenizer, max_new_tokens=16)
    hot = upsampler.upsample(["a cat"], seed=7, temperature=3.0).texts
    cold = upsampler.upsample(["a cat"], seed=7, temperature=0.05).texts
    assert hot != cold


# -- one copy of the weights -----------------------------------------------------------


def test_embeddings_stay_bit_exact_on_the_shared_weights(tiny_model_dir):
    """With --upsampling the embedding path runs on the whole model's first 30 layers: same bits, no copy."""
    from encoder_server.upsampling import upsampler_for_backend
    from tests.encoder_server.test_text_encoder import PROMPTS as ENCODE_PROMPTS
    from tests.encoder_server.test_text_encoder import reference

    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    backend = TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16, upsampling=True)
    assert torch.equal(
        backend.encode(ENCODE_PROMPTS).embeddings, reference(tiny_model_dir, ENCODE_PROMPTS, torch.bfloat16)
    )
    # The embedding path's modules are the generator's own: one copy of layers 1-30.
    full = backend.generator.model.language_model
    assert backend._lm.embed_tokens is full.embed_tokens
    assert len(backend._lm.layers) == 30 and len(full.layers) == 40
    assert all(ours is theirs for ours, theirs in zip(backend._lm.layers, full.layers[:30], strict=True))
    shared = {p.data_ptr() for p in backend._lm.parameters()}
    assert shared <= {p.data_ptr() for p in backend.generator.parameters()}
    # Same function, same fingerprint: caches and stores keep working across the flag.
    plain = TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert backend.fingerprint == plain.fingerprint
    assert plain.generator is None
    upsampler = upsampler_for_backend(backend, UpsamplingConfig(enabled=True, max_new_tokens=4))
    assert upsampler.model is backend.generator
    assert upsampler_for_backend(backend, UpsamplingConfig()) == "the server was started without --upsampling"
    assert "without its generator" in upsampler_for_backend(plain, UpsamplingConfig(enabled=True))
    assert not upsampler.takes_images and "processor_config.json" in upsampler.no_images_reason
    # What `serve --upsampling` wires up from such a backend.
    from tests.helpers import ServerThread

    config = ServerConfig(upsampling=UpsamplingConfig(enabled=True, max_new_tokens=2))
    with ServerThread(backend, config) as server, _client(server) as client:
        assert client.connection.get_info().models[0].upsampling
        result = client.upsample_with_metadata(["a fox"], seed=3)
        assert len(result.texts) == 1 and result.generated_tokens[0] <= 2 and result.seed == 3
        assert client.encode(ENCODE_PROMPTS[:1]).shape == (1, 512, 48)


def test_klein_has_no_upsampling_and_says_why(tmp_path):
    from common.demo import TinyKleinSpec, build_tiny_klein

    folder = build_tiny_klein(tmp_path / "klein", TinyKleinSpec(with_dit=False))
    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    backend = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.bfloat16, upsampling=True)
    assert backend.generator is None
    assert "no prompt upsampling" in backend.upsampling_note and "flux2-klein" in backend.upsampling_note
    assert backend.encode(["a fox"]).embeddings.shape[0] == 1  # embeddings are served as ever


# -- request checks ----------------------------------------------------------------------


def _png(width=32, height=24, fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_images_are_decoded_within_the_limits():
    config = UpsamplingConfig(max_images_per_prompt=2, max_image_bytes=50_000, max_image_pixels=64 * 64)
    images = decode_images([_png(), _png(fmt="JPEG")], config, prompt_index=0)
    assert [im.size for im in images] == [(32, 24), (32, 24)] and all(im.mode == "RGB" for im in images)
    with pytest.raises(PayloadTooLarge, match="3 images; the limit is 2"):
        decode_images([_png()] * 3, config, prompt_index=0)
    with pytest.raises(PayloadTooLarge, match="image 0 of prompt 1 is 100x100 pixels"):
        decode_images([_png(100, 100)], config, prompt_index=1)
    with pytest.raises(PayloadTooLarge, match="bytes; the limit is 50000"):
        decode_images([b"\x89PNG" + b"\0" * 60_000], config, prompt_index=0)
    with pytest.raises(InvalidRequest, match="cannot be decoded as PNG or JPEG"):
        decode_images([b"not an image at all"], config, prompt_index=0)
    with pytest.raises(InvalidRequest, match="cannot be decoded as PNG or JPEG"):
        decode_images([_png(fmt="GIF")], config, prompt_index=0)  # a format outside the allow-list
    with pytest.raises(InvalidRequest, match="cannot be decoded"):
        decode_images([_png()[:60]], config, prompt_index=0)  # a truncated file
    with pytest.raises(InvalidRequest, match="is empty"):
        decode_images([b""], config, prompt_index=0)


@pytest.mark.parametrize("bad", [0.0, -0.5, 5.01, 1e9, float("nan"), float("inf")])
def test_temperatures_outside_the_range_are_refused(bad):
    with pytest.raises(InvalidRequest, match="temperature"):
        check_temperature(bad, UpsamplingConfig())


def test_temperature_defaults_to_the_reference():
    assert check_temperature(None, UpsamplingConfig()) == DEFAULT_TEMPERATURE == 0.15
    assert check_temperature(5.0, UpsamplingConfig()) == 5.0


def test_prompts_longer_than_the_reference_reads_are_refused(shallow_model_dir):
    model, tokenizer = _load_full(shallow_model_dir)
    with pytest.raises(PayloadTooLarge, match="upsampling reads at most 2048"):
        Upsampler(model, tokenizer).upsample(["x" * 3000], seed=1)  # one token per byte


# -- the queue: one generation at a time, cancellable, bounded -----------------------------


def test_a_cancelled_call_stops_its_generation_and_frees_the_generator():
    async def scenario():
        queue = GenerationQueue(max_queued=4)
        first, second = Gate(), Gate()
        task = asyncio.create_task(queue.run(first))
        await asyncio.to_thread(first.started.wait, 5)
        follower = asyncio.create_task(queue.run(second))
        await asyncio.sleep(0)
        assert not second.started.is_set()  # one generation at a time
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(first.stopped.wait, 5)
        assert await asyncio.to_thread(second.started.wait, 5)  # the generator went to the next call
        second.release.set()
        assert await follower == "done"
        queue.close()

    asyncio.run(scenario())


def test_a_deadline_stops_generation_with_deadline_exceeded():
    async def scenario():
        queue = GenerationQueue(max_queued=4)
        gate = Gate()
        with pytest.raises(DeadlineExceeded, match="deadline passed during generation"):
            await queue.run(gate, deadline=time.monotonic() + 0.2)
        assert gate.stopped.is_set()
        queue.close()

    asyncio.run(scenario())


def test_a_full_queue_refuses_with_a_retry_hint():
    async def scenario():
        queue = GenerationQueue(max_queued=1)
        running, waiting = Gate(), Gate()
        first = asyncio.create_task(queue.run(running))
        await asyncio.to_thread(running.started.wait, 5)
        second = asyncio.create_task(queue.run(waiting))
        await asyncio.sleep(0)
        assert queue.waiting == 1
        with pytest.raises(EncoderOverloaded, match="--upsampling-max-queue") as info:
            await queue.run(Gate())
        assert info.value.retry_after_s
        running.release.set()
        waiting.release.set()
        assert await first == await second == "done"
        queue.close()

    asyncio.run(scenario())


def test_stopping_the_server_stops_generation():
    async def scenario():
        queue = GenerationQueue(max_queued=1)
        gate = Gate()
        task = asyncio.create_task(queue.run(gate))
        await asyncio.to_thread(gate.started.wait, 5)
        queue.close()
        with pytest.raises(Cancelled, match="server is stopping"):
            await task
        assert gate.stopped.is_set()

    asyncio.run(scenario())


def test_upsample_is_in_the_method_registry():
    path = "/flux2.encoder.v1.TextEncoder/Upsample"
    assert GRPC_METHODS[path].metered  # auth, rate, validation, slots and quota, as Encode
    assert "Upsample" in pb2.DESCRIPTOR.services_by_name["TextEncoder"].methods_by_name


# -- through the server -------------------------------------------------------------------


MODEL_NAME = ServerConfig().served_models()[0].name


def _client(server, **kwargs):
    from dit_client.remote import RemoteTextEncoder

    return RemoteTextEncoder(server.target, timeout=30, **kwargs)


@pytest.fixture()
def gated_server(tiny_backend):
    from tests.helpers import ServerThread

    upsampler = GatedUpsampler()
    config = ServerConfig(upsampling=UpsamplingConfig(max_prompts_per_request=2, min_deadline_ms=1000))
    with ServerThread(tiny_backend, config, model_id="tiny-test", upsamplers={MODEL_NAME: upsampler}) as s:
        s.upsampler = upsampler
        yield s


def test_upsample_through_the_server(gated_server):
    gated_server.upsampler.gate.release.set()
    with _client(gated_server) as client:
        info = client.connection.get_info()
        described = info.models[0]
        assert described.upsampling and not described.upsampling_images
        assert "image-to-image" in described.upsampling_unavailable
        assert info.limits.max_upsample_prompts_per_request == 2
        result = client.upsample_with_metadata(["a fox", "a cat"], temperature=0.5, seed=99)
        assert result.texts == ["A FOX", "A CAT"] and result.generated_tokens == [6, 6]
        assert result.seed == 99 and result.temperature == 0.5 and result.model_fingerprint == "flux2-dev:gated"
        assert client.upsample("a dog") == ["A DOG"]
    call = gated_server.upsampler.calls[0]
    assert call == dict(prompts=["a fox", "a cat"], images=None, temperature=0.5, seed=99)
    assert gated_server.upsampler.calls[1]["temperature"] == 0.15 and gated_server.upsampler.calls[1]["seed"] is None
    metrics = gated_server.running.metrics
    assert metrics.sample("flux2_encoder_generated_tokens_total", {"model": MODEL_NAME}) == 6 + 6 + 6
    assert (
        metrics.sample("flux2_encoder_requests_total", {"method": "Upsample", "status": "OK", "user": "anonymous"}) == 2
    )


def test_bad_upsample_requests_get_clear_statuses_and_the_server_keeps_serving(gated_server):
    gated_server.upsampler.gate.release.set()
    with _client(gated_server) as client:
        for kwargs, error, message in [
            (dict(prompts=["a"], temperature=0.0), InvalidRequest, "temperature 0.0 is outside"),
            (dict(prompts=["a"], temperature=-1.0), InvalidRequest, "temperature"),
            (dict(prompts=["a"], temperature=1000.0), InvalidRequest, "temperature"),
            (dict(prompts=["a"], temperature=float("nan")), InvalidRequest, "temperature"),
            # PayloadTooLarge on the server: INVALID_ARGUMENT on the wire, InvalidRequest here.
            (dict(prompts=["a", "b", "c"]), InvalidRequest, "3 prompts in one Upsample call; the limit is 2"),
            (dict(prompts=["x" * 20_000]), InvalidRequest, "characters"),
            (dict(prompts=["a", "b"], images=[[_png()], []]), InvalidRequest, "give every prompt at least one image"),
            (dict(prompts=["a"], images=[[_png()]]), UpsamplingUnavailable, "cannot upsample with images"),
        ]:
            with pytest.raises(error, match=message):
                client.upsample(**kwargs)
        with pytest.raises(DeadlineExceeded, match="cannot see a generation through"):
            client.upsample(["a"], timeout=0.5)
        assert client.upsample(["ok"]) == ["OK"]
        assert client.encode(["still encoding"]).shape == (1, 512, 48)
    assert not gated_server.upsampler.calls[:-1]  # none of the refused ones reached the generator


def test_images_reach_the_upsampler_decoded(tiny_backend):
    from tests.helpers import ServerThread

    upsampler = GatedUpsampler(takes_images=True)
    upsampler.gate.release.set()
    with ServerThread(tiny_backend, ServerConfig(), upsamplers={MODEL_NAME: upsampler}) as server:
        with _client(server) as client:
            assert client.upsample(["edit"], images=[[_png(), _png(40, 30, "JPEG")]]) == ["EDIT"]
            with pytest.raises(InvalidRequest, match="image 1 of prompt 0 cannot be decoded"):
                client.upsample(["edit"], images=[[_png(), b"garbage"]])
    (images,) = upsampler.calls[0]["images"]
    assert [im.size for im in images] == [(32, 24), (40, 30)]


def test_a_server_without_the_flag_names_it(server):
    with _client(server) as client:
        assert not client.connection.get_info().models[0].upsampling
        with pytest.raises(UpsamplingUnavailable, match="--upsampling"):
            client.upsample(["a fox"])
        assert client.encode(["a fox"]).shape[0] == 1


def test_a_klein_model_refuses_with_failed_precondition(tiny_backend):
    from tests.helpers import ServerThread

    why = "flux2-klein (Qwen3) has no prompt upsampling in diffusers; use a FLUX.2-dev model"
    with ServerThread(tiny_backend, ServerConfig(), upsamplers={MODEL_NAME: why}) as server:
        with _client(server) as client:
            assert client.connection.get_info().models[0].upsampling_unavailable == why
            with pytest.raises(UpsamplingUnavailable, match="no prompt upsampling") as info:
                client.upsample(["a fox"])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_encode_is_served_while_a_generation_runs_and_cancel_stops_it(gated_server):
    gate = gated_server.upsampler.gate
    with _client(gated_server) as client:
        call = client.connection.stub.Upsample.future(pb2.UpsampleRequest(prompts=["slow"]), timeout=30)
        assert gate.started.wait(10)
        t0 = time.monotonic()
        assert client.encode(["not starved"]).shape[0] == 1  # the generator is busy; the engine is not
        assert time.monotonic() - t0 < 10
        call.cancel()
        assert gate.stopped.wait(10)  # the generation saw the cancel and stopped
        gate.release.set()
        assert client.upsample(["next"]) == ["NEXT"]  # and the generator is free again


def test_upsample_passes_authentication_and_quota(tiny_backend, tmp_path):
    from common.config import AuthConfig
    from common.errors import Unauthenticated
    from tests.helpers import ServerThread

    keys = tmp_path / "keys.txt"
    keys.write_text("alice:" + "a" * 40 + "\n")
    upsampler = GatedUpsampler()
    upsampler.gate.release.set()
    config = ServerConfig(auth=AuthConfig(api_key_file=str(keys), quota_prompts_per_day=2))
    with ServerThread(tiny_backend, config, upsamplers={MODEL_NAME: upsampler}) as server:
        with _client(server) as anonymous, pytest.raises(Unauthenticated):
            anonymous.upsample(["a"])
        with _client(server, api_key="a" * 40) as alice:
            assert alice.upsample(["a", "b"]) == ["A", "B"]
            with pytest.raises(EncoderOverloaded, match="quota"):
                alice.upsample(["c"])
    assert len(upsampler.calls) == 1


# -- what it costs, and how it is switched on -------------------------------------------------


def test_memory_table_shows_what_upsampling_adds():
    from encoder_server.memory import (
        BUNDLED_CONFIGS,
        bf16_bytes,
        count_parameters,
        default_config_path,
        load_config,
        memory_table,
        upsampling_rows,
    )

    counts = count_parameters()
    rows = upsampling_rows(counts)
    # The extra is exactly the full model less the part the embedding path already holds.
    assert rows[0].params == counts.full.params - counts.truncated.params
    assert rows[0].bytes == bf16_bytes(counts.full) - bf16_bytes(counts.truncated)
    assert rows[0].bytes > rows[1].bytes > rows[2].bytes > 0
    table = memory_table()
    assert "+ upsampling, bf16 | 6.67B | 13.34" in table and "KV cache of 0.42 GB per prompt" in table
    klein = default_config_path(BUNDLED_CONFIGS["FLUX.2 [klein] 4B: Qwen3-4B"])
    assert "upsampling" not in memory_table(klein)  # diffusers has no upsampling for [klein]
    assert load_config(klein)


def test_serve_flags_build_the_upsampling_config(monkeypatch):
    from encoder_server.cli import build_parser, config_from_args

    def config(argv):
        return config_from_args(build_parser().parse_args(["serve", *argv])).upsampling

    assert config([]) == UpsamplingConfig()
    assert not config([]).enabled
    on = config(["--upsampling", "--upsampling-max-queue", "3", "--upsampling-max-new-tokens", "64"])
    assert on.enabled and on.max_queued == 3 and on.max_new_tokens == 64
    monkeypatch.setenv("FLUX2_UPSAMPLING", "1")
    assert config([]).enabled
    monkeypatch.setenv("FLUX2_UPSAMPLING", "0")
    assert not config([]).enabled


def test_seeded_image_to_image_equals_the_reference(shallow_model_dir, pixtral_processor_class):
    """I2I: the reference's processor (a PixtralProcessor on the PIL image backend) carries the images."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    model, tokenizer = _load_full(shallow_model_dir)
    # The tiny vision tower sees 28x28 pixels: 2x2 patches of 14.
    processor = pixtral_processor_class(
        image_processor=PixtralImageProcessorPil(patch_size=14, size={"longest_edge": 28}),
        tokenizer=tokenizer,
        patch_size=14,
        spatial_merge_size=1,
        chat_template=tokenizer.chat_template,
    )
    from PIL import Image

    red, blue, green = (Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green"))
    prompts, images = ["make it night", "put them side by side"], [[red], [blue, green]]
    upsampler = Upsampler(model, tokenizer, processor=processor)
    ours = upsampler.upsample(prompts, images, seed=5)
    theirs = reference_upsample(model, tokenizer, prompts, seed=5, images=images, processor=processor)
    assert ours.texts == theirs
    # The pixels reached generate (the bent weights above make the texts hardly depend on the input,
    # so this is checked on the call rather than on the answer).
    seen = {}
    generate = model.generate
    model.generate = lambda **kwargs: seen.update(kwargs) or generate(**kwargs)
    upsampler.upsample(prompts, images, seed=5)
    assert seen["pixel_values"].shape[0] == 2 and seen["pixel_values"].dtype == torch.bfloat16


# -- HTTP ------------------------------------------------------------------------------------


def test_http_upsample_has_the_json_conventions_of_predict(tiny_backend):
    import base64

    import requests

    from common.config import HTTPConfig
    from tests.helpers import ServerThread

    upsampler = GatedUpsampler(takes_images=True)
    upsampler.gate.release.set()
    config = ServerConfig(http=HTTPConfig(port=0))
    with ServerThread(tiny_backend, config, upsamplers={MODEL_NAME: upsampler}) as server:
        url = f"http://127.0.0.1:{server.running.http.port}"
        ok = requests.post(f"{url}/upsample", json={"prompt": "a fox", "seed": 3, "temperature": 0.5}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert ok.json()["upsampled"] == ["A FOX"] and ok.json()["seed"] == 3 and ok.json()["temperature"] == 0.5
        image = base64.b64encode(_png()).decode()
        named = requests.post(f"{url}/models/{MODEL_NAME}/upsample", json={"prompt": ["edit"], "images": [[image]]})
        assert named.json()["upsampled"] == ["EDIT"] and upsampler.calls[-1]["images"][0][0].size == (32, 24)
        for body, status, says in [
            ({"prompt": "a", "temperature": 0}, 400, "temperature"),
            ({"prompt": "a", "temperature": "hot"}, 400, '"temperature" must be a number'),
            ({"prompt": "a", "seed": -1}, 400, '"seed"'),
            ({"prompt": "a", "images": [["not base64!"]]}, 400, "not base64"),
            ({"prompt": "a", "images": [[base64.b64encode(b"garbage").decode()]]}, 400, "cannot be decoded"),
            ({"prompt": "a", "extra": 1}, 400, "unknown field"),
        ]:
            refused = requests.post(f"{url}/upsample", json=body, timeout=30)
            assert refused.status_code == status and says in refused.json()["error"], (body, refused.text)
    with ServerThread(tiny_backend, config) as plain:
        url = f"http://127.0.0.1:{plain.running.http.port}"
        off = requests.post(f"{url}/upsample", json={"prompt": "a fox"}, timeout=30)
        assert off.status_code == 400 and off.json()["code"] == "FAILED_PRECONDITION"
        assert "--upsampling" in off.json()["error"]


def test_a_deadline_that_passes_mid_generation_stops_it(gated_server):
    gate = gated_server.upsampler.gate
    with _client(gated_server) as client:
        with pytest.raises(DeadlineExceeded):
            client.upsample(["slow"], timeout=1.5)
        assert gate.stopped.wait(10)  # the generation itself stopped, not only the call
        gate.release.set()
        assert client.upsample(["next"]) == ["NEXT"]


def test_serve_loads_the_generator_for_upsampling(tiny_model_dir):
    from encoder_server.server import load_models

    config = ServerConfig(model=str(tiny_model_dir), device="cpu", upsampling=UpsamplingConfig(enabled=True))
    (loaded,) = load_models(config)
    assert loaded.backend.generator is not None
    assert loaded.backend._lm.layers[0] is loaded.backend.generator.model.language_model.layers[0]
