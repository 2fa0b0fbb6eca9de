"""What the DiT client may be asked to do: :class:`DiTConfig`, its allowed values, and their rules.

The rule of which ``--offload`` mode works with which weight format lives here
(:func:`offload_refusal`), so ``flux2-dit generate`` and ``flux2-dit plan``
read the same table and ``plan`` never recommends what ``generate`` refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.dtypes import dtype_names, torch_dtype
from common.model_source import DEFAULT_MODEL

# What the client loads; nothing else of the model folder is read.
DIT_COMPONENTS = ("transformer", "vae", "scheduler")
# Compute dtypes of the DiT (float16 overflows in FLUX.2's activations).
DTYPES = {name: torch_dtype(name) for name in dtype_names(("bfloat16", "float32"))}
# nf4: bitsandbytes 4-bit; int8: bitsandbytes LLM.int8 (both CUDA only); auto: see DiTConfig.
QUANTIZATIONS = ("auto", "nf4", "int8", "none")
OFFLOAD_MODES = ("none", "model", "group", "sequential")
# Offload modes each loaded weight format works with. Sequential offload moves
# single parameters, which bitsandbytes' packed weights do not survive; LLM.int8
# layers keep state on the GPU that accelerate's offload hooks do not move.
OFFLOADS_FOR = {
    "none": OFFLOAD_MODES,
    "nf4": ("none", "model", "group"),
    "prequantized": ("none", "model", "group"),
    "int8": ("none",),
}
# FLUX.2 was trained with up to 10 reference images.
MAX_REFERENCE_IMAGES = 10
MAX_REFERENCE_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGES_PER_CALL = 16
MAX_STEPS = 500
# 4096 x 4096 is 4x past what FLUX.2 was trained for; larger is a typo.
MAX_SIDE = 4096


class ClientConfigError(ValueError):
    """Settings that cannot work on this machine or with this model (CLI exit code 2)."""


def offload_refusal(quantization: str, offload: str) -> str | None:
    """Why ``--offload offload`` cannot run with ``quantization`` weights, or None when it can.

    ``quantization`` is what is loaded: ``"none"``, ``"nf4"``, ``"int8"`` or ``"prequantized"``.
    """
    allowed = OFFLOADS_FOR.get(quantization, ())
    if offload in allowed:
        return None
    what = {"nf4": "NF4", "int8": "int8", "prequantized": "pre-quantized"}.get(quantization, quantization)
    others = ", ".join(m for m in allowed if m != "none") or "none"
    return (
        f"--offload {offload} is not supported with {what} weights here; with {what} use --offload "
        f"{others}, or --quantization none for --offload {offload}"
    )


def check_int(name: str, value: Any, low: int, high: int, *, multiple_of: int = 1) -> None:
    """Raise :class:`ClientConfigError` unless ``value`` is an int in ``[low, high]`` and a multiple of ``multiple_of``."""
    if isinstance(value, bool) or not isinstance(value, int) or not (low <= value <= high):
        raise ClientConfigError(f"{name} {value!r} must be an integer in [{low}, {high}]")
    if value % multiple_of:
        raise ClientConfigError(f"{name} {value} must be a multiple of {multiple_of} for this model")


@dataclass(frozen=True)
class DiTConfig:
    """How the client loads and runs the DiT and VAE.

    Attributes:
        model: hub id (``black-forest-labs/FLUX.2-dev``), pre-quantized repo
            (``diffusers/FLUX.2-dev-bnb-4bit``), local folder in the diffusers
            layout, or ``"demo"`` / ``"demo-klein"`` (tiny random [dev] / [klein] models).
        revision: hub revision for hub ids.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: compute dtype, ``"bfloat16"`` or ``"float32"``.
        quantization: ``"nf4"`` (bitsandbytes 4-bit, CUDA only), ``"int8"``
            (bitsandbytes LLM.int8, CUDA only, no offload), ``"none"``, or
            ``"auto"``: on CUDA, NF4 unless the bf16 DiT fits the free VRAM (bf16 with
            group or sequential offload); none on CPU. A pre-quantized model is used as it is.
        offload: ``"none"``, ``"model"`` (``enable_model_cpu_offload``), ``"group"``
            (``enable_group_offload``, leaf level, CUDA streams) or ``"sequential"``
            (``enable_sequential_cpu_offload``); all but none need CUDA. Which
            go with which weights: :data:`OFFLOADS_FOR`.
        attention_backend: a diffusers attention backend name (``"native"``,
            ``"flash"``, ``"sage"``...); None keeps the default (PyTorch SDPA).
        lora: path or hub id of a LoRA in safetensors format, or None.
        lora_scale: strength of the LoRA (0 disables it, 1 is as trained).
        embedding_cache_size: prompt embeddings kept on the client (LRU);
            FLUX.2-dev's are 15.7 MB each in bf16.
        encoder_model: the encoder server's model to use (a name from ``flux2-dit info``);
            None picks the one whose family and width fit the DiT.
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
    encoder_model: str | None = None

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
        if self.quantization in OFFLOADS_FOR and (why := offload_refusal(self.quantization, self.offload)):
            raise ClientConfigError(why)
        if self.embedding_cache_size < 0:
            raise ClientConfigError("embedding_cache_size must be >= 0")
        if not (-10.0 <= self.lora_scale <= 10.0):
            raise ClientConfigError(f"lora scale {self.lora_scale} is outside [-10, 10]")
