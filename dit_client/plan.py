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
4. Compare with the machine: ``--vram`` / ``--ram`` when given, else the first
   CUDA GPU's total memory and the host's RAM (cgroup limit included), read here.

Every mode is a ``(quantization, offload)`` pair that ``flux2-dit generate``
accepts: both read :func:`dit_client.dit_config.offload_refusal`.

What is not in the figures: the CUDA context and allocator fragmentation
(covered by ``reserve_gib``), attention-kernel workspaces, and the process's
own RAM (Python, torch, CUDA libraries).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.model_source import DEFAULT_MODEL
from dit_client.dit_config import offload_refusal

CONFIG_DIR = Path(__file__).resolve().parent.parent / "common" / "configs"
# Configs shipped with the package, so planning for these models needs no network.
# FLUX.2 [klein] DiTs are Flux2Transformer2DModel too. Their values are the ones
# diffusers' own conversion script builds them with (huggingface/diffusers,
# scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config "klein-4b" and
# "klein-9b": 5+20 blocks x 24 heads, 7680 wide; 8+24 blocks x 32 heads, 12288 wide;
# no guidance embedding); every other key as for FLUX.2-dev, which the script shares.
# The same script converts every FLUX.2 VAE with AutoencoderKLFlux2()'s defaults,
# which flux2_dev_vae.json equals. Base models (FLUX.2-klein-base-*) are read from
# the hub or a folder with --model.
KLEIN_4B = "black-forest-labs/FLUX.2-klein-4B"
KLEIN_9B = "black-forest-labs/FLUX.2-klein-9B"
BUNDLED = {
    DEFAULT_MODEL: (CONFIG_DIR / "flux2_dev_transformer.json", CONFIG_DIR / "flux2_dev_vae.json"),
    KLEIN_4B: (CONFIG_DIR / "flux2_klein_4b_transformer.json", CONFIG_DIR / "flux2_dev_vae.json"),
    KLEIN_9B: (CONFIG_DIR / "flux2_klein_9b_transformer.json", CONFIG_DIR / "flux2_dev_vae.json"),
}
GIB = 2**30
TEXT_TOKENS = 512
# bitsandbytes NF4: 4 bits per weight plus one fp32 absmax per 64-weight block
# (diffusers' BitsAndBytesConfig defaults: blocksize 64, no double quantization).
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64
# bitsandbytes LLM.int8: one byte per weight plus one fp32 scale per output row.
INT8_BYTES_PER_WEIGHT = 1.0
INT8_BYTES_PER_ROW = 4


@dataclass(frozen=True)
class Footprint:
    """Sizes measured on fake tensors (bytes unless named otherwise).

    Attributes:
        transformer_params: all DiT parameters.
        linear_params: DiT parameters inside ``nn.Linear`` weights (quantized by NF4).
        largest_linear_params: the biggest single ``nn.Linear`` weight (dequantized
            per call under NF4; the unit group offload moves at leaf level).
        vae_params: all VAE parameters.
        linear_rows: output features summed over the DiT's ``nn.Linear`` layers (int8 keeps a scale per row).
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
    linear_rows: int = 0

    def dit_bytes(self, quantization: str) -> int:
        """Bytes of the DiT's weights loaded as ``"none"`` (bf16), ``"nf4"`` or ``"int8"``."""
        other = self.transformer_params - self.linear_params  # norms, embeddings: stay bf16
        if quantization == "nf4":
            return int(self.linear_params * NF4_BYTES_PER_WEIGHT) + 2 * other
        if quantization == "int8":
            return int(self.linear_params * INT8_BYTES_PER_WEIGHT) + INT8_BYTES_PER_ROW * self.linear_rows + 2 * other
        return 2 * self.transformer_params

    @property
    def vae_bytes(self) -> int:
        return 2 * self.vae_params


