"""``flux2-dit plan``: how much VRAM and RAM each memory mode needs, without loading weights.

Method (no weights are read, nothing touches a GPU):

1. Build the real ``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2`` from
   their configs under PyTorch's ``FakeTensorMode``: every parameter is a
   meta-device tensor with shape and dtype but no storage, so 32B parameters
   cost nothing. Count parameters, and which of them sit in ``nn.Linear``
   layers (the ones bitsandbytes quantizes).
2. Run one DiT forward at the requested size (image tokens from the VAE's
   downsampling and 2x2 patchify, plus 512 text tokens) and one VAE decode,
   still on fake tensors, under ``torch.distributed._tools.MemTracker``, which
   records the bytes every intermediate tensor would occupy and their peak.
3. Combine weights and activation peaks per mode (see :func:`estimate_modes`).

What is not in the figures: the CUDA context and allocator fragmentation
(covered by ``reserve_gib``), attention-kernel workspaces, and the process's
own RAM (Python, torch, CUDA libraries).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.model_source import DEFAULT_MODEL

CONFIG_DIR = Path(__file__).resolve().parent.parent / "common" / "configs"
BUNDLED = {
    DEFAULT_MODEL: (CONFIG_DIR / "flux2_dev_transformer.json", CONFIG_DIR / "flux2_dev_vae.json"),
}
GIB = 2**30
TEXT_TOKENS = 512
# bitsandbytes NF4: 4 bits per weight plus one fp32 absmax per 64-weight block
# (diffusers' BitsAndBytesConfig defaults: blocksize 64, no double quantization).
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64


@dataclass(frozen=True)
class Footprint:
    """Sizes measured on fake tensors (bytes unless named otherwise).

    Attributes:
        transformer_params: all DiT parameters.
        linear_params: DiT parameters inside ``nn.Linear`` weights (quantized by NF4).
        largest_linear_params: the biggest single ``nn.Linear`` weight (dequantized
            per call under NF4; the unit group offload moves at leaf level).
        vae_params: all VAE parameters.
        dit_activation_bytes: peak of intermediate tensors in one DiT forward.
        vae_activation_bytes: peak of intermediate tensors in one VAE decode.
        image_tokens: latent tokens at the requested size.
        height, width: the requested size in pixels.
    """

    transformer_params: int
    linear_params: int
    largest_linear_params: int
    vae_params: int
    dit_activation_bytes: int
    vae_activation_bytes: int
    image_tokens: int
    height: int
    width: int

    def dit_bytes(self, quantization: str) -> int:
        if quantization == "nf4":
            other = self.transformer_params - self.linear_params
            return int(self.linear_params * NF4_BYTES_PER_WEIGHT) + 2 * other
        return 2 * self.transformer_params

    @property
    def vae_bytes(self) -> int:
        return 2 * self.vae_params


@dataclass(frozen=True)
class ModeEstimate:
    """One row of the plan: a memory mode, its flags, and what it needs (bytes)."""

    name: str
    flags: str
    vram_bytes: int
    ram_bytes: int
    speed: str

    def fits(self, vram_gib: float | None, ram_gib: float | None, reserve_gib: float) -> bool:
        vram_ok = vram_gib is None or self.vram_bytes <= (vram_gib - reserve_gib) * GIB
        ram_ok = ram_gib is None or self.ram_bytes <= ram_gib * GIB
        return vram_ok and ram_ok


# -- configs -----------------------------------------------------------------


def load_configs(model: str = DEFAULT_MODEL) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(transformer_config, vae_config, where_from)`` for ``model``, reading configs only.

    FLUX.2-dev's configs ship with this package, so the default needs no
    network; a local folder or ``demo`` is read from disk; another hub id is
    read from the Hugging Face cache (or downloaded: two small JSON files).
    """
    if model in BUNDLED:
        t, v = BUNDLED[model]
        return json.loads(t.read_text()), json.loads(v.read_text()), f"{model} (bundled configs)"
    if model == "demo":
        from common.demo import ensure_demo_model

        folder = ensure_demo_model()
    else:
        folder = Path(model).expanduser()
    if folder.is_dir():
        try:
            t = json.loads((folder / "transformer" / "config.json").read_text())
            v = json.loads((folder / "vae" / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{folder} has no readable transformer/config.json and vae/config.json: {exc}") from exc
        return t, v, str(folder)
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ValueError(f"no such folder: {model}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        t = json.loads(Path(hf_hub_download(model, "transformer/config.json")).read_text())
        v = json.loads(Path(hf_hub_download(model, "vae/config.json")).read_text())
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise ValueError(f"cannot read the configs of {model} (not cached, hub unreachable?): {exc}") from exc
    return t, v, f"{model} (hub configs)"


def _init_args(config: dict[str, Any]) -> dict[str, Any]:
    # Keys like "_class_name" and a pre-quantized repo's quantization_config are not constructor arguments.
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def count_transformer_params(transformer_config: dict[str, Any]) -> int:
    """Parameters of the DiT described by ``transformer_config`` (built on fake tensors: instant, no memory)."""
    from diffusers import Flux2Transformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = Flux2Transformer2DModel.from_config(_init_args(transformer_config))
        return sum(p.numel() for p in model.parameters())


def bf16_fits_on_gpu(transformer_config: dict[str, Any], device: torch.device, reserve_gib: float = 4.0) -> bool:
    """True when the bf16 DiT plus ``reserve_gib`` (VAE, activations, context) fits the GPU's free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * count_transformer_params(transformer_config) + reserve_gib * GIB <= free


# -- measurement ---------------------------------------------------------------


def _peak_activation_bytes(model: torch.nn.Module, run) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with torch.no_grad(), tracker:
        run()
    snapshot = tracker.get_tracker_snapshot("peak")
    return int(sum(dev_snap.get(_act_key(dev_snap), 0) for dev_snap in snapshot.values()))


def _act_key(device_snapshot: dict) -> Any:
    return next(k for k in device_snapshot if getattr(k, "value", None) == "Activation")


def measure_footprint(
    transformer_config: dict[str, Any],
    vae_config: dict[str, Any],
    height: int = 1024,
    width: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
) -> Footprint:
    """Parameter counts and activation peaks of the DiT and VAE at ``height`` x ``width`` pixels.

    Everything runs on fake tensors: seconds of CPU time for the full 32B
    model, no memory for weights.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), _default_dtype(dtype):
        dit = Flux2Transformer2DModel.from_config(_init_args(transformer_config)).eval()
        vae = AutoencoderKLFlux2.from_config(_init_args(vae_config)).eval()
        linears = [m.weight.numel() for m in dit.modules() if isinstance(m, torch.nn.Linear)]
        transformer_params = sum(p.numel() for p in dit.parameters())
        vae_params = sum(p.numel() for p in vae.parameters())

        # Latent grid: VAE downsampling, then the pipeline's 2x2 patchify.
        scale = 2 ** (len(vae.config.block_out_channels) - 1) * 2
        grid_h, grid_w = height // scale, width // scale
        tokens = grid_h * grid_w
        cfg = dit.config
        hidden = torch.empty(1, tokens, cfg.in_channels, dtype=dtype)
        text = torch.empty(1, TEXT_TOKENS, cfg.joint_attention_dim, dtype=dtype)
        img_ids = torch.zeros(1, tokens, 4, dtype=torch.long)
        txt_ids = torch.zeros(1, TEXT_TOKENS, 4, dtype=torch.long)
        step = torch.full((1,), 0.5, dtype=dtype)
        guidance = torch.full((1,), 4.0, dtype=torch.float32)

        def dit_forward():
            dit(hidden_states=hidden, encoder_hidden_states=text, timestep=step, guidance=guidance,
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)

        dit_act = _peak_activation_bytes(dit, dit_forward) + hidden.nbytes + text.nbytes
        latents = torch.empty(1, vae.config.latent_channels, grid_h * 2, grid_w * 2, dtype=dtype)
        vae_act = _peak_activation_bytes(vae, lambda: vae.decode(latents, return_dict=False)) + latents.nbytes

    return Footprint(
        transformer_params=transformer_params,
        linear_params=sum(linears),
        largest_linear_params=max(linears),
        vae_params=vae_params,
        dit_activation_bytes=dit_act,
        vae_activation_bytes=vae_act,
        image_tokens=tokens,
        height=height,
        width=width,
    )


# -- modes -------------------------------------------------------------------


def estimate_modes(fp: Footprint) -> list[ModeEstimate]:
    """VRAM and RAM per memory mode, fastest first.

    - bf16: DiT and VAE resident on the GPU; peak is weights plus the larger
      of the DiT-forward and VAE-decode activation peaks.
    - nf4: the DiT's Linear weights in NF4; bitsandbytes dequantizes one Linear
      to bf16 per call, so the largest one is added to the DiT peak.
    - nf4 + model offload: DiT and VAE take turns on the GPU; the one not in
      use waits in RAM.
    - group offload (bf16, leaf level, CUDA streams): weights live in pinned
      RAM; the GPU holds the activations plus the running leaf and the
      prefetched next one (two of the largest Linear weights).
    """
    dit16, dit4, vae = fp.dit_bytes("none"), fp.dit_bytes("nf4"), fp.vae_bytes
    dequant = 2 * fp.largest_linear_params
    dit_act, vae_act = fp.dit_activation_bytes, fp.vae_activation_bytes
    return [
        ModeEstimate("bf16", "--quantization none --offload none",
                     dit16 + vae + max(dit_act, vae_act), 0, "fastest"),
        ModeEstimate("nf4", "--quantization nf4 --offload none",
                     dit4 + vae + max(dit_act + dequant, vae_act), 0, "fast"),
        ModeEstimate("nf4 + model offload", "--quantization nf4 --offload model",
                     max(dit4 + dit_act + dequant, vae + vae_act), dit4 + vae,
                     "fast steps, + DiT/VAE swap per image"),
        ModeEstimate("group offload (bf16)", "--quantization none --offload group",
                     max(dit_act, vae_act) + 2 * dequant, dit16 + vae,
                     "slow: all weights cross PCIe every step"),
    ]


def recommend(modes: list[ModeEstimate], vram_gib: float | None, ram_gib: float | None,
              reserve_gib: float = 1.0) -> ModeEstimate | None:
    """The fastest mode that fits ``vram_gib`` (minus ``reserve_gib``) and ``ram_gib``; None if none does."""
    return next((m for m in modes if m.fits(vram_gib, ram_gib, reserve_gib)), None)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_plan(fp: Footprint, modes: list[ModeEstimate], source: str, vram_gib: float | None,
                ram_gib: float | None, reserve_gib: float, choice: ModeEstimate | None) -> str:
    """The table ``flux2-dit plan`` prints."""
    lines = [
        f"model: {source}",
        f"DiT {_count(fp.transformer_params)} params ({fp.linear_params / fp.transformer_params:.1%} in Linear "
        f"layers), VAE {_count(fp.vae_params)} params",
        f"size {fp.width}x{fp.height}: {fp.image_tokens} image tokens + {TEXT_TOKENS} text tokens; "
        f"activation peaks: DiT {fp.dit_activation_bytes / GIB:.2f} GiB, "
        f"VAE decode {fp.vae_activation_bytes / GIB:.2f} GiB",
        f"weights: DiT bf16 {fp.dit_bytes('none') / GIB:.1f} GiB, DiT nf4 {fp.dit_bytes('nf4') / GIB:.1f} GiB, "
        f"VAE {fp.vae_bytes / GIB:.2f} GiB; the text encoder is remote (0 GiB here)",
        "",
        f"{'mode':<22} {'VRAM GiB':>9} {'RAM GiB':>8}  {'fits':<4}  {'speed':<40} flags",
    ]
    for m in modes:
        fits = "yes" if m.fits(vram_gib, ram_gib, reserve_gib) else "no"
        if vram_gib is None and ram_gib is None:
            fits = "-"
        lines.append(f"{m.name:<22} {m.vram_bytes / GIB:>9.2f} {m.ram_bytes / GIB:>8.2f}  {fits:<4}  "
                     f"{m.speed:<40} {m.flags}")
    lines.append("")
    lines.append("VRAM excludes the CUDA context and allocator slack; RAM counts weights held on the host only.")
    if vram_gib is None and ram_gib is None:
        lines.append("pass --vram GIB (and --ram GIB) for a recommendation")
    elif choice is None:
        lines.append(f"no mode fits {vram_gib} GiB VRAM (less {reserve_gib} GiB reserve) and {ram_gib} GiB RAM; "
                     "try a smaller --height/--width, --offload sequential, or a bigger GPU")
    else:
        lines.append(f"recommended: {choice.name}  (flux2-dit generate ... {choice.flags})")
    return "\n".join(lines)


def plan(model: str = DEFAULT_MODEL, *, height: int = 1024, width: int = 1024, vram_gib: float | None = None,
         ram_gib: float | None = None, reserve_gib: float = 1.0) -> tuple[str, ModeEstimate | None]:
    """Measure, estimate and format; returns ``(table text, recommended mode or None)``."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or not (16 <= value <= 4096) or value % 16:
            raise ValueError(f"{name} {value!r} must be a multiple of 16 in [16, 4096]")
    for name, value in (("vram", vram_gib), ("ram", ram_gib)):
        if value is not None and not (0 < value < 1e6 and math.isfinite(value)):
            raise ValueError(f"--{name} {value!r} must be a positive number of GiB")
    transformer_config, vae_config, source = load_configs(model)
    fp = measure_footprint(transformer_config, vae_config, height, width)
    modes = estimate_modes(fp)
    choice = recommend(modes, vram_gib, ram_gib, reserve_gib) if (vram_gib or ram_gib) else None
    return format_plan(fp, modes, source, vram_gib, ram_gib, reserve_gib, choice), choice
