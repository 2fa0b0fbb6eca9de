"""encoder_server/memory.py: parameter counts of the FLUX.2 text encoders ([dev] Mistral-3, [klein] Qwen3),
from their real configs on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from encoder_server import memory
from encoder_server.cli import main as cli_main


@pytest.fixture(scope="module")
def counts():
    return memory.count_parameters()


def test_bundled_config_is_flux2_dev_text_encoder():
    cfg = json.loads(memory.default_config_path().read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"]) == (40, 5120, 32768)
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (32, 8, 128)
    assert (text["vocab_size"], text["rope_theta"], text["rms_norm_eps"]) == (131072, 1e9, 1e-5)
    assert (vision["num_hidden_layers"], vision["hidden_size"]) == (24, 1024)


def test_counts_match_published_sizes(counts):
    # FLUX2_FACTS.md: ~24.0B total, 0.67B embeddings, 0.67B lm_head, ~0.4B vision; 17.34B kept.
    assert counts.full.params == pytest.approx(24.0e9, rel=0.01)
    assert counts.embeddings.params == 131072 * 5120
    assert counts.lm_head.params == 131072 * 5120
    assert 0.35e9 < counts.vision.params < 0.5e9
    assert counts.truncated.params == pytest.approx(17.34e9, rel=0.002)
    assert counts.full.params / 1e9 < 24.1  # would catch a tied or doubled lm_head


def test_truncated_keeps_embeddings_and_30_layers_only(counts):
    per_layer = counts.decoder_layers.params // 40
    assert counts.decoder_layers.params == 40 * per_layer  # all layers the same size
    assert counts.kept_layers.params == 30 * per_layer
    assert counts.truncated.params == counts.embeddings.params + 30 * per_layer
    dropped = counts.lm_head.params + counts.vision.params + counts.final_norm.params + 10 * per_layer
    assert counts.truncated.params + dropped == counts.full.params


def test_truncated_weight_memory_ratio_meets_goal(counts):
    rows = {r.name: r for r in memory.weight_rows(counts)}
    full = rows["full model, bf16"].bytes
    assert full == pytest.approx(48.0e9, rel=0.01)
    assert rows["truncated (30 layers), bf16"].bytes / full <= 0.73
    fp8 = rows["truncated (30 layers), fp8"].bytes
    nf4 = rows["truncated (30 layers), nf4"].bytes
    # Embeddings stay bf16 in both, so neither is a clean 2x / 4x of bf16.
    assert counts.truncated.params < fp8 < 1.1 * counts.truncated.params
    assert 2 * counts.embeddings.params < nf4 < fp8


def test_fp8_bytes_match_transformers_fp8_layout():
    """Swap a real decoder layer's linears for transformers' FP8Linear and weigh the result."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    layer = memory.meta_model(memory.load_config()).model.language_model.layers[0]
    expected = memory.fp8_bytes(memory._part(layer))
    replace_with_fp8_linear(layer, quantization_config=FineGrainedFP8Config())
    quantized = {torch.float8_e4m3fn}
    actual = 0
    for name, p in layer.named_parameters():
        if p.dtype in quantized or name.endswith("weight_scale_inv"):
            actual += p.numel() * p.element_size()  # fp8 weights, float32 block scales
        else:
            actual += 2 * p.numel()  # norms load in bf16
    assert any(p.dtype in quantized for p in layer.parameters())
    assert actual == expected


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_bitsandbytes_storage(double_quant):
    """Quantize real Linear weights with bitsandbytes (runs on CPU) and compare stored bytes."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 320, bias=False)
    norm = torch.nn.RMSNorm(192)
    model = torch.nn.Sequential(norm, lin)
    q, state = bnbf.quantize_4bit(
        lin.weight.data.bfloat16(), blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    stored = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    stored += 2 * norm.weight.numel()  # norms stay bf16
    assert memory.nf4_bytes(memory._part(model), double_quant=double_quant) == stored


def test_meta_count_equals_loaded_truncated_encoder(tiny_model_dir, tiny_backend):
    """The meta-device count of the tiny model's config equals what the server actually holds."""
    config = memory.load_config(tiny_model_dir / "text_encoder" / "config.json")
    counts = memory.count_parameters(config, layers=30)
    assert tiny_backend.parameter_count() == counts.truncated.params


def test_full_scale_flops_ratio_meets_goal(counts):
    flops = memory.forward_flops(counts)
    assert flops.speedup >= 1.35
    # Dominated by 2 * params per token: 17.34B kept params, 512 tokens.
    assert flops.truncated == pytest.approx(2 * 16.67e9 * 512, rel=0.02)


def test_activation_estimates_grow_with_batch_and_reference_is_larger():
    a1, a4 = memory.activation_estimate(batch=1), memory.activation_estimate(batch=4)
    assert a4.truncated == 4 * a1.truncated and a4.reference == 4 * a1.reference
    # The reference keeps 41 hidden states and [S, 131072] logits per prompt.
    assert a1.reference - a1.truncated >= (41 - 3) * 512 * 5120 * 2


def test_layers_out_of_range_is_refused():
    with pytest.raises(ValueError, match="between 1 and 40"):
        memory.count_parameters(layers=41)


def test_cli_memory_prints_table(capsys):
    assert cli_main(["memory"]) == 0
    out = capsys.readouterr().out
    assert "| **total** | **24.01B** |" in out
    assert "truncated (30 layers), nf4" in out and "0.722x" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["memory", "--layers", "0"], "between 1 and 40"),
        (["memory", "--config", "/no/such/config.json"], "no such config file"),
    ],
)
def test_cli_memory_bad_input_exits_2(capsys, argv, message):
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err


