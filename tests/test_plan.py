"""``flux2-dit plan``: real FLUX.2-dev configs on fake tensors, per-mode VRAM/RAM, a recommendation."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest

from dit_client import cli
from dit_client.plan import (
    GIB,
    Footprint,
    count_transformer_params,
    estimate_modes,
    load_configs,
    measure_footprint,
    recommend,
)


@pytest.fixture(scope="module")
def flux2_dev_1024():
    """The full-size FLUX.2-dev DiT and VAE measured at 1024x1024 (no weights: fake tensors)."""
    transformer, vae, _ = load_configs()
    return measure_footprint(transformer, vae, 1024, 1024)


def test_bundled_configs_are_diffusers_flux2_dev_defaults():
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    transformer, vae, source = load_configs()
    assert "bundled" in source
    for config, cls in ((transformer, Flux2Transformer2DModel), (vae, AutoencoderKLFlux2)):
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        assert {k: v for k, v in config.items() if not k.startswith("_")} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    assert transformer["joint_attention_dim"] == 15360 and transformer["num_single_layers"] == 48
    assert vae["latent_channels"] == 32


def test_flux2_dev_sizes_match_published_counts(flux2_dev_1024):
    fp = flux2_dev_1024
    assert 32.0e9 < fp.transformer_params < 32.4e9  # "32.2B params"
    assert 83e6 < fp.vae_params < 85e6  # "84M params"
    assert fp.image_tokens == 4096  # 1024^2 / 16^2
    assert count_transformer_params(load_configs()[0]) == fp.transformer_params


def test_flux2_dev_modes_against_published_figures(flux2_dev_1024):
    modes = {m.name: m for m in estimate_modes(flux2_dev_1024)}
    bf16, nf4 = modes["bf16"], modes["nf4"]
    offload, group = modes["nf4 + model offload"], modes["group offload (bf16)"]
    assert 60 * GIB < bf16.vram_bytes < 64 * GIB  # 64 GB of bf16 weights, plus activations
    assert 17 * GIB < nf4.vram_bytes < 20 * GIB  # published: ~18 GB (model cards ~19 GB)
    assert offload.vram_bytes <= nf4.vram_bytes and offload.ram_bytes > 16 * GIB
    assert group.vram_bytes < 8 * GIB  # published: ~8 GB
    assert group.ram_bytes > 60 * GIB
    # Activations are real measurements, not constants: a bigger picture needs more.
    assert 0.3 * GIB < flux2_dev_1024.dit_activation_bytes < 4 * GIB


@pytest.mark.parametrize("vram,ram,expected", [
    (80, 128, "bf16"),
    (24, 64, "nf4"),
    (12, 96, "group offload (bf16)"),
    (12, 32, None),
])
def test_recommendation_is_the_fastest_mode_that_fits(flux2_dev_1024, vram, ram, expected):
    choice = recommend(estimate_modes(flux2_dev_1024), vram, ram, reserve_gib=1.0)
    assert (choice.name if choice else None) == expected


def test_model_offload_is_chosen_when_only_the_vae_does_not_fit(flux2_dev_1024):
    modes = {m.name: m for m in estimate_modes(flux2_dev_1024)}
    between = (modes["nf4 + model offload"].vram_bytes + modes["nf4"].vram_bytes) / 2 / GIB
    assert recommend(list(modes.values()), between + 1.0, 64, reserve_gib=1.0).name == "nf4 + model offload"


def test_activation_peaks_grow_with_the_picture(tiny_model_dir):
    transformer, vae, _ = load_configs(str(tiny_model_dir))
    small = measure_footprint(transformer, vae, 32, 32)
    large = measure_footprint(transformer, vae, 128, 128)
    # The tiny VAE downsamples 2x, the pipeline patchifies 2x2: 4 px per token side.
    assert (small.image_tokens, large.image_tokens) == (64, 1024)
    assert large.dit_activation_bytes > small.dit_activation_bytes
    assert large.vae_activation_bytes > 4 * small.vae_activation_bytes
    assert small.transformer_params == large.transformer_params > 0


def test_nf4_weight_bytes():
    fp = Footprint(transformer_params=1_000_000, linear_params=960_000, largest_linear_params=1000, vae_params=10,
                   dit_activation_bytes=0, vae_activation_bytes=0, image_tokens=1, height=16, width=16)
    assert fp.dit_bytes("none") == 2_000_000
    # 4 bits + an fp32 absmax per 64 weights for Linear weights; the rest stays bf16.
    assert fp.dit_bytes("nf4") == 960_000 * 0.5 + 960_000 // 64 * 4 + 2 * 40_000


def test_cli_plan_reads_configs_only(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "configs-only"
    for part in ("transformer", "vae"):
        (folder / part).mkdir(parents=True)
        shutil.copy(tiny_model_dir / part / "config.json", folder / part / "config.json")
    rc = cli.main(["plan", "--model", str(folder), "--vram", "8", "--ram", "16", "--height", "64", "--width", "64"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "recommended: bf16" in out and "--quantization none --offload none" in out
    for mode in ("bf16", "nf4", "nf4 + model offload", "group offload (bf16)"):
        assert f"\n{mode} " in out


def test_cli_plan_exits_1_when_nothing_fits(tiny_model_dir, capsys):
    rc = cli.main(["plan", "--model", str(tiny_model_dir), "--vram", "0.5", "--ram", "0.5", "--height", "32",
                   "--width", "32"])
    assert rc == 1
    assert "no mode fits" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--height", "1000"], "multiple of 16"),
    (["--vram", "-3"], "positive number"),
    (["--model", "/nonexistent/folder"], "no such folder"),
])
def test_cli_plan_bad_input_exits_2(args, message, capsys):
    assert cli.main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_prequantized_config_is_accepted(tiny_model_dir, tmp_path):
    cfg = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    vae = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    assert measure_footprint(cfg, vae, 32, 32).transformer_params > 0
