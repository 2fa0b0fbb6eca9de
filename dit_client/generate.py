"""Generate FLUX.2 images locally from remote prompt embeddings.

The text encoder (24B params for FLUX.2-dev) runs behind a flux2-remote encoder
service; this module loads only the DiT (``transformer/``), the VAE (``vae/``)
and the scheduler, and feeds diffusers' ``Flux2Pipeline`` (or the
``Flux2KleinPipeline`` / ``Flux2KleinKVPipeline`` the model's
``model_index.json`` names) with ``prompt_embeds=`` (the documented way to
skip its text encoder; a [klein] base model also gets
``negative_prompt_embeds=`` for classifier-free guidance). The encoder
server's model is matched to the DiT by :mod:`dit_client.model_match`. The
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

This module is the run: :class:`DiTClient` and :func:`generate`. Settings live
in :mod:`dit_client.dit_config`, loading in :mod:`dit_client.loading`, pictures
in :mod:`dit_client.images`, the embedding LRU in :mod:`dit_client.embedding_cache`; their
public names are importable from here too.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.model_source import ModelSource, resolve_model
from dit_client.connection import TLSConfig
from dit_client.dit_config import (  # noqa: F401  (re-exported: `from dit_client.generate import ...`)
    DIT_COMPONENTS,
    DTYPES,
    MAX_IMAGES_PER_CALL,
    MAX_REFERENCE_IMAGE_BYTES,
    MAX_REFERENCE_IMAGES,
    MAX_SIDE,
    MAX_STEPS,
    OFFLOAD_MODES,
    QUANTIZATIONS,
    ClientConfigError,
    DiTConfig,
    check_int,
    offload_refusal,
)
from dit_client.embedding_cache import EmbeddingCache  # noqa: F401 - re-exported: callers import it from dit_client.generate
from dit_client.images import load_reference_images, output_paths, save_images  # noqa: F401 - re-exported: callers import it from dit_client.generate
from dit_client.loading import (  # noqa: F401 - re-exported: callers import it from dit_client.generate
    apply_offload,
    load_lora,
    load_pipeline,
    pixel_multiple,
    read_component_config,
    read_transformer_config,
    resolve_device,
    resolve_quantization,
    set_attention_backend,
)
from dit_client.model_match import EncoderMismatch, PipelineKind, choose_encoder_model, read_pipeline_kind  # noqa: F401 - re-exported: callers import it from dit_client.generate
from dit_client.remote import DEFAULT_TIMEOUT_S, RemoteTextEncoder
from dit_client.retry import RetryPolicy, call_with_retries
from dit_client.structured_prompt import render_structured_prompt, validate_structured_prompt

# An interactive user waits a little for a busy or restarting encoder (at most
# ~8 s in all, or what the server's retry hint asks up to 30 s), then gets the error.
INTERACTIVE_RETRY = RetryPolicy(max_attempts=5, initial_backoff_s=0.5, max_backoff_s=30.0)


@dataclass
class GenerationResult:
    """What :meth:`DiTClient.generate` returns.

    Attributes:
        images: ``num_images`` PIL images, ``width`` x ``height`` pixels, RGB.
        seed: the seed used (drawn at random when none was given), for reproduction.
        prompt_text: the exact text the encoder received (canonical JSON for structured prompts).
        fingerprint: the encoder's model fingerprint.
        encoder_model: the name of the server's model that made the embeddings
            (``""`` for a server from before several models).
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
    encoder_model: str = ""

    def save(self, out: str | os.PathLike) -> list[Path]:
        """Write the images as PNG, atomically; see :func:`save_images`."""
        return save_images(self.images, out, metadata=self.parameters)


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
    read, the pipeline class (``model_index.json``) and the DiT's
    ``joint_attention_dim`` pick the encoder's model: the one of the pipeline's
    family ([dev] or [klein]) that makes embeddings of that width
    (``config.encoder_model``, or the encoder's own ``model``, names one
    instead). A mismatched pair fails in seconds, not after loading 20 GB.
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
            self.encoder = RemoteTextEncoder(
                encoder, api_key=api_key, tls=tls, timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout
            )
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
        self.pixel_multiple: int | None = None  # pixels per latent token side, known after prepare()
        self.kind: PipelineKind | None = None  # the pipeline the model folder names, known after prepare()
        self.encoder_model: str | None = None  # the server model feeding this DiT, known after prepare()

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
        """The DiT's compute dtype."""
        return DTYPES[self.config.dtype]

    def prepare(self) -> tuple[torch.device, str]:
        """Every check that needs no weights: device, model configs, quantization, offload, encoder match.

        Cheap (a hub model gets only its JSON files), so bad settings, an
        unreachable encoder or a mismatched one fail in seconds. Returns
        ``(device, quantization)``; :attr:`pixel_multiple` is known afterwards.
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
        self.kind = read_pipeline_kind(configs, transformer_config)
        self.pixel_multiple = pixel_multiple(read_component_config(configs, "vae"))
        quantization = resolve_quantization(cfg, transformer_config, device)
        # The same table `flux2-dit plan` reads, so it never recommends what is refused here.
        why = offload_refusal(quantization, cfg.offload)
        if why:
            raise ClientConfigError(why)
        # 3. The encoder must serve a model whose embeddings this DiT reads.
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
        pipe = load_pipeline(source, quantization, device, cfg, progress=self.progress, kind=self.kind)
        # 5. Extras, then placement (LoRA and attention hooks go in before offload hooks).
        if cfg.lora:
            load_lora(pipe, cfg.lora, cfg.lora_scale)
        if cfg.attention_backend:
            set_attention_backend(pipe, cfg.attention_backend)
        apply_offload(pipe, cfg.offload, device)
        pipe.set_progress_bar_config(disable=not self.progress, desc="denoising")
        self.pipe, self.source, self.device, self.quantization = pipe, source, device, quantization
        return pipe

    def check_encoder(self, transformer_config: Mapping[str, Any]):
        """Pick the encoder's model for this DiT (:attr:`encoder_model`) and return its info.

        Raises :class:`EncoderMismatch` (exit 2) when the server serves no model of
        the pipeline's family with the DiT's ``joint_attention_dim`` as width, or
        when the model named by ``config.encoder_model`` is not one.
        """
        kind = self.kind  # set by prepare(), which calls this
        assert kind is not None
        wanted = self.config.encoder_model or self.encoder.model
        self.encoder_model = choose_encoder_model(
            self.encoder.info(model=""), kind, wanted=wanted, target=self.encoder.target, dit_model=self.config.model
        )
        return self.encoder.info(model=self.encoder_model)

    # -- generation ------------------------------------------------------

    def prompt_embeds(self, prompt: str) -> tuple[torch.Tensor, bool]:
        """The embedding of one prompt text: ``([1, 512, D] CPU tensor in the server dtype, cache_hit)``."""
        self.prepare()  # picks the encoder's model
        fingerprint = self.encoder.info(model=self.encoder_model).fingerprint
        cached = self.cache.get(fingerprint, prompt)
        if cached is not None:
            return cached, True
        embeds = self._encode_retrying(prompt)
        self.cache.put(fingerprint, prompt, embeds)
        return embeds, False

    def _encode_retrying(self, prompt: str) -> torch.Tensor:
        """One prompt from the service; a busy or restarting encoder is retried per ``self.retry``."""
        return call_with_retries(
            lambda: self.encoder.encode([prompt], model=self.encoder_model), self.retry, what="encoder"
        )

    def generate(
        self,
        prompt: str | Mapping[str, Any],
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        images: Sequence[str | os.PathLike] = (),
        negative_prompt: str | Mapping[str, Any] | None = "",
        upsample_temperature: float | None = None,
    ) -> GenerationResult:
        """Make ``num_images`` pictures of ``prompt``.

        Args:
            prompt: text, or a structured prompt (a dict in the FLUX.2 JSON
                form, sent as canonical JSON text).
            height, width: output size in pixels; multiples of 16 for FLUX.2-dev.
            steps: denoising steps; None: 28 for FLUX.2-dev (its model card), 4 for a
                step-distilled [klein], 50 for a [klein] base model (``Flux2KleinPipeline``'s default).
            guidance: ``guidance_scale``; None is the pipeline's default. For [dev] the embedded
                guidance (guidance-distilled: one pass per step, default 4); for a [klein] base
                model the classifier-free guidance scale (default 4: two passes per step, the
                second on ``negative_prompt``); a distilled [klein] ignores it (default 1).
            seed: ``torch.Generator(device).manual_seed(seed)`` on the execution
                device, as in the diffusers docs; None draws one and reports it.
            num_images: images from one generator, as ``num_images_per_prompt``.
            images: up to 10 reference images (paths) for multi-reference editing;
                they are encoded by the local VAE.
            negative_prompt: for [klein] base models with guidance above 1, the prompt whose
                embedding classifier-free guidance steers away from (fetched from the encoder
                like the prompt; ``""`` as in diffusers). None refuses such a run. Unused by
                models without CFG.
            upsample_temperature: rewrite ``prompt`` on the encoder first (prompt upsampling,
                FLUX.2-dev's ``caption_upsample_temperature``; the server must run with
                ``--upsampling``), sampling at this temperature (0.15 is the reference's); the
                reference images, if any, go with it (image-to-image). The rewritten prompt is
                what is encoded; the PNG metadata keeps both. None: the prompt as given.

        Returns:
            :class:`GenerationResult` with PIL images and the seed and settings used.
        """
        # 1. Check inputs.
        prompt_text = self._prompt_text(prompt)
        if steps is not None:
            check_int("steps", steps, 1, MAX_STEPS)
        check_int("num_images", num_images, 1, MAX_IMAGES_PER_CALL)
        if guidance is not None and (not isinstance(guidance, (int, float)) or not (0.0 <= guidance <= 100.0)):
            raise ClientConfigError(f"guidance {guidance!r} must be a number in [0, 100]")
        if seed is None:
            seed = secrets.randbelow(2**32)
        check_int("seed", seed, 0, 2**64 - 1)
        references = load_reference_images(images) if images else None
        self.prepare()  # configs only: the size rule below comes from the VAE's config
        multiple, kind = self.pixel_multiple, self.kind
        assert multiple is not None and kind is not None  # both known after prepare()
        check_int("height", height, multiple, MAX_SIDE, multiple_of=multiple)
        check_int("width", width, multiple, MAX_SIDE, multiple_of=multiple)
        if steps is None:
            steps = kind.default_steps()
        if guidance is None:
            guidance = kind.default_guidance()
        elif not kind.takes_guidance():
            raise ClientConfigError(
                f"{self.config.model} is a {kind.class_name}, which takes no guidance; leave out --guidance"
            )
        cfg = kind.uses_cfg(guidance)
        if cfg and negative_prompt is None:
            raise ClientConfigError(
                f"{self.config.model} is a base (not distilled) {kind.class_name}: guidance {guidance:g} > 1 runs "
                "classifier-free guidance, which needs a negative prompt's embedding; give a negative prompt "
                "(the empty string is diffusers' default), or guidance 1 to turn CFG off"
            )
        negative_text = self._prompt_text(negative_prompt) if cfg and negative_prompt is not None else None

        # 2. Prompt upsampling on the service, when asked, before the prompt is encoded.
        upsampled = None
        if upsample_temperature is not None:
            if not isinstance(prompt, str):
                raise ClientConfigError(
                    "prompt upsampling rewrites a text prompt; a structured prompt is detailed already"
                )
            refs = [list(images)] if images else None
            upsampled = call_with_retries(
                lambda: self.encoder.upsample_with_metadata(
                    [prompt_text], refs, upsample_temperature, model=self.encoder_model
                ),
                self.retry,
                what="encoder",
            )
            prompt_text = upsampled.texts[0]

        # 3. Prompt embeddings from the service (or the client cache), after the
        # cheap checks but before the weights: a refused prompt or quota then
        # costs seconds, not a model download and load. A base [klein] model
        # with CFG needs the negative prompt's as well.
        t0 = time.perf_counter()
        embeds, _ = self.prompt_embeds(prompt_text)
        negative_embeds = self.prompt_embeds(negative_text)[0] if negative_text is not None else None
        encode_s = time.perf_counter() - t0
        pipe = self.load()
        device = pipe._execution_device

        # 4. Denoise and decode.
        generator = torch.Generator(device=device).manual_seed(seed)
        extra: dict[str, Any] = {}
        if kind.takes_guidance():
            extra["guidance_scale"] = float(guidance)
        if negative_embeds is not None:  # CFG
            extra["negative_prompt_embeds"] = negative_embeds.to(device=device, dtype=self.dtype)
        t1 = time.perf_counter()
        output = pipe(
            image=references,
            prompt_embeds=embeds.to(device=device, dtype=self.dtype),
            height=height,
            width=width,
            num_inference_steps=steps,
            num_images_per_prompt=num_images,
            generator=generator,
            **extra,
        )
        denoise_s = time.perf_counter() - t1

        info = self.encoder.info(model=self.encoder_model)
        parameters = {
            "prompt": prompt_text,
            "seed": seed,
            "height": height,
            "width": width,
            "steps": steps,
            "guidance": float(guidance),
            "negative_prompt": negative_text,
            "num_images": num_images,
            "reference_images": [Path(p).name for p in images],
            "model": self.config.model,
            "pipeline": kind.class_name,
            "dtype": self.config.dtype,
            "quantization": self.quantization,
            "lora": self.config.lora,
            "lora_scale": self.config.lora_scale if self.config.lora else None,
            "encoder_fingerprint": info.fingerprint,
            "encoder_model": self.encoder_model,
        }
        if upsampled is not None:
            parameters.update(
                original_prompt=prompt if isinstance(prompt, str) else None,
                upsample_temperature=upsampled.temperature,
                upsample_seed=upsampled.seed,
            )
        return GenerationResult(
            images=list(output.images),
            seed=seed,
            prompt_text=prompt_text,
            fingerprint=info.fingerprint,
            parameters=parameters,
            encode_s=encode_s,
            denoise_s=denoise_s,
            demo=bool(info.demo or (self.source is not None and self.source.demo)),
            encoder_model=self.encoder_model or "",
        )

    @staticmethod
    def _prompt_text(prompt: str | Mapping[str, Any]) -> str:
        if isinstance(prompt, Mapping):
            validate_structured_prompt(dict(prompt))
            return render_structured_prompt(prompt)
        if not isinstance(prompt, str):
            raise ClientConfigError(f"prompt must be text or a structured-prompt dict, not {type(prompt).__name__}")
        return prompt


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
