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
- **Waiting costs little.** A request's images are only looked at (their headers) before
  it queues; they are decoded on the generation thread once the generator is its, and
  shrunk at once to the area the model sees, so waiting calls hold their encoded bytes
  only, and the running one a few MB of pixels.
- **Fair.** One user may have at most ``UpsamplingConfig.per_user_share`` calls queued or
  generating; the others' calls find room.
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
from collections import Counter
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
    Flux2RemoteError,
    InvalidRequest,
    PayloadTooLarge,
    UpsamplingUnavailable,
)
from common.protocol import pb2
from encoder_server.engine import as_reportable
from encoder_server.metrics import EncoderMetrics
from encoder_server.validation import DEFAULT_UPSAMPLE_TEMPERATURE, UpsampleArgs

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = DEFAULT_UPSAMPLE_TEMPERATURE
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


def _open_image(blob: bytes, where: str):
    """``Image.open`` on PNG/JPEG bytes: reads the header only; InvalidRequest when it is neither."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{where} cannot be decoded as PNG or JPEG ({type(exc).__name__})") from None


def inspect_images(images: list[list[bytes]], config: UpsamplingConfig) -> None:
    """Check every image of a request from its header alone (no pixel is decoded).

    Each image: PNG or JPEG, at most ``max_image_pixels``, its sides within
    ``max_image_aspect_ratio``; all of them at most ``max_request_image_pixels``; each
    prompt's images, side by side as the pipeline concatenates them, still at least
    one pixel high and wide once capped to the area the model sees.

    Raises:
        InvalidRequest: not PNG or JPEG, too thin, or concatenated to a strip the model cannot see.
        PayloadTooLarge: too many pixels in one image or in the request.
    """
    target = _diffusers_flux2().UPSAMPLING_MAX_IMAGE_SIZE
    total = 0
    for i, blobs in enumerate(images):
        sizes = []
        for j, blob in enumerate(blobs):
            where = f"image {j} of prompt {i}"
            with _open_image(blob, where) as image:
                width, height = image.size
            if width * height > config.max_image_pixels:
                raise PayloadTooLarge(
                    f"{where} is {width}x{height} pixels; the limit is {config.max_image_pixels} pixels "
                    "(the model sees at most 768x768 anyway)"
                )
            if min(width, height) < 1 or max(width, height) > config.max_image_aspect_ratio * min(width, height):
                raise InvalidRequest(
                    f"{where} is {width}x{height} pixels; its longer side may be at most "
                    f"{config.max_image_aspect_ratio:g} times its shorter one"
                )
            total += width * height
            sizes.append((width, height))
        if total > config.max_request_image_pixels:
            raise PayloadTooLarge(
                f"the images of this request have {total} pixels together; the limit is "
                f"{config.max_request_image_pixels} (the model sees at most 768x768 pixels of each prompt's images)"
            )
        # The pipeline puts a prompt's images side by side, then caps the area (Flux2ImageProcessor).
        width, height = sum(w for w, _ in sizes), max(h for _, h in sizes)
        scale = min(1.0, (target / (width * height)) ** 0.5)
        if int(width * scale) < 1 or int(height * scale) < 1:
            raise InvalidRequest(
                f"the {len(sizes)} images of prompt {i} make a {width}x{height} strip side by side, which the "
                "pipeline would shrink to nothing; send fewer or less elongated images"
            )


def decode_images(blobs: list[bytes], config: UpsamplingConfig, *, prompt_index: int) -> list[Any]:
    """PIL images (RGB) from one prompt's encoded PNG/JPEG bytes, each shrunk to what the model sees.

    The size is read from the header before any pixel is decoded, so an image that
    would decompress to gigabytes is refused for what it claims to be. Right after
    decoding, an image over the pipeline's ``UPSAMPLING_MAX_IMAGE_SIZE`` (768x768) of area
    is resized to it with the pipeline's own ``_resize_if_exceeds_area``: for a prompt with
    one image that is exactly what ``upsample_prompt`` does next (it then leaves the image
    as it is), so the result is the reference's; a prompt's several images are each
    capped before the pipeline concatenates them (it would cap the concatenation only),
    so large ones differ slightly from the reference.
    """
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from PIL import Image

    target = _diffusers_flux2().UPSAMPLING_MAX_IMAGE_SIZE
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
        image = _open_image(blob, where)
        try:
            width, height = image.size
            if width * height > config.max_image_pixels:
                raise PayloadTooLarge(
                    f"{where} is {width}x{height} pixels; the limit is {config.max_image_pixels} pixels "
                    "(the model sees at most 768x768 anyway)"
                )
            image.load()
            rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidRequest(f"{where} cannot be decoded as PNG or JPEG ({type(exc).__name__})") from None
        finally:
            image.close()
        images.append(Flux2ImageProcessor._resize_if_exceeds_area(rgb, target))
    return images


# -- the queue ---------------------------------------------------------------------


class GenerationQueue:
    """Runs one generation at a time on its own thread; at most ``max_queued`` calls wait.

    Cancelling a caller (the client went away, its deadline passed) sets the
    generation's stop flag; the generator stays busy until ``generate`` notices it
    (after the current token), and only then is the next generation started.

    Args:
        max_queued: calls that may wait for the generator.
        metrics: where the queue's length is shown.
        max_per_user: calls one user may have waiting or generating at once (``None``: no cap).
    """

    def __init__(self, max_queued: int, metrics: EncoderMetrics | None = None, *, max_per_user: int | None = None):
        self.max_queued = max_queued
        self.max_per_user = max_per_user
        self._metrics = metrics
        self._free = asyncio.Semaphore(1)
        self._waiting = 0
        self._held: Counter[str] = Counter()  # per user: calls waiting or generating
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="upsample")
        self._stops: set[threading.Event] = set()

    @property
    def waiting(self) -> int:
        return self._waiting

    def held_by(self, user: str) -> int:
        """Calls ``user`` has waiting or generating now."""
        return self._held[user]

    def _let_go(self, user: str) -> None:
        self._held[user] -= 1
        if self._held[user] <= 0:
            del self._held[user]

    async def run(self, work: Callable[[Callable[[], bool]], Any], *, user: str = "", deadline: float | None = None):
        """``work(should_stop)`` on the generation thread, once the generator is free; returns its result.

        Raises:
            EncoderOverloaded: ``user`` already has ``max_per_user`` calls here, or ``max_queued`` calls wait.
            DeadlineExceeded: the deadline passed while waiting or generating.
            Cancelled: the server is stopping.
        """
        if self.max_per_user is not None and self._held[user] >= self.max_per_user:
            raise EncoderOverloaded(
                f"user {user!r} already has {self._held[user]} upsampling calls waiting or generating, the "
                "per-user share (--upsampling-max-per-user); wait for their answers. Encode is not affected.",
                retry_after_s=5.0,
            )
        if self._waiting >= self.max_queued:
            raise EncoderOverloaded(
                f"{self._waiting} upsampling calls are already waiting for the generator, its queue's limit "
                "(--upsampling-max-queue); retry in a few seconds. Encode is not affected.",
                retry_after_s=5.0,
            )
        self._held[user] += 1
        self._waiting += 1
        self._gauge()
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(self._free.acquire(), timeout)
        except TimeoutError:
            self._let_go(user)
            raise DeadlineExceeded("the deadline passed while waiting for the generator") from None
        except BaseException:
            self._let_go(user)
            raise
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
            self._let_go(user)
            raise Cancelled("the server is stopping") from None

        def freed() -> None:
            self._let_go(user)
            self._free.release()

        def finished(_):
            self._stops.discard(stop)
            try:
                loop.call_soon_threadsafe(freed)
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
    """Upsampling for every served model: availability, the images' headers, the queue, metrics.

    The request's cheap checks (counts, sizes, temperature, deadline) ran before, in the
    request policy's validation step (encoder_server/validation.py), on every transport.

    Args:
        upsamplers: per model name, its :class:`Upsampler`, or why it has none.
        config: the server's upsampling settings.
        metrics: where generated tokens and latencies are counted.
        users: users the API key file names (for the automatic per-user share of the queue).
    """

    def __init__(
        self,
        upsamplers: dict[str, Upsampler | str],
        config: UpsamplingConfig,
        metrics: EncoderMetrics | None,
        *,
        users: int = 0,
    ):
        self._upsamplers = upsamplers
        self.config = config
        self._metrics = metrics
        self.queue = GenerationQueue(config.max_queued, metrics, max_per_user=config.per_user_share(users))

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
        """Fill the upsampling fields of ``limits``.

        ``max_image_bytes`` is what one image may really be: no more than every image of a
        request together may be (``max_request_image_bytes``, which one gRPC message holds).
        """
        c = self.config
        limits.max_upsample_prompts_per_request = c.max_prompts_per_request
        limits.max_images_per_prompt = c.max_images_per_prompt
        limits.max_image_bytes = min(c.max_image_bytes, c.max_request_image_bytes)
        limits.max_image_pixels = c.max_image_pixels
        limits.max_upsample_temperature = c.max_temperature
        limits.max_upsample_new_tokens = c.max_new_tokens

    async def upsample(
        self,
        model: str,
        prompts: list[str],
        args: UpsampleArgs,
        *,
        user: str = "",
        deadline: float | None,
    ) -> UpsampleOutcome:
        """Queue and run one request that passed the policy (``args`` as validation returned them).

        ``deadline`` (``time.monotonic()``; ``None``: the client set none) is capped at
        ``config.timeout_s`` from now. Anything but our own errors that the generation raises
        is reported as INTERNAL (or RESOURCE_EXHAUSTED when out of memory) without its text.
        """
        upsampler = self.upsampler(model)
        c = self.config
        temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
        images = args.images or None
        if images is not None:
            if not upsampler.takes_images:
                raise UpsamplingUnavailable(
                    f"model {model!r} cannot upsample with images: {upsampler.no_images_reason}; send prompts only"
                )
            inspect_images(images, c)
        cap = time.monotonic() + c.timeout_s
        capped = deadline is None or cap < deadline
        if capped:
            deadline = cap
        t0 = time.perf_counter_ns()
        started: list[int] = []

        def work(should_stop):
            started.append(time.perf_counter_ns())
            # Decoded here, once the generator is this call's: waiting calls hold only bytes.
            decoded = None if images is None else [decode_images(b, c, prompt_index=i) for i, b in enumerate(images)]
            return upsampler.upsample(
                prompts, decoded, temperature=temperature, seed=args.seed, should_stop=should_stop
            )

        try:
            batch = await self.queue.run(work, user=user, deadline=deadline)
        except DeadlineExceeded:
            if capped:
                raise DeadlineExceeded(
                    f"the call ran past the server's limit of {c.timeout_s:g} s on one upsampling call "
                    "(--upsampling-timeout)"
                ) from None
            raise
        except Flux2RemoteError:
            raise
        except Exception as exc:
            raise as_reportable(exc, "upsampling") from None
        if self._metrics is not None:
            generated = sum(batch.generated_tokens)
            self._metrics.generated_tokens.labels(model=model).inc(generated)
            self._metrics.user_generated_tokens.labels(user=user).inc(generated)
            self._metrics.upsample_seconds.observe(batch.generation_ns / 1e9)
        return UpsampleOutcome(batch, temperature, started[0] - t0, upsampler.fingerprint)

    def close(self) -> None:
        self.queue.close()