@dataclass(frozen=True)
class ModeEstimate:
    """One row of the plan: a memory mode, the ``generate`` settings that select it, and what it needs.

    Attributes:
        name: the row's label.
        quantization, offload: ``flux2-dit generate --quantization ... --offload ...``.
        vram_bytes: peak GPU memory, bytes.
        ram_bytes: host memory for weights kept off the GPU, bytes (0: everything on the GPU).
        speed: a word on how fast it runs.
    """

    name: str
    quantization: str
    offload: str
    vram_bytes: int
    ram_bytes: int
    speed: str

    @property
    def flags(self) -> str:
        return f"--quantization {self.quantization} --offload {self.offload}"

    def fit(self, vram_gib: float | None, ram_gib: float | None, reserve_gib: float) -> str:
        """``"yes"``, ``"no"``, or ``"unknown"`` when a size it depends on is not known."""
        checks = [None if vram_gib is None else self.vram_bytes <= (vram_gib - reserve_gib) * GIB]
        if self.ram_bytes:
            checks.append(None if ram_gib is None else self.ram_bytes <= ram_gib * GIB)
        if False in checks:
            return "no"
        return "unknown" if None in checks else "yes"

    def fits(self, vram_gib: float | None, ram_gib: float | None, reserve_gib: float) -> bool:
        """True only when it is known to fit: an unknown VRAM or RAM size is not a yes."""
        return self.fit(vram_gib, ram_gib, reserve_gib) == "yes"


# -- configs -----------------------------------------------------------------


def load_configs(model: str = DEFAULT_MODEL) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(transformer_config, vae_config, where_from)`` for ``model``, reading configs only.

    FLUX.2-dev's and FLUX.2 [klein] 4B and 9B's configs ship with this package
    (:data:`BUNDLED`), so they need no network; a local folder, ``demo`` or
    ``demo-klein`` is read from disk; another hub id is
    read from the Hugging Face cache (or downloaded: two small JSON files).
    """
    if model in BUNDLED:
        t, v = BUNDLED[model]
        return json.loads(t.read_text()), json.loads(v.read_text()), f"{model} (bundled configs)"
    from common.demo import DEMO_MODELS

    if model in DEMO_MODELS:
        from common.demo import ensure_demo_model

        folder = ensure_demo_model(variant=DEMO_MODELS[model])
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
        linear_layers = [m for m in dit.modules() if isinstance(m, torch.nn.Linear)]
        linears = [m.weight.numel() for m in linear_layers]
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
            dit(
                hidden_states=hidden,
                encoder_hidden_states=text,
                timestep=step,
                guidance=guidance,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )

        dit_act = _peak_activation_bytes(dit, dit_forward) + hidden.nbytes + text.nbytes
        latents = torch.empty(1, vae.config.latent_channels, grid_h * 2, grid_w * 2, dtype=dtype)
        vae_act = _peak_activation_bytes(vae, lambda: vae.decode(latents, return_dict=False)) + latents.nbytes

    return Footprint(
        transformer_params=transformer_params,
        linear_params=sum(linears),
        largest_linear_params=max(linears),
        vae_params=vae_params,
        linear_rows=sum(m.out_features for m in linear_layers),
        dit_activation_bytes=dit_act,
        vae_activation_bytes=vae_act,
        image_tokens=tokens,
        height=height,
        width=width,
    )


# -- modes -------------------------------------------------------------------


def estimate_modes(fp: Footprint) -> list[ModeEstimate]:
    """VRAM and RAM per memory mode, in the order a recommendation prefers them.

    Weights resident on the GPU come first, best quality first (bf16, then
    int8, then nf4); then the offload modes, fastest first.

    - bf16: DiT and VAE resident on the GPU; peak is weights plus the larger
      of the DiT-forward and VAE-decode activation peaks.
    - int8 / nf4: the DiT's Linear weights in 8 / 4 bits; bitsandbytes
      dequantizes one Linear to bf16 per call, so the largest one is added to the DiT peak.
    - nf4 + model offload: DiT and VAE take turns on the GPU; the one not in
      use waits in RAM.
    - group offload (nf4 or bf16, leaf level, CUDA streams): weights live in
      pinned RAM; the GPU holds the activations plus the running leaf and the
      prefetched next one (two of the largest Linear weights, in bf16). Setting
      it up pins a copy of every weight while the loaded one still exists, so
      the RAM peak is twice the weights.
    - sequential offload (bf16): one leaf at a time on the GPU, no pinned copies; slowest.
    """
    dit16, dit8, dit4, vae = fp.dit_bytes("none"), fp.dit_bytes("int8"), fp.dit_bytes("nf4"), fp.vae_bytes
    dequant = 2 * fp.largest_linear_params
    dit_act, vae_act = fp.dit_activation_bytes, fp.vae_activation_bytes
    streamed = max(dit_act, vae_act) + 2 * dequant
    modes = [
        ModeEstimate("bf16", "none", "none", dit16 + vae + max(dit_act, vae_act), 0, "fastest"),
        ModeEstimate(
            "int8",
            "int8",
            "none",
            dit8 + vae + max(dit_act + dequant, vae_act),
            0,
            "medium (LLM.int8 matmuls); closest to bf16",
        ),
        ModeEstimate("nf4", "nf4", "none", dit4 + vae + max(dit_act + dequant, vae_act), 0, "fast"),
        ModeEstimate(
            "nf4 + model offload",
            "nf4",
            "model",
            max(dit4 + dit_act + dequant, vae + vae_act),
            dit4 + vae,
            "fast steps, + DiT/VAE swap per image",
        ),
        ModeEstimate(
            "nf4 + group offload",
            "nf4",
            "group",
            streamed,
            2 * (dit4 + vae),
            "slow: the 4-bit weights cross PCIe every step",
        ),
        ModeEstimate(
            "group offload (bf16)",
            "none",
            "group",
            streamed,
            2 * (dit16 + vae),
            "slower: all bf16 weights cross PCIe every step",
        ),
        ModeEstimate(
            "sequential offload (bf16)",
            "none",
            "sequential",
            max(dit_act, vae_act) + dequant,
            dit16 + vae,
            "slowest: one layer at a time, no prefetch",
        ),
    ]
    return [m for m in modes if offload_refusal(m.quantization, m.offload) is None]


def recommend(
    modes: list[ModeEstimate], vram_gib: float | None, ram_gib: float | None, reserve_gib: float = 1.0
) -> ModeEstimate | None:
    """The first mode (see :func:`estimate_modes` for the order) known to fit ``vram_gib`` (minus
    ``reserve_gib``) and ``ram_gib``; None if none is."""
    return next((m for m in modes if m.fits(vram_gib, ram_gib, reserve_gib)), None)


# -- the machine -------------------------------------------------------------


def detect_vram_gib() -> float | None:
    """Total memory of the first CUDA GPU torch sees, in GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def _cgroup_limit_bytes() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # cgroup v1 writes a huge number for "no limit"
            return int(text)
    return None


