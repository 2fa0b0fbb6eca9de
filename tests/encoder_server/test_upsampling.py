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
    UpsampleService,
    decode_images,
    inspect_images,
    reference_upsample,
)
from encoder_server.validation import UpsampleArgs, validate_upsample
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


def _temperature(value):
    return validate_upsample(["a"], UpsampleArgs(temperature=value), UpsamplingConfig()).temperature


@pytest.mark.parametrize("bad", [0.0, -0.5, 5.01, 1e9, float("nan"), float("inf")])
def test_temperatures_outside_the_range_are_refused(bad):
    with pytest.raises(InvalidRequest, match="temperature"):
        _temperature(bad)


def test_temperature_defaults_to_the_reference():
    assert _temperature(None) == DEFAULT_TEMPERATURE == 0.15
    assert _temperature(5.0) == 5.0


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
    limits = config(
        [
            "--upsampling-max-per-user=2",
            "--upsampling-timeout=60",
            "--upsampling-max-image-bytes=1000",
            "--upsampling-max-request-image-bytes=2000",
            "--upsampling-max-image-pixels=3000",
            "--upsampling-max-request-image-pixels=4000",
        ]
    )
    assert (limits.max_per_user, limits.timeout_s, limits.max_image_bytes, limits.max_request_image_bytes) == (
        2,
        60.0,
        1000,
        2000,
    )
    assert (limits.max_image_pixels, limits.max_request_image_pixels) == (3000, 4000)
    monkeypatch.setenv("FLUX2_UPSAMPLING_MAX_REQUEST_IMAGE_PIXELS", "5000")
    monkeypatch.setenv("FLUX2_UPSAMPLING_TIMEOUT", "30")
    assert config([]).max_request_image_pixels == 5000 and config([]).timeout_s == 30.0


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


# -- review fixes: memory, bad dimensions, fairness, transport limits, deadlines ----------------