# -- FLUX.2 [klein]: Qwen3-4B and Qwen3-8B ----------------------------------------

QWEN3 = {"4b": "qwen3_4b_text_encoder.json", "8b": "qwen3_8b_text_encoder.json"}


@pytest.fixture(scope="module")
def qwen3_counts():
    return {k: memory.count_parameters(memory.load_config(memory.default_config_path(f))) for k, f in QWEN3.items()}


@pytest.mark.parametrize("size, hidden, intermediate, tied", [("4b", 2560, 9728, True), ("8b", 4096, 12288, False)])
def test_bundled_qwen3_configs_are_the_published_ones(size, hidden, intermediate, tied):
    cfg = json.loads(memory.default_config_path(QWEN3[size]).read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["tie_word_embeddings"]) == (hidden, intermediate, tied)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        36,
        32,
        8,
        128,
    )
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (151936, 1000000, 1e-6)


def test_qwen3_counts_match_the_model_cards(qwen3_counts):
    # Qwen3-4B card: 4.0B parameters, 3.6B non-embedding; Qwen3-8B card: 8.2B, 6.95B non-embedding.
    small, large = qwen3_counts["4b"], qwen3_counts["8b"]
    assert small.full.params == pytest.approx(4.02e9, rel=0.005)
    assert small.decoder_layers.params + small.final_norm.params == pytest.approx(3.6e9, rel=0.01)
    assert small.lm_head.params == 0 and small.embeddings.params == 151936 * 2560  # tied
    assert large.full.params == pytest.approx(8.19e9, rel=0.005)
    assert large.full.params - large.embeddings.params - large.lm_head.params == pytest.approx(6.95e9, rel=0.005)
    assert large.lm_head.params == 151936 * 4096  # untied
    assert small.vision.params == large.vision.params == 0


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_qwen3_keeps_embeddings_and_27_of_36_layers(qwen3_counts, size):
    c = qwen3_counts[size]
    assert (c.layers, c.num_hidden_layers) == (27, 36)  # the [klein] recipe's depth, from the config's model_type
    per_layer = c.decoder_layers.params // 36
    assert c.decoder_layers.params == 36 * per_layer
    assert c.truncated.params == c.embeddings.params + 27 * per_layer
    assert c.truncated.params + c.lm_head.params + c.final_norm.params + 9 * per_layer == c.full.params


def test_truncation_table_covers_dev_and_both_klein_encoders():
    rows = {r.name: r for r in memory.truncation_rows()}
    assert [(r.counts.layers, r.counts.num_hidden_layers) for r in rows.values()] == [(30, 40), (27, 36), (27, 36)]
    small, large = rows["FLUX.2 [klein] 4B: Qwen3-4B"], rows["FLUX.2 [klein] 9B: Qwen3-8B"]
    # Qwen3-4B's tied embeddings stay whole in the truncated model, so it saves less weight than the 8B...
    assert small.counts.truncated.params / small.counts.full.params == pytest.approx(0.774, abs=0.001)
    assert large.counts.truncated.params / large.counts.full.params == pytest.approx(0.712, abs=0.001)
    # ...but its lm_head is still computed by the reference, so both save more FLOPs than [dev].
    assert small.flops.speedup == pytest.approx(1.470, abs=0.001)
    assert large.flops.speedup == pytest.approx(1.450, abs=0.001)
    assert rows["FLUX.2-dev: Mistral-Small-3.x 24B"].flops.speedup == pytest.approx(1.373, abs=0.001)
    table = memory.truncation_table()
    assert "| FLUX.2 [klein] 4B: Qwen3-4B | 27 of 36 | 4.02B | 3.11B | 0.774x |" in table


def test_meta_count_equals_loaded_klein_encoder(tmp_path):
    """The meta-device count of a Qwen3 config equals what the server holds after loading it."""
    from common.demo import TinyKleinSpec, build_tiny_klein
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedTextEncoder

    folder = build_tiny_klein(tmp_path / "klein", TinyKleinSpec(with_dit=False, tie_word_embeddings=False))
    counts = memory.count_parameters(memory.load_config(folder / "text_encoder" / "config.json"))
    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    backend = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.float32)
    assert backend.parameter_count() == counts.truncated.params
    assert counts.layers == 27 and counts.lm_head.params > 0


def test_cli_memory_reads_a_qwen3_config(capsys):
    assert cli_main(["memory", "--config", str(memory.default_config_path(QWEN3["8b"])), "--layers", "27"]) == 0
    out = capsys.readouterr().out
    assert "| **total** | **8.19B** |" in out and "truncated (27 layers), bf16 | 5.83B" in out
    assert "vision" not in out


@pytest.mark.parametrize(
    "model_type, message",
    [
        ("qwen3", "between 1 and 36"),  # --layers 37
        ("llama", "has model_type 'llama'; this server knows mistral3"),  # a family without a recipe
    ],
)
def test_cli_memory_refuses_what_it_cannot_count(capsys, tmp_path, model_type, message):
    cfg = json.loads(memory.default_config_path(QWEN3["4b"]).read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    assert cli_main(["memory", "--config", str(tmp_path / "config.json"), "--layers", "37"]) == 2
    assert message in capsys.readouterr().err