def detect_ram_gib() -> float | None:
    """Host memory in GiB: physical RAM, or the container's cgroup limit when lower; None if unreadable."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    if not total or total <= 0:
        return None
    limit = _cgroup_limit_bytes()
    return min(total, limit) / GIB if limit else total / GIB


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


@dataclass(frozen=True)
class Machine:
    """The sizes a plan is made for, in GiB, and where each came from (``"given"``, ``"detected"`` or None)."""

    vram_gib: float | None
    ram_gib: float | None
    vram_from: str | None
    ram_from: str | None

    @classmethod
    def resolve(cls, vram_gib: float | None, ram_gib: float | None, *, detect: bool = True) -> Machine:
        """Given sizes win; the others are read from this machine when ``detect``."""
        vram_from = "given" if vram_gib is not None else None
        ram_from = "given" if ram_gib is not None else None
        if detect and vram_gib is None and (vram_gib := detect_vram_gib()) is not None:
            vram_from = "detected"
        if detect and ram_gib is None and (ram_gib := detect_ram_gib()) is not None:
            ram_from = "detected"
        return cls(vram_gib, ram_gib, vram_from, ram_from)

    def describe(self) -> str:
        vram = f"{self.vram_gib:.1f} GiB VRAM ({self.vram_from})" if self.vram_gib is not None else "VRAM unknown"
        ram = f"{self.ram_gib:.1f} GiB RAM ({self.ram_from})" if self.ram_gib is not None else "RAM unknown"
        return f"{vram}, {ram}"


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` found: the printed table, the recommended mode, and whether anything can fit."""

    text: str
    choice: ModeEstimate | None
    machine: Machine
    modes: list[ModeEstimate]
    reserve_gib: float

    @property
    def nothing_fits(self) -> bool:
        """True when every mode is known not to fit (exit code 1)."""
        m = self.machine
        return all(mode.fit(m.vram_gib, m.ram_gib, self.reserve_gib) == "no" for mode in self.modes)