def _black_png(width: int, height: int) -> bytes:
    """A PNG that is tiny on the wire and huge decoded (a few KB per 16 M pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_decoded_images_are_shrunk_to_what_the_model_sees_as_the_pipeline_does():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from diffusers.pipelines.flux2.pipeline_flux2 import UPSAMPLING_MAX_IMAGE_SIZE, _validate_and_process_images
    from PIL import Image

    big = Image.effect_noise((1600, 900), 60).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    (decoded,) = decode_images([buf.getvalue()], UpsamplingConfig(max_image_bytes=10 << 20), prompt_index=0)
    assert decoded.width * decoded.height <= UPSAMPLING_MAX_IMAGE_SIZE  # not 1.4 M pixels held while queued
    # One image per prompt: what the pipeline makes of the shrunk image equals what it makes of the original.
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    [[theirs]] = _validate_and_process_images([[big]], processor, UPSAMPLING_MAX_IMAGE_SIZE)
    [[ours]] = _validate_and_process_images([[decoded]], processor, UPSAMPLING_MAX_IMAGE_SIZE)
    assert ours.size == theirs.size and ours.tobytes() == theirs.tobytes()


def test_image_headers_are_checked_for_the_whole_request_before_any_pixel_is_decoded():
    config = UpsamplingConfig(max_request_image_pixels=3 * 1000 * 1000)
    inspect_images([[_black_png(1000, 1000)] * 3], config)  # at the limit
    with pytest.raises(PayloadTooLarge, match="pixels together; the limit is 3000000"):
        inspect_images([[_black_png(1000, 1000)] * 2, [_black_png(1000, 1000)] * 2], config)
    with pytest.raises(InvalidRequest, match="cannot be decoded as PNG or JPEG"):
        inspect_images([[b"not an image"]], config)


@pytest.mark.parametrize("size", [(600_000, 1), (1, 40_000), (33, 1)])
def test_extreme_aspect_ratios_are_refused_from_the_header(size):
    with pytest.raises(InvalidRequest, match="its longer side may be at most 32 times its shorter one"):
        inspect_images([[_black_png(*size)]], UpsamplingConfig())


def test_images_that_side_by_side_would_shrink_to_nothing_are_refused():
    # Each is within the ratio, but the pipeline puts them side by side and caps the area.
    config = UpsamplingConfig(max_images_per_prompt=2000, max_image_aspect_ratio=1000)
    with pytest.raises(InvalidRequest, match="shrink to nothing"):
        inspect_images([[_black_png(1000, 1)] * 600], config)


class _Counting:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def test_a_waiting_call_holds_its_images_encoded_and_a_full_queue_decodes_nothing(monkeypatch):
    import encoder_server.upsampling as upsampling

    decode = _Counting(upsampling.decode_images)
    monkeypatch.setattr(upsampling, "decode_images", decode)

    async def scenario():
        upsampler = GatedUpsampler(takes_images=True)
        service = UpsampleService({"m": upsampler}, UpsamplingConfig(max_queued=1), None)
        args = UpsampleArgs(images=[[_png()]], temperature=0.15)
        running = asyncio.create_task(service.upsample("m", ["a"], args, user="u", deadline=None))
        await asyncio.to_thread(upsampler.gate.started.wait, 5)
        assert decode.calls == 1  # the running call decoded its image on the generation thread
        waiting = asyncio.create_task(service.upsample("m", ["b"], args, user="v", deadline=None))
        while service.queue.waiting == 0:
            await asyncio.sleep(0)
        assert decode.calls == 1  # the waiting one holds bytes only
        with pytest.raises(EncoderOverloaded, match="--upsampling-max-queue"):
            await service.upsample("m", ["c"], args, user="w", deadline=None)
        assert decode.calls == 1  # refused before decoding anything
        upsampler.gate.release.set()
        assert (await running).batch.texts == ["A"] and (await waiting).batch.texts == ["B"]
        assert decode.calls == 2
        service.close()

    asyncio.run(scenario())


class _Failing(GatedUpsampler):
    def __init__(self, exc):
        super().__init__()
        self.exc = exc

    def upsample(self, *args, **kwargs):
        raise self.exc


@pytest.mark.parametrize(
    "exc, code, http, says",
    [
        (
            ValueError("height and width must be > 0 (secret detail)"),
            "INTERNAL",
            500,
            "internal error during upsampling",
        ),
        (torch.cuda.OutOfMemoryError("CUDA out of memory (secret detail)"), "RESOURCE_EXHAUSTED", 429, "out of memory"),
    ],
)
def test_a_failing_generation_is_reported_without_its_text_on_both_transports(tiny_backend, exc, code, http, says):
    import requests

    from common.config import HTTPConfig
    from tests.helpers import ServerThread

    config = ServerConfig(http=HTTPConfig(port=0))
    with ServerThread(tiny_backend, config, upsamplers={MODEL_NAME: _Failing(exc)}) as server:
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb2_grpc_stub(channel).Upsample(pb2.UpsampleRequest(prompts=["a"]), timeout=30)
        assert info.value.code().name == code and says in info.value.details()
        assert "secret" not in info.value.details()
        reply = requests.post(f"http://127.0.0.1:{server.running.http.port}/upsample", json={"prompt": "a"}, timeout=30)
        assert reply.status_code == http and reply.json()["code"] == code and says in reply.json()["error"]
        assert "secret" not in reply.text
        with _client(server) as client:
            assert client.encode(["still serving"]).shape[0] == 1


def pb2_grpc_stub(channel):
    from common.protocol import pb2_grpc

    return pb2_grpc.TextEncoderStub(channel)


def test_one_user_cannot_hold_the_generator_and_every_waiting_place():
    async def scenario():
        queue = GenerationQueue(max_queued=4, max_per_user=2)
        running, waiting, other = Gate(), Gate(), Gate()
        first = asyncio.create_task(queue.run(running, user="greedy"))
        await asyncio.to_thread(running.started.wait, 5)
        second = asyncio.create_task(queue.run(waiting, user="greedy"))
        while queue.waiting == 0:
            await asyncio.sleep(0)
        with pytest.raises(EncoderOverloaded, match="'greedy' already has 2 upsampling calls") as info:
            await queue.run(Gate(), user="greedy")
        assert info.value.retry_after_s
        third = asyncio.create_task(queue.run(other, user="polite"))  # another user still finds room
        while queue.waiting < 2:
            await asyncio.sleep(0)
        running.release.set()
        waiting.release.set()
        other.release.set()
        assert await first == await second == await third == "done"
        assert queue.held_by("greedy") == queue.held_by("polite") == 0  # running ones count until they end
        queue.close()

    asyncio.run(scenario())


def test_the_automatic_per_user_share_divides_the_queue_like_the_slots():
    assert UpsamplingConfig(max_queued=8).per_user_share(users=3) == 2
    assert UpsamplingConfig(max_queued=1).per_user_share(users=3) == 1  # at least one
    assert UpsamplingConfig(max_queued=8).per_user_share(users=1) == 9  # nobody to be fair to
    assert UpsamplingConfig(max_queued=8, max_per_user=3).per_user_share(users=5) == 3


def test_generated_tokens_are_counted_per_user(gated_server):
    gated_server.upsampler.gate.release.set()
    with _client(gated_server) as client:
        client.upsample(["a fox", "a cat"])
    metrics = gated_server.running.metrics
    assert metrics.sample("flux2_encoder_user_generated_tokens_total", {"user": "anonymous"}) == 12


def _noise_png(side: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about ``3 * side**2`` bytes."""
    import random

    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(buf, format="PNG")
    return buf.getvalue()


def _noise_pngs(total_bytes: int, count: int) -> list[bytes]:
    """``count`` noise PNGs, together just under ``total_bytes``."""
    side = int((total_bytes / count / 3) ** 0.5)
    while sum(map(len, out := [_noise_png(side, k) for k in range(count)])) > total_bytes:
        side -= 1
    return out


