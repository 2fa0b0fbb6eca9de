"""Prompt upsampling: FLUX.2-dev's caption rewriting, run on the encoder's own language model.

``Flux2Pipeline.upsample_prompt`` (diffusers 0.42.1) asks the text encoder's whole
language model (all 40 layers, ``lm_head``, and for image-to-image the vision
tower) to rewrite short prompts into detailed ones. A server started with
``--upsampling`` loads that model once; its first 30 layers are also the
embedding path's (encoder_server/text_encoder.py), so there is one copy of them.

Invariants:

- **Same result as the reference.** :meth:`Upsampler.upsample` builds the inputs
  with diffusers' own ``format_input``, system messages and
  ``_validate_and_process_images``, pads to 2048 tokens, and calls ``generate``
  with the reference's arguments. With a seed, ``torch.manual_seed(seed)`` runs
  right before ``generate``, so on the same device and dtype the texts equal
  ``upsample_prompt``'s run right after ``torch.manual_seed(seed)`` on the same
  prompts in the same batch (tests/encoder_server/test_upsampling.py).
- **One generation at a time.** ``generate`` samples from torch's global random
  generator, so a seeded result is only reproducible when nothing else draws from
  it meanwhile; :class:`GenerationQueue` runs one generation at a time, on a thread
  of its own, with its own bounded queue: embedding requests never wait behind it
  (their engine has its own worker), and a full generation queue refuses new
  upsampling calls instead of growing.
- **Cancellation stops the work.** A stopping criterion checked after every token
  reads the call's cancel flag and deadline, so a cancelled or expired call stops
  generating within one token, and frees the generator for the next.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import io
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import UpsamplingConfig
from common.errors import (
    Cancelled,
    DeadlineExceeded,
    EncoderOverloaded,
    InvalidRequest,
    PayloadTooLarge,
    UpsamplingUnavailable,
)
from common.protocol import pb2
from encoder_server.metrics import EncoderMetrics

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.15
"""``upsample_prompt``'s default temperature (and ``caption_upsample_temperature``'s recommended value)."""
REFERENCE_MAX_LENGTH = 2048
"""Tokens every templated prompt is padded (and cut) to, as the reference does."""
REFERENCE_MAX_NEW_TOKENS = 512
UNAVAILABLE_WITHOUT_FLAG = "the server was started without --upsampling"
# PNG and JPEG only: every other format PIL can open is attack surface nobody asked for.
IMAGE_FORMATS = ("PNG", "JPEG")


class GenerationStopped(Exception):
    """``generate`` stopped early because the call was cancelled or its deadline passed."""


@dataclass
class UpsampledBatch:
    """What one ``generate`` call produced.

    Attributes:
        texts: the upsampled prompt of each input prompt, in order.
        generated_tokens: new tokens per prompt, its end-of-sequence token included.
        input_tokens: non-pad tokens of each templated prompt (images' tokens included).
        seed: the seed ``torch.manual_seed`` got right before ``generate``.
        tokenization_ns: wall time of templating, image processing and tokenization.
        generation_ns: wall time of ``generate`` and decoding.
    """

    texts: list[str]
    generated_tokens: list[int]
    input_tokens: list[int]
    seed: int
    tokenization_ns: int
    generation_ns: int


def _diffusers_flux2():
    """diffusers' FLUX.2 pipeline module: its ``format_input``, system messages and image helpers."""
    from diffusers.pipelines.flux2 import pipeline_flux2

    return pipeline_flux2


def _stop_criteria(should_stop: Callable[[], bool]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        # Returning "not done" changes nothing in generate's sampling: the results stay the reference's.
        def __call__(self, input_ids, scores, **kwargs):
            done = should_stop()
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


class Upsampler:
    """``Flux2Pipeline.upsample_prompt`` on a loaded ``Mistral3ForConditionalGeneration``.

    Args:
        model: the whole text encoder (``Mistral3ForConditionalGeneration``), eval mode.
        tokenizer: its tokenizer with the chat template. A private copy is kept: a fast
            tokenizer's padding settings live on the object, and the embedding path
            tokenizes on another thread.
        processor: the ``PixtralProcessor`` of ``tokenizer/`` for image-to-image; ``None``
            serves text-to-image only. When given it also templates text-only prompts,
            as the reference's ``self.tokenizer`` (a processor for FLUX.2-dev) does.
        max_new_tokens: tokens generated per prompt at most (the reference's 512 by default).
        fingerprint: the embedding backend's fingerprint, echoed in answers.
        no_images_reason: why ``processor`` is missing, for the error an I2I request gets.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        processor=None,
        max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
        fingerprint: str = "",
        no_images_reason: str = "",
    ):
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        self.model = model
        self.tokenizer = copy.deepcopy(tokenizer)
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.fingerprint = fingerprint
        self.no_images_reason = no_images_reason or "no image processor was loaded"
        # The pipeline's own: Flux2Pipeline builds it with vae_scale_factor 2 ** 3 * 2; upsampling
        # only uses its concatenate and area-capping helpers, which ignore that factor.
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=16)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @property
    def takes_images(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _template(self, messages, **kwargs):
        return (self.processor or self.tokenizer).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
        )

    @torch.inference_mode()
    def upsample(
        self,
        prompts: list[str],
        images: list[list[Any]] | None = None,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        seed: int | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> UpsampledBatch:
        """Rewrite ``prompts`` as the reference does; blocking (run it on a worker thread).

        Args:
            prompts: the prompts, one batch.
            images: ``None`` for text-to-image, else one list of PIL images per prompt
                (image-to-image; several images of one prompt are concatenated, as the reference does).
            temperature: sampling temperature (> 0).
            seed: seeds torch's global generator right before ``generate``; ``None``
                draws a fresh random one (reported in the result, to reproduce it).
            should_stop: checked after every generated token; True stops with :class:`GenerationStopped`.

        Raises:
            PayloadTooLarge: a templated prompt is longer than 2048 tokens (the reference would cut
                its end, generation prompt included, and rewrite garbage).
            UpsamplingUnavailable: images were given but no processor is loaded.
            GenerationStopped: ``should_stop`` said so.
        """
        flux2 = _diffusers_flux2()
        t0 = time.perf_counter_ns()
        # 1. Messages, exactly as upsample_prompt builds them.
        if images:
            if self.processor is None:
                raise UpsamplingUnavailable(f"image-to-image upsampling is unavailable: {self.no_images_reason}")
            system_message = flux2.SYSTEM_MESSAGE_UPSAMPLING_I2I
            images = flux2._validate_and_process_images(images, self.image_processor, flux2.UPSAMPLING_MAX_IMAGE_SIZE)
        else:
            system_message = flux2.SYSTEM_MESSAGE_UPSAMPLING_T2I
            images = None
        messages = flux2.format_input(prompts=prompts, system_message=system_message, images=images)
        # 2. Refuse what the reference would silently cut, then tokenize as it does.
        # (padded to the longest: a processor returns tensors, which need equal lengths)
        lengths = self._template(messages, padding=True, return_tensors="pt")["attention_mask"].sum(dim=1).tolist()
        for i, length in enumerate(lengths):
            if length > REFERENCE_MAX_LENGTH:
                raise PayloadTooLarge(
                    f"prompt {i} is {length} tokens with the upsampling instructions"
                    f"{' and its images' if images else ''}; upsampling reads at most {REFERENCE_MAX_LENGTH}"
                )
        inputs = self._template(
            messages, return_tensors="pt", padding="max_length", truncation=True, max_length=REFERENCE_MAX_LENGTH
        )
        device = self.device
        inputs["input_ids"] = inputs["input_ids"].to(device)  # [B, 2048]
        inputs["attention_mask"] = inputs["attention_mask"].to(device)  # [B, 2048]
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(device, self.model.dtype)
        input_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        t1 = time.perf_counter_ns()
        # 3. Generate, seeded right before, with the reference's arguments.
        if seed is None:
            seed = secrets.randbits(63)
        torch.manual_seed(seed)
        generated = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=temperature,
            use_cache=True,
            stopping_criteria=_stop_criteria(should_stop),
        )
        if should_stop():
            raise GenerationStopped()
        # 4. Decode only the new tokens.
        new_tokens = generated[:, inputs["input_ids"].shape[1] :].cpu()  # [B, <= max_new_tokens]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        t2 = time.perf_counter_ns()
        return UpsampledBatch(texts, self._count_generated(new_tokens), input_tokens, seed, t1 - t0, t2 - t1)

    def _count_generated(self, new_tokens: torch.Tensor) -> list[int]:
        """Tokens each row generated: up to and including its first end-of-sequence token."""
        counts = []
        for row in new_tokens.tolist():
            end = next((i for i, token in enumerate(row) if token in self._eos), None)
            counts.append(len(row) if end is None else end + 1)
        return counts


def reference_upsample(
    model, tokenizer, prompts, *, seed, temperature=DEFAULT_TEMPERATURE, images=None, processor=None
):
    """diffusers' own ``Flux2Pipeline.upsample_prompt``, run right after ``torch.manual_seed(seed)``:
    the ground truth :class:`Upsampler` is compared with (tests, benchmarks/gpu_encoder.py).

    The method reads four attributes of its pipeline, given here by a stand-in. FLUX.2-dev's
    ``tokenizer`` is a PixtralProcessor (``apply_chat_template`` and ``.tokenizer``), which
    ``processor`` is when given; without, the tokenizer's own two methods stand in for it.
    """
    import types

    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    flux2 = _diffusers_flux2()
    pipe = types.SimpleNamespace(
        text_encoder=model,
        tokenizer=processor
        or types.SimpleNamespace(apply_chat_template=tokenizer.apply_chat_template, tokenizer=tokenizer),
        image_processor=Flux2ImageProcessor(vae_scale_factor=16),
        upsampling_max_image_size=flux2.UPSAMPLING_MAX_IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    return Flux2Pipeline.upsample_prompt(pipe, prompts, images=images, temperature=temperature)


def load_processor(tokenizer_dir: Path) -> tuple[Any, str]:
    """``(processor, "")`` for a ``tokenizer/`` folder that holds a PixtralProcessor, else ``(None, why not)``."""
    if not any((tokenizer_dir / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        return None, f"{tokenizer_dir} holds a tokenizer but no image processor (processor_config.json)"
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(tokenizer_dir), ""
    except (ImportError, OSError, ValueError) as exc:
        return None, f"its image processor cannot be loaded here ({type(exc).__name__}: {str(exc).strip()[:200]})"


def upsampler_for_backend(backend, config: UpsamplingConfig) -> Upsampler | str:
    """The :class:`Upsampler` on a backend loaded with ``upsampling=True``, or why there is none.

    ``backend`` is a :class:`~encoder_server.text_encoder.TruncatedTextEncoder`; other backends
    (test fakes) have no generator, and so no upsampling.
    """
    if not config.enabled:
        return UNAVAILABLE_WITHOUT_FLAG
    generator = getattr(backend, "generator", None)
    if generator is None:
        return getattr(backend, "upsampling_note", "") or "this model was loaded without its generator"
    processor, no_images = load_processor(backend.tokenizer_dir)
    if processor is None:
        log.warning("%s: image-to-image upsampling is off: %s", backend.spec.family, no_images)
    return Upsampler(
        generator,
        backend.tokenizer,
        processor=processor,
        max_new_tokens=config.max_new_tokens,
        fingerprint=backend.fingerprint,
        no_images_reason=no_images,
    )


# -- requests ----------------------------------------------------------------------


def decode_images(blobs: list[bytes], config: UpsamplingConfig, *, prompt_index: int) -> list[Any]:
    """PIL images (RGB) from one prompt's encoded PNG/JPEG bytes, within ``config``'s limits.

    The size is read from the header before any pixel is decoded, so an image that
    would decompress to gigabytes is refused for what it claims to be.
    """
    from PIL import Image, UnidentifiedImageError

    if len(blobs) > config.max_images_per_prompt:
        raise PayloadTooLarge(
            f"prompt {prompt_index} has {len(blobs)} images; the limit is {config.max_images_per_prompt}"
        )
    images = []
    for j, blob in enumerate(blobs):
        where = f"image {j} of prompt {prompt_index}"
        if not blob:
            raise InvalidRequest(f"{where} is empty; send PNG or JPEG bytes")
        if len(blob) > config.max_image_bytes:
            raise PayloadTooLarge(f"{where} is {len(blob)} bytes; the limit is {config.max_image_bytes}")
        try:
            image = Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > config.max_image_pixels:
                raise PayloadTooLarge(
                    f"{where} is {width}x{height} pixels; the limit is {config.max_image_pixels} pixels "
                    "(the model sees at most 768x768 anyway)"
                )
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(f"{where} cannot be decoded as PNG or JPEG ({type(exc).__name__})") from None
        images.append(image.convert("RGB"))
    return images


def check_temperature(temperature: float | None, config: UpsamplingConfig) -> float:
    """The temperature to sample with: the default when unset; InvalidRequest outside (0, max]."""
    if temperature is None:
        return DEFAULT_TEMPERATURE
    if not (0 < temperature <= config.max_temperature):  # also refuses NaN
        raise InvalidRequest(
            f"temperature {temperature} is outside (0, {config.max_temperature}]; "
            f"{DEFAULT_TEMPERATURE} is the reference's (low: close to the prompt, high: inventive)"
        )
    return temperature


def parse_http_upsample(body: object, limits) -> tuple[list[str], list[list[bytes]] | None, float | None, int | None]:
    """``(prompts, images, temperature, seed)`` of a ``POST /upsample`` JSON body (shape and types only).

    ``{"prompt": str | [str], "temperature"?: number, "seed"?: int, "images"?: [[base64, ...], ...]}``,
    the images one list per prompt, each a base64 PNG or JPEG file. Values are checked as gRPC's are.
    """
    import base64
    import binascii

    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object {"prompt": str | list[str], ...}')
    unknown = sorted(set(body) - {"prompt", "temperature", "seed", "images"})
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; the body takes prompt, temperature, seed, images"
        )
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest('"prompt" must be a string or a list of strings')
    if len(prompts) > limits.max_prompts_per_request:
        raise PayloadTooLarge(f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request}")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise InvalidRequest('"temperature" must be a number')
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise InvalidRequest('"seed" must be an integer in [0, 2**64)')
    images = body.get("images")
    decoded = None
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(i, list) for i in images):
            raise InvalidRequest('"images" must be one list of base64 PNG/JPEG strings per prompt')
        try:
            decoded = [[base64.b64decode(b, validate=True) for b in entry] for entry in images]
        except (binascii.Error, TypeError, ValueError):
            raise InvalidRequest('"images" holds a value that is not base64 text') from None
    return prompts, decoded, None if temperature is None else float(temperature), seed


# -- the queue ---------------------------------------------------------------------


class GenerationQueue:
    """Runs one generation at a time on its own thread; at most ``max_queued`` calls wait.

    Cancelling a caller (the client went away, its deadline passed) sets the
    generation's stop flag; the generator stays busy until ``generate`` notices it
    (after the current token), and only then is the next generation started.
    """

    def __init__(self, max_queued: int, metrics: EncoderMetrics | None = None):
        self.max_queued = max_queued
        self._metrics = metrics
        self._free = asyncio.Semaphore(1)
        self._waiting = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="upsample")
        self._stops: set[threading.Event] = set()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def run(self, work: Callable[[Callable[[], bool]], Any], *, deadline: float | None = None):
        """``work(should_stop)`` on the generation thread, once the generator is free; returns its result.

        Raises:
            EncoderOverloaded: ``max_queued`` calls already wait.
            DeadlineExceeded: the deadline passed while waiting or generating.
            Cancelled: the server is stopping.
        """
        if self._waiting >= self.max_queued:
            raise EncoderOverloaded(
                f"{self._waiting} upsampling calls are already waiting for the generator, its queue's limit "
                "(--upsampling-max-queue); retry in a few seconds. Encode is not affected.",
                retry_after_s=5.0,
            )
        self._waiting += 1
        self._gauge()
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(self._free.acquire(), timeout)
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed while waiting for the generator") from None
        finally:
            self._waiting -= 1
            self._gauge()
        stop = threading.Event()
        self._stops.add(stop)

        def should_stop() -> bool:
            return stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

        loop = asyncio.get_running_loop()
        try:
            future = self._executor.submit(work, should_stop)
        except RuntimeError:  # shut down
            self._free.release()
            raise Cancelled("the server is stopping") from None

        def finished(_):
            self._stops.discard(stop)
            try:
                loop.call_soon_threadsafe(self._free.release)
            except RuntimeError:  # the loop is closed: the server is gone, nobody waits for the generator
                pass

        future.add_done_callback(finished)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            stop.set()  # the thread stops after its current token; `finished` then frees the generator
            raise
        except GenerationStopped:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    "the deadline passed during generation; upsampling takes seconds (up to "
                    "512 tokens per prompt), give it a longer deadline"
                ) from None
            raise Cancelled("generation was stopped: the server is stopping") from None

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.upsample_queue.set(self._waiting)

    def close(self) -> None:
        """Stop every running generation and start no new one."""
        for stop in list(self._stops):
            stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- the service the transports call ------------------------------------------------


@dataclass
class UpsampleOutcome:
    """One served ``Upsample`` request: the batch, and how long it waited."""

    batch: UpsampledBatch
    temperature: float
    queue_ns: int
    fingerprint: str


class UpsampleService:
    """Upsampling for every served model: availability, request checks, the queue, metrics.

    Args:
        upsamplers: per model name, its :class:`Upsampler`, or why it has none.
        config: the server's upsampling settings.
        metrics: where generated tokens and latencies are counted.
    """

    def __init__(
        self, upsamplers: dict[str, Upsampler | str], config: UpsamplingConfig, metrics: EncoderMetrics | None
    ):
        self._upsamplers = upsamplers
        self.config = config
        self._metrics = metrics
        self.queue = GenerationQueue(config.max_queued, metrics)

    def upsampler(self, model: str) -> Upsampler:
        """The model's upsampler; :class:`UpsamplingUnavailable` saying why it has none."""
        found = self._upsamplers.get(model)
        if isinstance(found, Upsampler):
            return found
        raise UpsamplingUnavailable(
            f"model {model!r} cannot upsample prompts: {found or 'the server was started without --upsampling'}"
        )

    def describe(self, info: pb2.ModelInfo) -> None:
        """Fill ``info``'s upsampling fields for its model."""
        found = self._upsamplers.get(info.name)
        info.upsampling = isinstance(found, Upsampler)
        info.upsampling_images = isinstance(found, Upsampler) and found.takes_images
        if isinstance(found, Upsampler):
            info.upsampling_unavailable = "" if found.takes_images else f"image-to-image: {found.no_images_reason}"
        else:
            info.upsampling_unavailable = found or UNAVAILABLE_WITHOUT_FLAG

    def limits(self, limits: pb2.ServerLimits) -> None:
        """Fill the upsampling fields of ``limits``."""
        c = self.config
        limits.max_upsample_prompts_per_request = c.max_prompts_per_request
        limits.max_images_per_prompt = c.max_images_per_prompt
        limits.max_image_bytes = c.max_image_bytes
        limits.max_image_pixels = c.max_image_pixels
        limits.max_upsample_temperature = c.max_temperature
        limits.max_upsample_new_tokens = c.max_new_tokens

    async def upsample(
        self,
        model: str,
        prompts: list[str],
        images: list[list[bytes]] | None,
        *,
        temperature: float | None,
        seed: int | None,
        deadline: float | None,
    ) -> UpsampleOutcome:
        """Check, queue and run one request (prompts already passed the admission's checks)."""
        upsampler = self.upsampler(model)
        c = self.config
        if len(prompts) > c.max_prompts_per_request:
            raise PayloadTooLarge(
                f"{len(prompts)} prompts in one Upsample call; the limit is {c.max_prompts_per_request} "
                "(they are generated as one batch)"
            )
        temperature = check_temperature(temperature, c)
        if deadline is not None and (deadline - time.monotonic()) * 1000 < c.min_deadline_ms:
            raise DeadlineExceeded(
                f"a deadline under {c.min_deadline_ms} ms cannot see a generation through; upsampling takes seconds"
            )
        decoded = None
        if images:
            if len(images) != len(prompts) or not all(images):
                raise InvalidRequest(
                    f"{len(prompts)} prompts but {sum(1 for i in images if i)} with images: give every prompt at "
                    "least one image (image-to-image), or none (text-to-image), in one call"
                )
            if not upsampler.takes_images:
                raise UpsamplingUnavailable(
                    f"model {model!r} cannot upsample with images: {upsampler.no_images_reason}; send prompts only"
                )
            decoded = await asyncio.to_thread(
                lambda: [decode_images(blobs, c, prompt_index=i) for i, blobs in enumerate(images)]
            )
        t0 = time.perf_counter_ns()
        started: list[int] = []

        def work(should_stop):
            started.append(time.perf_counter_ns())
            return upsampler.upsample(prompts, decoded, temperature=temperature, seed=seed, should_stop=should_stop)

        batch = await self.queue.run(work, deadline=deadline)
        if self._metrics is not None:
            self._metrics.generated_tokens.labels(model=model).inc(sum(batch.generated_tokens))
            self._metrics.upsample_seconds.observe(batch.generation_ns / 1e9)
        return UpsampleOutcome(batch, temperature, started[0] - t0, upsampler.fingerprint)

    def close(self) -> None:
        self.queue.close()
