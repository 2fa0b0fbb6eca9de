"""Loading the DiT, VAE and scheduler: model-folder facts, device, quantization, offload.

Only ``transformer/``, ``vae/`` and ``scheduler/`` are read; the text encoder
and tokenizer stay on the encoder service.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from common.devices import DeviceUnavailable
from common.devices import resolve_device as _resolve_device
from common.model_source import ModelSource
from dit_client.dit_config import OFFLOAD_MODES, ClientConfigError, DiTConfig


def read_component_config(source: ModelSource, component: str) -> dict[str, Any]:
    """``<component>/config.json`` of ``source``, read without loading any weights."""
    path = source.component(component) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClientConfigError(f"cannot read the {component} config {path}: {exc}") from exc


def read_transformer_config(source: ModelSource) -> dict[str, Any]:
    """``transformer/config.json`` of ``source``, read without loading any weights."""
    return read_component_config(source, "transformer")


def pixel_multiple(vae_config: dict[str, Any]) -> int:
    """Pixels per latent token side: the VAE's downsampling times the pipeline's 2x2 patchify (16 for FLUX.2).

    The same figure as ``Flux2Pipeline.vae_scale_factor * 2``, from the config alone.
    """
    import inspect

    from diffusers import AutoencoderKLFlux2

    blocks = vae_config.get("block_out_channels")
    if blocks is None:  # config.json leaves out defaults: the class default is FLUX.2's
        blocks = inspect.signature(AutoencoderKLFlux2.__init__).parameters["block_out_channels"].default
    return 2 ** (len(blocks) - 1) * 2


def resolve_device(device: str) -> torch.device:
    """:func:`common.devices.resolve_device`, with its refusal as a :class:`ClientConfigError`."""
    try:
        return _resolve_device(device)
    except DeviceUnavailable as exc:
        raise ClientConfigError(str(exc)) from None


def resolve_quantization(config: DiTConfig, transformer_config: dict[str, Any], device: torch.device) -> str:
    """``"prequantized"``, ``"nf4"``, ``"int8"`` or ``"none"``: what will actually be loaded, or a clear refusal."""
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
    if config.quantization in ("nf4", "int8"):
        if device.type != "cuda":
            raise ClientConfigError(
                f"--quantization {config.quantization} uses bitsandbytes, which needs a CUDA GPU, and this run is on "
                f"{device.type}. Use --quantization none (see `flux2-dit plan` for the memory it needs)"
            )
        return config.quantization
    if config.quantization == "auto" and device.type == "cuda":
        if config.offload in ("group", "sequential"):
            return "none"  # weights stream from RAM layer by layer; bf16 is the format those modes are made for
        from dit_client.plan import bf16_fits_on_gpu

        return "none" if bf16_fits_on_gpu(transformer_config, device) else "nf4"
    return "none"


def load_pipeline(
    source: ModelSource, quantization: str, device: torch.device, config: DiTConfig, *, progress: bool = True, kind=None
):
    """``Flux2Pipeline(text_encoder=None, tokenizer=None, ...)`` with the DiT, VAE and scheduler of ``source``.

    The DiT is loaded in ``config.dtype``, quantized per ``quantization``; on
    CUDA without offload it goes straight to ``device``, shard by shard.
    ``kind`` (:class:`dit_client.model_match.PipelineKind`) names another
    pipeline class (``Flux2KleinPipeline``...) and its ``is_distilled``.
    """
    import inspect

    import diffusers
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from tqdm.auto import tqdm

    from dit_client.dit_config import DTYPES

    dtype = DTYPES[config.dtype]
    transformer_kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization in ("nf4", "int8"):
        from diffusers import BitsAndBytesConfig

        transformer_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            if quantization == "nf4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    loaders = [
        ("transformer", lambda p: Flux2Transformer2DModel.from_pretrained(p, **transformer_kwargs)),
        ("vae", lambda p: AutoencoderKLFlux2.from_pretrained(p, dtype=dtype)),
        ("scheduler", lambda p: FlowMatchEulerDiscreteScheduler.from_pretrained(p)),
    ]
    if device.type == "cuda" and config.offload == "none":
        # Straight to the GPU, shard by shard, instead of all of it through host RAM first.
        transformer_kwargs["device_map"] = str(device)
    parts: dict[str, Any] = {}
    with tqdm(loaders, desc="loading model", unit="component", disable=not progress) as bar:
        for name, load in bar:
            bar.set_postfix_str(name)
            try:
                parts[name] = load(source.component(name))
            except (OSError, ValueError, RuntimeError) as exc:
                raise ClientConfigError(f"cannot load {name} from {source.component(name)}: {exc}") from exc
    pipeline_class = getattr(diffusers, kind.class_name if kind is not None else "Flux2Pipeline")
    if kind is not None and "is_distilled" in inspect.signature(pipeline_class.__init__).parameters:
        parts["is_distilled"] = kind.is_distilled
    return pipeline_class(text_encoder=None, tokenizer=None, **parts)


def load_lora(pipe, lora: str, scale: float) -> None:
    """Load a safetensors LoRA into ``pipe`` as adapter ``"lora"`` at strength ``scale``."""
    try:
        # safetensors only: a .bin LoRA would be unpickled.
        pipe.load_lora_weights(lora, adapter_name="lora", use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ClientConfigError(f"cannot load LoRA {lora}: {exc}") from exc
    pipe.set_adapters(["lora"], adapter_weights=[scale])


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
