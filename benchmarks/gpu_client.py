"""Full-size FLUX.2-dev DiT in NF4 on a GPU: peak VRAM and seconds per step at 1024x1024.

    .venv/bin/python benchmarks/gpu_client.py               # CUDA machine (H100: a few minutes)
    .venv/bin/python benchmarks/gpu_client.py --dry-run     # tiny config, NF4 on the CPU: checks the logic

What the client runs with ``--quantization nf4``, minus the download:

1. ``Flux2Transformer2DModel`` from the real FLUX.2-dev config
   (``common/configs/flux2_dev_transformer.json``, 32.2B parameters) is built
   on the meta device, then materialized one block at a time on the GPU in
   bf16 with random weights; each block's ``nn.Linear`` layers are swapped for
   bitsandbytes ``Linear4bit`` (NF4, blocksize 64, no double quantization,
   bf16 compute: diffusers' ``BitsAndBytesConfig`` as the client builds it)
   before the next block is made, so the bf16 model never exists in full.
2. The real-size ``AutoencoderKLFlux2`` (84M) in bf16, random weights.
3. diffusers' ``Flux2Pipeline(text_encoder=None, tokenizer=None)`` runs
   ``--steps`` steps at ``--size`` with random ``prompt_embeds`` [1, 512, 15360]
   (what the encoder service sends), then decodes with the VAE.

Printed: weight memory, peak VRAM during generation
(``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``; the device's
used memory including the CUDA context from ``torch.cuda.mem_get_info``),
seconds per denoising step (median after the first), the VAE decode time, and
the 18 GB target. ``flux2-dit plan``'s estimate for the same size is printed
next to it. ``--json FILE`` writes the figures for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from dit_client.plan import GIB, estimate_modes, load_configs, measure_footprint

TARGET_GB = 18.0
# --dry-run: FLUX.2-dev's structure at toy width (Linear inputs multiples of 64, as bitsandbytes on CPU needs).
TINY_TRANSFORMER = dict(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=128,
    in_channels=128,
    axes_dims_rope=(8, 8, 8, 8),
)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _materialize_(module: nn.Module, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Give a meta-device module real random weights on ``device``: Linear weights ~N(0, 1/in), norms 1."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for b in module.buffers():
            b.zero_()


def _to_nf4_(module: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Swap every ``nn.Linear`` under ``module`` for an NF4 ``Linear4bit`` quantized on ``device``; return how many."""
    import bitsandbytes as bnb

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=dtype,
                compress_statistics=False,
                quant_type="nf4",
                device="meta",
            )
            # Params4bit quantizes when moved to a device: bitsandbytes' documented loading path.
            q.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=False, quant_type="nf4", module=q
            ).to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            swapped += 1
    return swapped


def build_nf4_transformer(config: dict, device: torch.device, dtype: torch.dtype, quantize: bool):
    """The DiT with random weights, one block at a time: bf16 block -> NF4 block -> next."""
    from diffusers import Flux2Transformer2DModel

    args = {k: v for k, v in config.items() if not k.startswith("_")}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta parameters in bf16, so each block materializes at its final size
    try:
        with torch.device("meta"):
            model = Flux2Transformer2DModel.from_config(args)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device).manual_seed(0)
    units: list[nn.Module] = []
    for child in model.children():
        units.extend(child if isinstance(child, nn.ModuleList) else [child])
    swapped = 0
    for unit in units:
        _materialize_(unit, device, dtype, generator)
        if quantize:
            swapped += _to_nf4_(unit, dtype, device)
    return model.eval().requires_grad_(False), swapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="height = width in pixels (default 1024)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps timed (default 4)")
    parser.add_argument("--dry-run", action="store_true", help="tiny config on the CPU: checks the logic")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    dtype = torch.bfloat16
    transformer_config, vae_config, _ = load_configs()
    if args.dry_run:
        # bitsandbytes >= 0.48 quantizes on the CPU too, so the NF4 swap is exercised here as well.
        device, quantize = torch.device("cpu"), True
        transformer_config = {**transformer_config, **TINY_TRANSFORMER}
        vae_config = {**vae_config, **TINY_VAE}
        size = min(args.size, 128)
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_client.py measures NF4 on a CUDA GPU and this machine has none; use --dry-run here",
                file=sys.stderr,
            )
            return 2
        device, quantize, size = torch.device("cuda"), True, args.size
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
        f"; torch {torch.__version__}"
    )

    # 1. The DiT, block by block.
    t0 = time.perf_counter()
    transformer, swapped = build_nf4_transformer(transformer_config, device, dtype, quantize)
    sync(device)
    build_s = time.perf_counter() - t0
    weights = (
        torch.cuda.memory_allocated(device)
        if device.type == "cuda"
        else sum(p.numel() * p.element_size() for p in transformer.parameters())
    )
    print(f"transformer: {swapped} Linear layers in NF4, built in {build_s:.1f}s, weights {weights / GIB:.2f} GiB")

    # 2. The VAE and the pipeline, fed random embeddings the way the client feeds remote ones.
    vae_args = {k: v for k, v in vae_config.items() if not k.startswith("_")}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vae = AutoencoderKLFlux2.from_config(vae_args).eval()
    finally:
        torch.set_default_dtype(previous)
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(
        1,
        512,
        transformer_config["joint_attention_dim"],
        device=device,
        dtype=dtype,
        generator=torch.Generator(device).manual_seed(1),
    )

    stamps: list[float] = []

    def on_step_end(pipeline, step, timestep, kwargs):
        sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    pipe(
        prompt_embeds=embeds,
        height=size,
        width=size,
        num_inference_steps=args.steps,
        guidance_scale=4.0,
        generator=torch.Generator(device).manual_seed(0),
        output_type="pil",
        callback_on_step_end=on_step_end,
    )
    sync(device)
    end = time.perf_counter()
    step_times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    steady = step_times[1:] or step_times
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "size": size,
        "steps": args.steps,
        "nf4_linear_layers": swapped,
        "build_s": round(build_s, 1),
        "weights_gib": round(weights / GIB, 2),
        "first_step_s": round(step_times[0], 3),
        "s_per_step": round(statistics.median(steady), 3),
        "vae_decode_and_postprocess_s": round(end - stamps[-1], 3),
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        figures.update(
            peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 2),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 2),
            device_used_now_gib=round((total - free) / GIB, 2),
        )
    # What `flux2-dit plan` predicts for the same size (full-size model only).
    if not args.dry_run:
        fp = measure_footprint(*load_configs()[:2], size, size)
        figures["plan_nf4_estimate_gib"] = round(
            next(m for m in estimate_modes(fp) if m.name == "nf4").vram_bytes / GIB, 2
        )

    for key, value in figures.items():
        print(f"  {key:<30} {value}")
    if "peak_reserved_gib" in figures:
        peak_gb = figures["peak_reserved_gib"] * GIB / 1e9
        verdict = "within" if peak_gb <= TARGET_GB else "OVER"
        print(f"peak reserved {peak_gb:.1f} GB vs target {TARGET_GB:.0f} GB (NF4 DiT + VAE, remote encoder): {verdict}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