def format_plan(
    fp: Footprint,
    modes: list[ModeEstimate],
    source: str,
    machine: Machine,
    reserve_gib: float,
    choice: ModeEstimate | None,
) -> str:
    """The table ``flux2-dit plan`` prints."""
    vram_gib, ram_gib = machine.vram_gib, machine.ram_gib
    lines = [
        f"model: {source}",
        f"DiT {_count(fp.transformer_params)} params ({fp.linear_params / fp.transformer_params:.1%} in Linear "
        f"layers), VAE {_count(fp.vae_params)} params",
        f"size {fp.width}x{fp.height}: {fp.image_tokens} image tokens + {TEXT_TOKENS} text tokens; "
        f"activation peaks: DiT {fp.dit_activation_bytes / GIB:.2f} GiB, "
        f"VAE decode {fp.vae_activation_bytes / GIB:.2f} GiB",
        f"weights: DiT bf16 {fp.dit_bytes('none') / GIB:.1f} GiB, int8 {fp.dit_bytes('int8') / GIB:.1f} GiB, "
        f"nf4 {fp.dit_bytes('nf4') / GIB:.1f} GiB, VAE {fp.vae_bytes / GIB:.2f} GiB; "
        "the text encoder is remote (0 GiB here)",
        f"machine: {machine.describe()}, {reserve_gib:g} GiB of VRAM kept in reserve",
        "",
        f"{'mode':<26} {'VRAM GiB':>9} {'RAM GiB':>8}  {'fits':<7}  {'speed':<48} flags",
    ]
    for m in modes:
        fit = m.fit(vram_gib, ram_gib, reserve_gib)
        fit = "?" if fit == "unknown" else fit
        lines.append(
            f"{m.name:<26} {m.vram_bytes / GIB:>9.2f} {m.ram_bytes / GIB:>8.2f}  {fit:<7}  {m.speed:<48} {m.flags}"
        )
    lines.append("")
    lines.append(
        "VRAM excludes the CUDA context and allocator slack (the reserve); RAM counts weights held on "
        "the host only (group offload: with their pinned copies)."
    )
    if choice is not None:
        lines.append(f"recommended: {choice.name}  (flux2-dit generate ... {choice.flags})")
    elif vram_gib is None:
        lines.append("no CUDA GPU seen here: pass --vram GIB (and --ram GIB) to plan for another machine")
    else:
        # Modes that fit the VRAM but wait on an unknown RAM size: say what RAM they need, never "fits".
        maybe = next((m for m in modes if m.fit(vram_gib, ram_gib, reserve_gib) == "unknown"), None)
        if maybe is not None:
            lines.append(
                f"RAM unknown: {maybe.name} fits the VRAM if this machine has at least "
                f"{maybe.ram_bytes / GIB:.0f} GiB of RAM (flux2-dit generate ... {maybe.flags}); "
                "pass --ram GIB to check"
            )
        else:
            ram = f"{ram_gib:g} GiB" if ram_gib is not None else "unknown"
            lines.append(
                f"no mode fits {vram_gib:g} GiB VRAM (less {reserve_gib:g} GiB reserve) and {ram} RAM; "
                "try a smaller --height/--width, more RAM, or a bigger GPU"
            )
    return "\n".join(lines)


def plan(
    model: str = DEFAULT_MODEL,
    *,
    height: int = 1024,
    width: int = 1024,
    vram_gib: float | None = None,
    ram_gib: float | None = None,
    reserve_gib: float = 1.0,
    detect: bool = True,
) -> Plan:
    """Measure, estimate, compare with the machine and format.

    Args:
        vram_gib, ram_gib: sizes to plan for, in GiB; None reads this machine's
            (first CUDA GPU, host RAM) when ``detect``, else leaves them unknown.
        reserve_gib: VRAM kept free for the CUDA context and allocator slack.
    """
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or not (16 <= value <= 4096) or value % 16:
            raise ValueError(f"{name} {value!r} must be a multiple of 16 in [16, 4096]")
    for name, gib in (("vram", vram_gib), ("ram", ram_gib)):
        if gib is not None and not (0 < gib < 1e6 and math.isfinite(gib)):
            raise ValueError(f"--{name} {gib!r} must be a positive number of GiB")
    machine = Machine.resolve(vram_gib, ram_gib, detect=detect)
    transformer_config, vae_config, source = load_configs(model)
    fp = measure_footprint(transformer_config, vae_config, height, width)
    modes = estimate_modes(fp)
    choice = recommend(modes, machine.vram_gib, machine.ram_gib, reserve_gib)
    text = format_plan(fp, modes, source, machine, reserve_gib, choice)
    return Plan(text, choice, machine, modes, reserve_gib)