def test_a_request_at_the_advertised_limits_fits_both_transports_and_one_over_is_refused(tiny_backend):
    import base64

    import requests

    from common.config import HTTPConfig
    from tests.helpers import ServerThread

    upsampler = GatedUpsampler(takes_images=True)
    upsampler.gate.release.set()
    config = ServerConfig(http=HTTPConfig(port=0))  # the defaults, as served
    limits, upsampling = config.limits, config.upsampling
    prompts = ["x" * limits.max_prompt_chars] * upsampling.max_prompts_per_request
    small = _png(8, 8)
    room = upsampling.max_request_image_bytes - (len(prompts) - 1) * len(small)
    big = _noise_pngs(room, 3)  # 3 images of about 1 MiB for the first prompt, a small one for each other
    at_limit = [big] + [[small]] * (len(prompts) - 1)
    total = sum(len(b) for entry in at_limit for b in entry)
    assert 0.99 * upsampling.max_request_image_bytes < total <= upsampling.max_request_image_bytes
    over = [[*big, _noise_png(int(((upsampling.max_request_image_bytes - total) / 3) ** 0.5) + 8)]] + at_limit[1:]
    with ServerThread(tiny_backend, config, upsamplers={MODEL_NAME: upsampler}) as server:
        with _client(server) as client:
            advertised = client.connection.get_info().limits
            assert advertised.max_image_bytes == upsampling.max_request_image_bytes < limits.max_receive_message_bytes
            assert client.upsample(prompts, images=at_limit) == [p.upper() for p in prompts]
            with pytest.raises(InvalidRequest, match="bytes together; the limit is"):
                client.upsample(prompts, images=over)
        url = f"http://127.0.0.1:{server.running.http.port}/upsample"

        def body(entries):
            return {"prompt": prompts, "images": [[base64.b64encode(b).decode() for b in e] for e in entries]}

        ok = requests.post(url, json=body(at_limit), timeout=60)
        assert ok.status_code == 200, ok.text[:300]
        refused = requests.post(url, json=body(over), timeout=60)
        assert refused.status_code == 413 and "bytes together" in refused.json()["error"], refused.text[:300]


def test_an_http_upsample_is_held_to_the_server_timeout(tiny_backend):
    import requests

    from common.config import HTTPConfig
    from tests.helpers import ServerThread

    upsampler = GatedUpsampler()
    config = ServerConfig(http=HTTPConfig(port=0), upsampling=UpsamplingConfig(timeout_s=1.0))
    with ServerThread(tiny_backend, config, upsamplers={MODEL_NAME: upsampler}) as server:
        url = f"http://127.0.0.1:{server.running.http.port}/upsample"
        reply = requests.post(url, json={"prompt": "never released"}, timeout=20)
        assert reply.json()["code"] == "DEADLINE_EXCEEDED" and "--upsampling-timeout" in reply.json()["error"]
        assert upsampler.gate.stopped.wait(10)  # the generation itself stopped
        with _client(server) as client, pytest.raises(DeadlineExceeded, match="--upsampling-timeout"):
            client.upsample(["no deadline of its own"], timeout=60)  # a longer gRPC deadline is shortened


def test_http_upsample_bodies_are_parsed_once(tiny_backend, monkeypatch):
    import requests

    import encoder_server.http_endpoint as http_endpoint
    from common.config import HTTPConfig
    from tests.helpers import ServerThread

    parse = _Counting(http_endpoint.parse_upsample)
    monkeypatch.setattr(http_endpoint, "parse_upsample", parse)
    upsampler = GatedUpsampler()
    upsampler.gate.release.set()
    with ServerThread(tiny_backend, ServerConfig(http=HTTPConfig(port=0)), upsamplers={MODEL_NAME: upsampler}) as s:
        reply = requests.post(f"http://127.0.0.1:{s.running.http.port}/upsample", json={"prompt": "a"}, timeout=30)
    assert reply.status_code == 200 and parse.calls == 1


def test_a_server_with_several_users_gives_each_a_share_of_the_generation_queue(tiny_backend, tmp_path):
    from common.config import AuthConfig
    from tests.helpers import ServerThread

    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{name}:{name[0] * 40}\n" for name in ("alice", "bob", "carol")))
    keys.chmod(0o600)
    upsampler = GatedUpsampler()
    config = ServerConfig(auth=AuthConfig(api_key_file=str(keys)), upsampling=UpsamplingConfig(max_queued=4))
    with ServerThread(tiny_backend, config, upsamplers={MODEL_NAME: upsampler}) as server:
        assert server.running.upsampling.queue.max_per_user == 1  # (4 + 1) // 4: a quarter, as slots are shared
        with _client(server, api_key="a" * 40) as alice, _client(server, api_key="b" * 40) as bob:
            first = alice.connection.stub.Upsample.future(
                pb2.UpsampleRequest(prompts=["alice's"]), timeout=30, metadata=alice.connection.metadata
            )
            assert upsampler.gate.started.wait(10)
            with pytest.raises(EncoderOverloaded, match="'alice' already has 1 upsampling calls"):
                alice.upsample(["alice again"])
            queued = bob.connection.stub.Upsample.future(
                pb2.UpsampleRequest(prompts=["bob's"]), timeout=30, metadata=bob.connection.metadata
            )
            upsampler.gate.release.set()
            assert first.result().results[0].text == "ALICE'S" and queued.result().results[0].text == "BOB'S"
