"""``flux2-dit plan``: real FLUX.2-dev configs on fake tensors, per-mode VRAM/RAM, a recommendation."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest

from dit_client import cli
from dit_client import plan as plan_module
from dit_client.dit_config import DiTConfig, offload_refusal
from dit_client.plan import (
    GIB,
    Footprint,
    count_transformer_params,
    estimate_modes,
    load_configs,
    measure_footprint,
    recommend,
)

REAL_DETECT_RAM, REAL_DETECT_VRAM = plan_module.detect_ram_gib, plan_module.detect_vram_gib
ALL_MODES = [
    "bf16",
    "int8",
    "nf4",
    "nf4 + model offload",
    "nf4 + group offload",
    "group offload (bf16)",
    "sequential offload (bf16)",
]


@pytest.fixture(autouse=True)
def unknown_machine(monkeypatch):
    """Plans here never depend on the machine running the tests: detection finds nothing unless a test says so."""
    monkeypatch.setattr(plan_module, "detect_vram_gib", lambda: None)
    monkeypatch.setattr(plan_module, "detect_ram_gib", lambda: None)


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
            k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()
        }
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
    assert list(modes) == ALL_MODES
    bf16, int8, nf4 = modes["bf16"], modes["int8"], modes["nf4"]
    offload, group4, group16 = modes["nf4 + model offload"], modes["nf4 + group offload"], modes["group offload (bf16)"]
    assert 60 * GIB < bf16.vram_bytes < 64 * GIB  # 64 GB of bf16 weights, plus activations
    assert 30 * GIB < int8.vram_bytes < 36 * GIB  # one byte per weight: a 40-48 GB card
    assert 17 * GIB < nf4.vram_bytes < 20 * GIB  # published: ~18 GB (model cards ~19 GB)
    assert offload.vram_bytes <= nf4.vram_bytes and offload.ram_bytes > 16 * GIB
    # published, group offload: ~8 GB VRAM and ~32 GB RAM (pinned copies of the 4-bit weights)
    assert group4.vram_bytes < 8 * GIB and 30 * GIB < group4.ram_bytes < 40 * GIB
    assert group16.vram_bytes == group4.vram_bytes and group16.ram_bytes > 110 * GIB
    assert modes["sequential offload (bf16)"].vram_bytes < group16.vram_bytes
    # Activations are real measurements, not constants: a bigger picture needs more.
    assert 0.3 * GIB < flux2_dev_1024.dit_activation_bytes < 4 * GIB


def test_every_mode_is_one_generate_accepts(flux2_dev_1024):
    for mode in estimate_modes(flux2_dev_1024):
        assert offload_refusal(mode.quantization, mode.offload) is None, mode.name
        DiTConfig(quantization=mode.quantization, offload=mode.offload).check()
    # and the rule is real: what generate refuses (e.g. sequential offload of NF4 weights) is never a row
    assert offload_refusal("nf4", "sequential") is not None and offload_refusal("int8", "group") is not None


# Card sizes people own, in GiB as --vram takes them, with RAM given.
@pytest.mark.parametrize(
    "vram,ram,expected",
    [
        (80, 128, "bf16"),
        (48, 64, "int8"),
        (40, 64, "int8"),
        (24, 64, "nf4"),
        (16, 64, "nf4 + group offload"),
        (12, 64, "nf4 + group offload"),
        (8, 64, "nf4 + group offload"),
        (8, 24, None),  # group offload needs the weights twice in RAM while pinning; sequential needs 60 GiB
    ],
)
def test_recommendation_per_card(flux2_dev_1024, vram, ram, expected):
    choice = recommend(estimate_modes(flux2_dev_1024), vram, ram, reserve_gib=1.0)
    assert (choice.name if choice else None) == expected


@pytest.mark.parametrize("vram,expected", [(80, "bf16"), (48, "int8"), (24, "nf4")])
def test_ram_unknown_still_recommends_modes_that_need_no_ram(flux2_dev_1024, vram, expected):
    assert recommend(estimate_modes(flux2_dev_1024), vram, None, reserve_gib=1.0).name == expected


@pytest.mark.parametrize("vram", [8, 12, 16])
def test_ram_unknown_never_says_an_offload_mode_fits(flux2_dev_1024, vram):
    modes = estimate_modes(flux2_dev_1024)
    assert recommend(modes, vram, None, reserve_gib=1.0) is None
    assert {m.fit(vram, None, 1.0) for m in modes if m.ram_bytes} <= {"unknown", "no"}


def test_model_offload_is_chosen_when_only_the_vae_does_not_fit(flux2_dev_1024):
    modes = {m.name: m for m in estimate_modes(flux2_dev_1024)}
    between = (modes["nf4 + model offload"].vram_bytes + modes["nf4"].vram_bytes) / 2 / GIB
    assert recommend(list(modes.values()), between + 1.0, 64, reserve_gib=1.0).name == "nf4 + model offload"


def test_vram_8_alone_with_ram_unknown_says_what_ram_it_needs(flux2_dev_1024):
    # What `flux2-dit plan --vram 8` prints on a machine whose RAM cannot be read.
    modes = estimate_modes(flux2_dev_1024)
    machine = plan_module.Machine(8.0, None, "given", None)
    choice = recommend(modes, 8.0, None, 1.0)
    text = plan_module.format_plan(flux2_dev_1024, modes, "FLUX.2-dev", machine, 1.0, choice)
    assert choice is None and "recommended:" not in text
    assert "RAM unknown: nf4 + group offload fits the VRAM if this machine has at least" in text
    assert "pass --ram GIB" in text
    assert not plan_module.Plan(text, choice, machine, modes, 1.0).nothing_fits  # exit 0: it may fit


def test_cli_reads_the_machine_when_sizes_are_not_given(tiny_model_dir, monkeypatch, capsys):
    small = ["--model", str(tiny_model_dir), "--height", "32", "--width", "32"]
    monkeypatch.setattr(plan_module, "detect_vram_gib", lambda: 11.6)  # a "12 GB" card
    monkeypatch.setattr(plan_module, "detect_ram_gib", lambda: 62.7)
    assert cli.main(["plan", *small]) == 0
    out = capsys.readouterr().out
    assert "11.6 GiB VRAM (detected), 62.7 GiB RAM (detected)" in out and "recommended: bf16" in out
    # given sizes win over detected ones; --no-detect reads nothing
    assert cli.main(["plan", *small, "--vram", "80", "--ram", "128"]) == 0
    assert "80.0 GiB VRAM (given), 128.0 GiB RAM (given)" in capsys.readouterr().out
    assert cli.main(["plan", *small, "--no-detect"]) == 0
    assert "VRAM unknown, RAM unknown" in capsys.readouterr().out


def test_cli_without_cuda_asks_for_vram(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(plan_module, "detect_ram_gib", lambda: 31.0)
    assert cli.main(["plan", "--model", str(tiny_model_dir), "--height", "32", "--width", "32"]) == 0
    out = capsys.readouterr().out
    assert "VRAM unknown, 31.0 GiB RAM (detected)" in out and "no CUDA GPU seen here: pass --vram" in out


def _meminfo_total_gib() -> float:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024 / GIB


def test_ram_detection_reads_this_machine(monkeypatch):
    monkeypatch.setattr(plan_module, "_cgroup_limit_bytes", lambda: None)
    assert abs(REAL_DETECT_RAM() - _meminfo_total_gib()) < 0.01 * _meminfo_total_gib()
    # without sysconf, /proc/meminfo is read
    monkeypatch.setattr(plan_module.os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert abs(REAL_DETECT_RAM() - _meminfo_total_gib()) < 0.01
    # a container's memory limit is what the plan may use
    monkeypatch.setattr(plan_module, "_cgroup_limit_bytes", lambda: 8 * GIB)
    assert REAL_DETECT_RAM() == 8.0


def test_vram_detection_without_cuda_is_none(monkeypatch):
    monkeypatch.setattr(plan_module.torch.cuda, "is_available", lambda: False)
    assert REAL_DETECT_VRAM() is None


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
    fp = Footprint(
        transformer_params=1_000_000,
        linear_params=960_000,
        largest_linear_params=1000,
        vae_params=10,
        dit_activation_bytes=0,
        vae_activation_bytes=0,
        image_tokens=1,
        height=16,
        width=16,
    )
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
    for mode in ALL_MODES:
        assert f"\n{mode} " in out


def test_cli_plan_exits_1_when_nothing_fits(tiny_model_dir, capsys):
    rc = cli.main(
        ["plan", "--model", str(tiny_model_dir), "--vram", "0.5", "--ram", "0.5", "--height", "32", "--width", "32"]
    )
    assert rc == 1
    assert "no mode fits" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", "1000"], "multiple of 16"),
        (["--vram", "-3"], "positive number"),
        (["--model", "/nonexistent/folder"], "no such folder"),
    ],
)
def test_cli_plan_bad_input_exits_2(args, message, capsys):
    assert cli.main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_prequantized_config_is_accepted(tiny_model_dir, tmp_path):
    cfg = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    vae = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    assert measure_footprint(cfg, vae, 32, 32).transformer_params > 0


# -- FLUX.2 [klein] 4B and 9B ----------------------------------------------------------

# diffusers' scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config("klein-4b" / "klein-9b"):
# the keys that differ from FLUX.2-dev's.
KLEIN_CONVERSION = {
    plan_module.KLEIN_4B: dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
    plan_module.KLEIN_9B: dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
}


@pytest.fixture(scope="module")
def klein_1024():
    """Both [klein] DiTs and their VAE measured at 1024x1024 on fake tensors."""
    return {m: measure_footprint(*load_configs(m)[:2], 1024, 1024) for m in KLEIN_CONVERSION}


@pytest.mark.parametrize("model", list(KLEIN_CONVERSION))
def test_bundled_klein_configs_are_the_conversion_scripts(model):
    transformer, vae, source = load_configs(model)
    dev_transformer, dev_vae, _ = load_configs()
    assert "bundled" in source and vae == dev_vae  # one VAE for every FLUX.2 (AutoencoderKLFlux2 defaults)
    assert transformer == {**dev_transformer, **KLEIN_CONVERSION[model], "guidance_embeds": False}


def test_klein_sizes_are_the_published_names(klein_1024):
    four, nine = klein_1024[plan_module.KLEIN_4B], klein_1024[plan_module.KLEIN_9B]
    assert 3.8e9 < four.transformer_params < 4.0e9  # "FLUX.2 [klein] 4B"
    assert 9.0e9 < nine.transformer_params < 9.2e9  # "FLUX.2 [klein] 9B"
    assert four.image_tokens == nine.image_tokens == 4096


@pytest.mark.parametrize(
    "model,vram,ram,expected",
    [
        (plan_module.KLEIN_4B, 12, 32, "bf16"),
        (plan_module.KLEIN_4B, 8, 32, "int8"),
        (plan_module.KLEIN_4B, 6, None, "nf4"),
        (plan_module.KLEIN_9B, 24, 32, "bf16"),
        (plan_module.KLEIN_9B, 12, 32, "int8"),
        (plan_module.KLEIN_9B, 8, None, "nf4"),
        (plan_module.KLEIN_9B, 6, 16, "nf4 + group offload"),
        (plan_module.KLEIN_9B, 6, None, None),
    ],
)
def test_klein_recommendation_per_card(klein_1024, model, vram, ram, expected):
    modes = estimate_modes(klein_1024[model])
    assert [m.name for m in modes] == ALL_MODES
    for mode in modes:  # the same table generate reads, for [klein] as for [dev]
        DiTConfig(model=model, quantization=mode.quantization, offload=mode.offload).check()
    choice = recommend(modes, vram, ram, reserve_gib=1.0)
    assert (choice.name if choice else None) == expected


def test_cli_plan_demo_klein_reads_its_folder(capsys):
    assert (
        cli.main(["plan", "--model", "demo-klein", "--vram", "8", "--ram", "16", "--height", "64", "--width", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "demo-klein-v1" in out and "recommended: bf16" in out
