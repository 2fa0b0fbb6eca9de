"""Generate FLUX.2 images locally from remote prompt embeddings.

The text encoder (24B params for FLUX.2-dev) runs behind a flux2-remote encoder
service; this module loads only the DiT (``transformer/``), the VAE (``vae/``)
and the scheduler, and feeds diffusers' ``Flux2Pipeline`` with
``prompt_embeds=`` (the documented way to skip its text encoder). The
``text_encoder/`` and ``tokenizer/`` folders are never downloaded, opened or
instantiated.

    >>> from dit_client import DiTClient, DiTConfig
    >>> with DiTClient("gpu-box:50051", DiTConfig(model="black-forest-labs/FLUX.2-dev")) as client:
    ...     result = client.generate("a red fox in fresh snow", seed=42)
    ...     result.save("fox.png")

With ``quantization="none"`` the pixels equal what
``Flux2Pipeline.from_pretrained(model, dtype=...)`` makes with its own text
encoder for the same prompt, size, steps, guidance and seed, provided the
encoder service computes in the same dtype.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write
from common.errors import EncoderOverloaded, EncoderUnavailable, IntegrityError
from common.model_source import DEFAULT_MODEL, ModelSource, resolve_model
from dit_client.remote import RemoteTextEncoder, TLSConfig
from dit_client.stream import RetryPolicy
from dit_client.structured_prompt import render_structured_prompt, validate_structured_prompt

log = logging.getLogger(__name__)

# An interactive user waits a little for a busy or restarting encoder (at most
# ~8 s in all, or what the server's retry hint asks up to 30 s), then gets the error.
INTERACTIVE_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.5, max_backoff_s=30.0)

# What the client loads; nothing else of the model folder is read.
DIT_COMPONENTS = ("transformer", "vae", "scheduler")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
QUANTIZATIONS = ("auto", "nf4", "none")
OFFLOAD_MODES = ("none", "model", "group", "sequential")
# FLUX.2 was trained with up to 10 reference images.
MAX_REFERENCE_IMAGES = 10
MAX_REFERENCE_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGES_PER_CALL = 16
MAX_STEPS = 500
# 4096 x 4096 is 4x past what FLUX.2 was trained for; larger is a typo.
MAX_SIDE = 4096


class ClientConfigError(ValueError):
    """Settings that cannot work on this machine or with this model (CLI exit code 2)."""


@dataclass(frozen=True)
class DiTConfig:
    """How the client loads and runs the DiT and VAE.

    Attributes:
        model: hub id (``black-forest-labs/FLUX.2-dev``), pre-quantized repo
            (``diffusers/FLUX.2-dev-bnb-4bit``), local folder in the diffusers
            layout, or ``"demo"`` (tiny random model).
        revision: hub revision for hub ids.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: compute dtype, ``"bfloat16"`` or ``"float32"``.
        quantization: ``"nf4"`` (bitsandbytes 4-bit, CUDA only), ``"none"``, or
            ``"auto"``: on CUDA, NF4 unless the bf16 DiT fits the free VRAM (bf16 with
            group or sequential offload); none on CPU. A pre-quantized model is used as it is.
        offload: ``"none"``, ``"model"`` (``enable_model_cpu_offload``), ``"group"``
            (``enable_group_offload``, leaf level, CUDA streams) or ``"sequential"``
            (``enable_sequential_cpu_offload``); all but none need CUDA.
        attention_backend: a diffusers attention backend name (``"native"``,
            ``"flash"``, ``"sage"``...); None keeps the default (PyTorch SDPA).
        lora: path or hub id of a LoRA in safetensors format, or None.
        lora_scale: strength of the LoRA (0 disables it, 1 is as trained).
        embedding_cache_size: prompt embeddings kept on the client (LRU);
            FLUX.2-dev's are 15.7 MB each in bf16.
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "bfloat16"
    quantization: str = "auto"
    offload: str = "none"
    attention_backend: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    embedding_cache_size: int = 8

    def check(self) -> None:
        """Raise :class:`ClientConfigError` for values no machine could run."""
        if self.dtype not in DTYPES:
            raise ClientConfigError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ClientConfigError(
                f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANTIZATIONS)}"
            )
        if self.offload not in OFFLOAD_MODES:
            raise ClientConfigError(f"unknown offload mode {self.offload!r}; choose from {', '.join(OFFLOAD_MODES)}")
        if self.embedding_cache_size < 0:
            raise ClientConfigError("embedding_cache_size must be >= 0")
        if not (-10.0 <= self.lora_scale <= 10.0):
            raise ClientConfigError(f"lora scale {self.lora_scale} is outside [-10, 10]")


@dataclass
class GenerationResult:
    """What :meth:`DiTClient.generate` returns.

    Attributes:
        images: ``num_images`` PIL images, ``width`` x ``height`` pixels, RGB.
        seed: the seed used (drawn at random when none was given), for reproduction.
        prompt_text: the exact text the encoder received (canonical JSON for structured prompts).
        fingerprint: the encoder's model fingerprint.
        parameters: size, steps, guidance, model... as written into the PNG metadata.
        encode_s: seconds spent getting the embedding (0 on a client-cache hit).
        denoise_s: seconds in the pipeline call (denoising + VAE decode).
        demo: True when the encoder or the DiT is the random demo model.
    """

    images: list
    seed: int
    prompt_text: str
    fingerprint: str
    parameters: dict[str, Any]
    encode_s: float
    denoise_s: float
    demo: bool = False

    def save(self, out: str | os.PathLike) -> list[Path]:
        """Write the images as PNG, atomically; see :func:`save_images`."""
        return save_images(self.images, out, metadata=self.parameters)


class EmbeddingCache:
    """A small LRU of prompt embeddings keyed by ``(fingerprint, prompt text)``.

    The same prompt with other seeds or image counts then costs one request.
    Keys include the fingerprint, so embeddings of two encoder models never mix.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, fingerprint: str, prompt: str) -> torch.Tensor | None:
        key = (fingerprint, prompt)
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, fingerprint: str, prompt: str, embeds: torch.Tensor) -> None:
        if self.max_entries == 0:
            return
        self._entries[(fingerprint, prompt)] = embeds
        self._entries.move_to_end((fingerprint, prompt))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


# -- model folder facts ----------------------------------------------------


def read_transformer_config(source: ModelSource) -> dict[str, Any]:
    """``transformer/config.json`` of ``source``, read without loading any weights."""
    path = source.component("transformer") / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClientConfigError(f"cannot read the DiT config {path}: {exc}") from exc


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ClientConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ClientConfigError(f"--device {device} was asked for, but torch sees no CUDA device")
    return dev


def resolve_quantization(config: DiTConfig, transformer_config: dict[str, Any], device: torch.device) -> str:
    """``"prequantized"``, ``"nf4"`` or ``"none"``: what will actually be loaded, or a clear refusal."""
    pre = transformer_config.get("quantization_config")
    if pre:
        method = pre.get("quant_method", "unknown")
        if config.quantization == "none":
            raise ClientConfigError(
                f"{config.model} is pre-quantized ({method}); it cannot be loaded unquantized. "
                "Use --quantization nf4 (or auto), or the bf16 model black-forest-labs/FLUX.2-dev"
            )
        if method == "bitsandbytes" and device.type != "cuda":
            raise ClientConfigError(
                f"{config.model} is quantized with bitsandbytes (NF4), which needs a CUDA GPU, and this run is on "
                f"{device.type}. Use the bf16 model with --quantization none on CPU"
            )
        return "prequantized"
    if config.quantization == "nf4":
        if device.type != "cuda":
            raise ClientConfigError(
                "--quantization nf4 uses bitsandbytes, which needs a CUDA GPU, and this run is on "
                f"{device.type}. Use --quantization none (see `flux2-dit plan` for the memory it needs)"
            )
        return "nf4"
    if config.quantization == "auto" and device.type == "cuda":
        if config.offload in ("group", "sequential"):
            return "none"  # weights stream from RAM layer by layer; bf16 is the format those modes are made for
        from dit_client.plan import bf16_fits_on_gpu

        return "none" if bf16_fits_on_gpu(transformer_config, device) else "nf4"
    return "none"


# -- reference images and output -------------------------------------------


def load_reference_images(paths: Sequence[str | os.PathLike]) -> list:
    """Open up to 10 reference images as RGB PIL images, with a clear error for each bad one.

    Each must be at least 64 px a side with an aspect ratio up to 8:1 (the
    pipeline's limits); larger than 1 MP is scaled down by the pipeline.

    The pipeline encodes them with the local VAE; only the text goes to the encoder.
    """
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
    from PIL import Image, UnidentifiedImageError

    if len(paths) > MAX_REFERENCE_IMAGES:
        raise ClientConfigError(
            f"{len(paths)} reference images given; FLUX.2 takes at most {MAX_REFERENCE_IMAGES}"
        )
    images = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise ClientConfigError(f"reference image {path} is a directory, not an image file")
        if not path.is_file():
            raise ClientConfigError(f"reference image {path} does not exist")
        size = path.stat().st_size
        if size > MAX_REFERENCE_IMAGE_BYTES:
            raise ClientConfigError(
                f"reference image {path} is {size / 2**20:.0f} MiB; at most {MAX_REFERENCE_IMAGE_BYTES // 2**20} MiB"
            )
        try:
            with warnings.catch_warnings():
                # Pillow only warns below twice its pixel limit; a decompression bomb is an error here.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.load()
                    images.append(img.convert("RGB"))
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ClientConfigError(
                f"reference image {path} is not an image Pillow can read (PNG, JPEG, WebP...): {exc}"
            ) from None
        except OSError as exc:
            raise ClientConfigError(f"cannot read reference image {path}: {exc}") from None
        try:
            # The pipeline's own limits (at least 64 px a side, aspect ratio up to 8:1), checked up front.
            Flux2ImageProcessor.check_image_input(images[-1])
        except ValueError as exc:
            raise ClientConfigError(f"reference image {path}: {exc}") from None
    return images


def output_paths(out: str | os.PathLike, count: int) -> list[Path]:
    """``out`` for one image; ``stem-0.png``, ``stem-1.png``... for several."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ClientConfigError(f"output file {out} must end in .png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_images(images: Sequence, out: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``images`` as PNG at :func:`output_paths`, each through a temp file and ``os.replace``.

    ``metadata`` goes into a ``flux2-remote`` PNG text chunk as JSON, so a
    picture carries the prompt, seed and settings that made it.
    """
    from PIL.PngImagePlugin import PngInfo

    paths = output_paths(out, len(images))
    info = PngInfo()
    if metadata:
        info.add_itxt("flux2-remote", json.dumps(dict(metadata), ensure_ascii=False))
    for image, path in zip(images, paths, strict=True):
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG", pnginfo=info), durable=False)
    return paths


# -- the client --------------------------------------------------------------


class DiTClient:
    """FLUX.2 image generation with the text encoder on a remote service.

    Args:
        encoder: a :class:`RemoteTextEncoder`, or its ``host:port`` (then
            ``api_key``, ``tls`` and ``timeout`` configure the connection and the
            client closes it).
        config: how to load and run the DiT; see :class:`DiTConfig`.
        progress: show tqdm bars for model loading and denoising steps.

    The model loads on first use (or on :meth:`load`). Before any weights are
    read, the encoder's embedding width is checked against the DiT's
    ``joint_attention_dim``, so a mismatched pair fails in seconds, not after
    loading 20 GB.
    """

    def __init__(
        self,
        encoder: RemoteTextEncoder | str,
        config: DiTConfig = DiTConfig(),
        *,
        api_key: str | None = None,
        tls: TLSConfig | bool | None = None,
        timeout: float | None = None,
        progress: bool = True,
        retry: RetryPolicy = INTERACTIVE_RETRY,
    ):
        config.check()
        self.config = config
        self.progress = progress
        self.retry = retry
        if isinstance(encoder, str):
            kwargs = {"timeout": timeout} if timeout is not None else {}
            self.encoder = RemoteTextEncoder(encoder, api_key=api_key, tls=tls, **kwargs)
            self._owns_encoder = True
        else:
            self.encoder = encoder
            self._owns_encoder = False
        self.cache = EmbeddingCache(config.embedding_cache_size)
        self.pipe = None
        self._prepared: tuple[torch.device, str] | None = None
        self.source: ModelSource | None = None
        self.device: torch.device | None = None
        self.quantization: str | None = None

    # -- lifecycle -------------------------------------------------------

    def close(self) -> None:
        if self._owns_encoder:
            self.encoder.close()

    def __enter__(self) -> DiTClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config.dtype]

    def prepare(self) -> tuple[torch.device, str]:
        """Every check that needs no weights: device, model configs, quantization, encoder match.

        Cheap (a hub model gets only its JSON files), so bad settings, an
        unreachable encoder or a mismatched one fail in seconds. Returns
        ``(device, quantization)``.
        """
        if self._prepared is not None:
            return self._prepared
        cfg = self.config
        # 1. Settings that cannot work here fail before anything is read or downloaded.
        device = resolve_device(cfg.device)
        if cfg.offload != "none" and device.type != "cuda":
            raise ClientConfigError(
                f"--offload {cfg.offload} moves weights between CPU RAM and a CUDA GPU; this run is on "
                f"{device.type}, where everything already lives in RAM. Use --offload none"
            )
        # 2. Only the DiT's components' configs: the text encoder is never downloaded.
        configs = resolve_model(cfg.model, components=DIT_COMPONENTS, revision=cfg.revision, configs_only=True)
        transformer_config = read_transformer_config(configs)
        quantization = resolve_quantization(cfg, transformer_config, device)
        if cfg.offload == "sequential" and quantization != "none":
            raise ClientConfigError(
                "--offload sequential is not supported with NF4 weights here; use --offload model or group with "
                "NF4, or --quantization none with sequential offload"
            )
        # 3. The encoder must produce what this DiT reads.
        self.check_encoder(transformer_config)
        self._prepared = (device, quantization)
        return self._prepared

    def load(self):
        """:meth:`prepare`, then download (if needed) and load DiT + VAE + scheduler; return the pipeline."""
        if self.pipe is not None:
            return self.pipe
        cfg = self.config
        device, quantization = self.prepare()
        # 4. Load the three components (the weights of a hub model are fetched here).
        source = resolve_model(cfg.model, components=DIT_COMPONENTS, revision=cfg.revision)
        pipe = self._load_pipeline(source, quantization, device)
        # 5. Extras, then placement (LoRA and attention hooks go in before offload hooks).
        if cfg.lora:
            self._load_lora(pipe)
        if cfg.attention_backend:
            set_attention_backend(pipe, cfg.attention_backend)
        apply_offload(pipe, cfg.offload, device)
        pipe.set_progress_bar_config(disable=not self.progress, desc="denoising")
        self.pipe, self.source, self.device, self.quantization = pipe, source, device, quantization
        return pipe

    def check_encoder(self, transformer_config: Mapping[str, Any]):
        """Raise :class:`IntegrityError` unless the encoder's embedding width is the DiT's ``joint_attention_dim``."""
        info = self.encoder.info()
        expected = transformer_config.get("joint_attention_dim")
        if expected is None:  # config.json leaves out defaults: the class default is FLUX.2-dev's
            import inspect

            from diffusers import Flux2Transformer2DModel

            expected = inspect.signature(Flux2Transformer2DModel.__init__).parameters["joint_attention_dim"].default
        if info.embedding_dim != expected:
            raise IntegrityError(
                f"the encoder at {self.encoder.target} (model {info.model_id or '?'}, fingerprint {info.fingerprint}) "
                f"makes {info.embedding_dim}-wide embeddings, but the DiT of {self.config.model} expects "
                f"joint_attention_dim {expected}: they are different models. Point --encoder at a server "
                f"running the text encoder that belongs to this DiT"
            )
        return info

    def _load_pipeline(self, source: ModelSource, quantization: str, device: torch.device):
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2Pipeline,
            Flux2Transformer2DModel,
        )
        from tqdm.auto import tqdm

        dtype = self.dtype
        transformer_kwargs: dict[str, Any] = {"dtype": dtype}
        if quantization == "nf4":
            from diffusers import BitsAndBytesConfig

            transformer_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        loaders = [
            ("transformer", lambda p: Flux2Transformer2DModel.from_pretrained(p, **transformer_kwargs)),
            ("vae", lambda p: AutoencoderKLFlux2.from_pretrained(p, dtype=dtype)),
            ("scheduler", lambda p: FlowMatchEulerDiscreteScheduler.from_pretrained(p)),
        ]
        if device.type == "cuda" and self.config.offload == "none":
            # Straight to the GPU, shard by shard, instead of all of it through host RAM first.
            transformer_kwargs["device_map"] = str(device)
        parts: dict[str, Any] = {}
        with tqdm(loaders, desc="loading model", unit="component", disable=not self.progress) as bar:
            for name, load in bar:
                bar.set_postfix_str(name)
                try:
                    parts[name] = load(source.component(name))
                except (OSError, ValueError, RuntimeError) as exc:
                    raise ClientConfigError(f"cannot load {name} from {source.component(name)}: {exc}") from exc
        return Flux2Pipeline(text_encoder=None, tokenizer=None, **parts)

    def _load_lora(self, pipe) -> None:
        cfg = self.config
        try:
            # safetensors only: a .bin LoRA would be unpickled.
            pipe.load_lora_weights(cfg.lora, adapter_name="lora", use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ClientConfigError(f"cannot load LoRA {cfg.lora}: {exc}") from exc
        pipe.set_adapters(["lora"], adapter_weights=[cfg.lora_scale])

    # -- generation ------------------------------------------------------

    def prompt_embeds(self, prompt: str) -> tuple[torch.Tensor, bool]:
        """The embedding of one prompt text: ``([1, 512, D] CPU tensor in the server dtype, cache_hit)``."""
        fingerprint = self.encoder.info().fingerprint
        cached = self.cache.get(fingerprint, prompt)
        if cached is not None:
            return cached, True
        embeds = self._encode_retrying(prompt)
        self.cache.put(fingerprint, prompt, embeds)
        return embeds, False

    def _encode_retrying(self, prompt: str) -> torch.Tensor:
        """One prompt from the service; a busy or restarting encoder is retried per ``self.retry``."""
        attempt = 0
        while True:
            try:
                return self.encoder.encode([prompt])
            except (EncoderOverloaded, EncoderUnavailable) as exc:
                attempt += 1
                if attempt >= self.retry.max_attempts:
                    raise
                wait = self.retry.wait_before_retry(attempt, exc)  # raises when the server asks for too long
                log.warning("encoder: %s; retrying in %.1f s (attempt %d of %d)", exc, wait, attempt + 1,
                            self.retry.max_attempts)
                time.sleep(wait)

    def generate(
        self,
        prompt: str | Mapping[str, Any],
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int = 28,
        guidance: float = 4.0,
        seed: int | None = None,
        num_images: int = 1,
        images: Sequence[str | os.PathLike] = (),
    ) -> GenerationResult:
        """Make ``num_images`` pictures of ``prompt``.

        Args:
            prompt: text, or a structured prompt (a dict in the FLUX.2 JSON
                form, sent as canonical JSON text).
            height, width: output size in pixels; multiples of 16 for FLUX.2-dev.
            steps: denoising steps (28 is the FLUX.2-dev default on the model card).
            guidance: embedded guidance scale (FLUX.2-dev is guidance-distilled: one pass per step).
            seed: ``torch.Generator(device).manual_seed(seed)`` on the execution
                device, as in the diffusers docs; None draws one and reports it.
            num_images: images from one generator, as ``num_images_per_prompt``.
            images: up to 10 reference images (paths) for multi-reference editing;
                they are encoded by the local VAE.

        Returns:
            :class:`GenerationResult` with PIL images and the seed and settings used.
        """
        # 1. Check inputs.
        prompt_text = self._prompt_text(prompt)
        _check_int("steps", steps, 1, MAX_STEPS)
        _check_int("num_images", num_images, 1, MAX_IMAGES_PER_CALL)
        if not isinstance(guidance, (int, float)) or not (0.0 <= guidance <= 100.0):
            raise ClientConfigError(f"guidance {guidance!r} must be a number in [0, 100]")
        if seed is None:
            seed = secrets.randbelow(2**32)
        _check_int("seed", seed, 0, 2**64 - 1)
        references = load_reference_images(images) if images else None

        # 2. Prompt embeddings from the service (or the client cache), after the
        # cheap checks but before the weights: a refused prompt or quota then
        # costs seconds, not a model download and load.
        self.prepare()
        t0 = time.perf_counter()
        embeds, _ = self.prompt_embeds(prompt_text)
        encode_s = time.perf_counter() - t0
        pipe = self.load()
        multiple = pipe.vae_scale_factor * 2
        _check_int("height", height, multiple, MAX_SIDE, multiple_of=multiple)
        _check_int("width", width, multiple, MAX_SIDE, multiple_of=multiple)
        device = pipe._execution_device

        # 3. Denoise and decode.
        generator = torch.Generator(device=device).manual_seed(seed)
        t1 = time.perf_counter()
        output = pipe(
            image=references,
            prompt_embeds=embeds.to(device=device, dtype=self.dtype),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            num_images_per_prompt=num_images,
            generator=generator,
        )
        denoise_s = time.perf_counter() - t1

        info = self.encoder.info()
        parameters = {
            "prompt": prompt_text,
            "seed": seed,
            "height": height,
            "width": width,
            "steps": steps,
            "guidance": float(guidance),
            "num_images": num_images,
            "reference_images": [Path(p).name for p in images],
            "model": self.config.model,
            "dtype": self.config.dtype,
            "quantization": self.quantization,
            "lora": self.config.lora,
            "lora_scale": self.config.lora_scale if self.config.lora else None,
            "encoder_fingerprint": info.fingerprint,
        }
        return GenerationResult(
            images=list(output.images),
            seed=seed,
            prompt_text=prompt_text,
            fingerprint=info.fingerprint,
            parameters=parameters,
            encode_s=encode_s,
            denoise_s=denoise_s,
            demo=bool(info.demo or (self.source is not None and self.source.demo)),
        )

    @staticmethod
    def _prompt_text(prompt: str | Mapping[str, Any]) -> str:
        if isinstance(prompt, Mapping):
            validate_structured_prompt(dict(prompt))
            return render_structured_prompt(prompt)
        if not isinstance(prompt, str):
            raise ClientConfigError(f"prompt must be text or a structured-prompt dict, not {type(prompt).__name__}")
        return prompt


def _check_int(name: str, value: Any, low: int, high: int, *, multiple_of: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise ClientConfigError(f"{name} {value!r} must be an integer in [{low}, {high}]")
    if value % multiple_of:
        raise ClientConfigError(f"{name} {value} must be a multiple of {multiple_of} for this model")


def set_attention_backend(pipe, name: str) -> None:
    """Switch the DiT's attention to diffusers backend ``name`` (``native``, ``flash``, ``sage``...)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [b.value for b in AttentionBackendName if not b.value.startswith("_")]
    if name not in {b.value for b in AttentionBackendName}:
        raise ClientConfigError(f"unknown attention backend {name!r}; diffusers knows: {', '.join(known)}")
    try:
        pipe.transformer.set_attention_backend(name)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise ClientConfigError(f"attention backend {name!r} cannot run here: {exc}") from exc


def apply_offload(pipe, mode: str, device: torch.device) -> None:
    """Place the pipeline on ``device`` according to ``mode``.

    - ``none``: everything on ``device``.
    - ``model``: ``enable_model_cpu_offload``: one whole model (DiT, then VAE) on the GPU at a time.
    - ``group``: ``enable_group_offload`` at leaf level; with CUDA, weights stream in
      on a side stream while the previous layer computes.
    - ``sequential``: ``enable_sequential_cpu_offload``: each leaf moved when called (least VRAM, slowest).
    """
    if mode == "none":
        pipe.to(device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "group":
        pipe.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device.type == "cuda",
        )
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ClientConfigError(f"unknown offload mode {mode!r}; choose from {', '.join(OFFLOAD_MODES)}")


def generate(
    prompt: str | Mapping[str, Any],
    *,
    encoder: RemoteTextEncoder | str,
    config: DiTConfig = DiTConfig(),
    out: str | os.PathLike | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> GenerationResult:
    """One-shot helper: load, generate, optionally save to ``out``; see :meth:`DiTClient.generate`."""
    with DiTClient(encoder, config, progress=progress) as client:
        result = client.generate(prompt, **kwargs)
    if out is not None:
        result.save(out)
    return result
