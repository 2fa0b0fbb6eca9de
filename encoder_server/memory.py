"""How much memory the FLUX.2 text encoders need, counted rather than guessed.

The real model configs are instantiated on PyTorch's ``meta`` device: every
parameter has its true shape but no storage, so the 24B model is "built" in
well under a second on any machine. Bundled (``common/configs/``):

- ``flux2_dev_text_encoder.json``: FLUX.2-dev's Mistral-Small-3.x 24B (``Mistral3Config``).
- ``qwen3_4b_text_encoder.json``: Qwen3-4B, FLUX.2 [klein] 4B's text encoder; the
  values of ``config.json`` on the hub's ``Qwen/Qwen3-4B`` model card.
- ``qwen3_8b_text_encoder.json``: Qwen3-8B, [klein] 9B's; from ``Qwen/Qwen3-8B``.

Which model class is built and how many layers the server keeps follow the
config's ``model_type`` through the server's recipes (``encoder_server/text_encoder.py``). Bytes then follow from element counts and each storage format's
layout:

- **bf16**: 2 bytes per parameter.
- **fp8** (transformers ``FineGrainedFP8Config``, the server's ``--quantization fp8``):
  every ``nn.Linear`` weight in ``float8_e4m3fn`` (1 byte) plus one float32
  scale per 128x128 block; embeddings and RMSNorm weights stay bf16.
- **nf4** (bitsandbytes through ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4")``, the server's ``--quantization nf4``): every
  ``nn.Linear`` weight packed at 4 bits (0.5 byte) plus one float32 absmax per
  64-element block (+0.0625 byte/param). With ``bnb_4bit_use_double_quant``
  the absmax is itself 8-bit, with one float32 per 256 absmax (+~0.0157
  byte/param). bitsandbytes does not quantize ``nn.Embedding``: the 0.67B
  embedding table stays bf16 (Qwen3's 0.39B/0.62B too). The 16-entry code table and per-tensor
  quant-state header (well under 1 KiB per layer) are not counted.

Activation figures are estimates from tensor shapes (formulas in
:func:`activation_estimate`); ``benchmarks/gpu_encoder.py`` measures the real
peaks on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from common.encoder_spec import FLUX2_DEV, EncoderSpec

CONFIG_NAME = "flux2_dev_text_encoder.json"
BUNDLED_CONFIGS = {
    "FLUX.2-dev: Mistral-Small-3.x 24B": "flux2_dev_text_encoder.json",
    "FLUX.2 [klein] 4B: Qwen3-4B": "qwen3_4b_text_encoder.json",
    "FLUX.2 [klein] 9B: Qwen3-8B": "qwen3_8b_text_encoder.json",
}
"""The text encoders whose real configs ship with the package (``common/configs/``)."""
GB = 1e9  # the table is in decimal GB, like the model cards' "48 GB"

FP8_BLOCK = (128, 128)  # FineGrainedFP8Config's default weight_block_size
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize
NF4_DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level float32 scale


def default_config_path(name: str = CONFIG_NAME) -> Path:
    """Path of a bundled text-encoder config (default: FLUX.2-dev's)."""
    return Path(str(resources.files("common") / "configs" / name))


def _recipe(config):
    """The server's recipe for ``config`` (ValueError for a family it does not run)."""
    from encoder_server.text_encoder import ConfigError, recipe_for_model_type

    try:
        return recipe_for_model_type(getattr(config, "model_type", None))
    except ConfigError as exc:
        raise ValueError(f"the config {exc}") from None


def load_config(path: str | Path | None = None):
    """The text-encoder config at ``path`` (a config.json or its folder; default: the bundled FLUX.2-dev one).

    A ``Mistral3Config`` ([dev]) or a ``Qwen3Config`` ([klein]); ValueError for anything else.
    """
    from transformers import AutoConfig

    path = Path(path).expanduser() if path else default_config_path()
    if not path.exists():  # else transformers would take the path for a hub repo id
        raise FileNotFoundError(f"no such config file or folder: {path}")
    from encoder_server.text_encoder import ConfigError

    config = AutoConfig.from_pretrained(str(path))
    try:
        decoder_config(config)
    except ConfigError as exc:  # a config of a known type but without the decoder the recipe expects
        raise ValueError(f"{path}: {exc}") from None
    return config


def decoder_config(config):
    """The decoder stack's config inside a text-encoder ``config`` (Mistral-3's ``text_config``, Qwen3's itself)."""
    return _recipe(config).decoder_config(config)


def spec_for_config(config) -> EncoderSpec:
    """The embedding recipe a text encoder with ``config`` serves (its layers decide the truncation depth)."""
    return _recipe(config).spec


def meta_model(config):
    """The reference's text-encoder class (``Mistral3ForConditionalGeneration``, ``Qwen3ForCausalLM``)
    built from ``config`` on the meta device: shapes, no storage."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, _recipe(config).checkpoint_class)(config)


@dataclass(frozen=True)
class Part:
    """Element counts of one group of parameters.

    Attributes:
        linear: elements in ``nn.Linear`` weights (what fp8/nf4 quantize).
        other: everything else (embeddings, norms, convolutions).
        fp8_scales: float32 scale count under 128x128 block-wise fp8.
        nf4_blocks: 64-element absmax block count under bitsandbytes 4-bit.
    """

    linear: int = 0
    other: int = 0
    fp8_scales: int = 0
    nf4_blocks: int = 0

    @property
    def params(self) -> int:
        return self.linear + self.other

    def __add__(self, o: Part) -> Part:
        return Part(
            self.linear + o.linear, self.other + o.other, self.fp8_scales + o.fp8_scales, self.nf4_blocks + o.nf4_blocks
        )


def _part(module: torch.nn.Module, skip: frozenset[int] = frozenset()) -> Part:
    """Element counts of ``module``'s parameters, leaving out those whose ``id`` is in ``skip``."""
    linear = other = scales = blocks = 0
    linear_weights = set()
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear) and id(sub.weight) not in skip and id(sub.weight) not in linear_weights:
            w = sub.weight
            linear_weights.add(id(w))
            linear += w.numel()
            out_f, in_f = w.shape
            scales += math.ceil(out_f / FP8_BLOCK[0]) * math.ceil(in_f / FP8_BLOCK[1])
            blocks += math.ceil(w.numel() / NF4_BLOCK)
    for p in module.parameters():
        if id(p) not in linear_weights and id(p) not in skip:
            other += p.numel()
    return Part(linear, other, scales, blocks)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of the text encoder, by part (element counts).

    Attributes:
        embeddings: token embedding table, ``[vocab, hidden]``.
        decoder_layers: all decoder layers of the language model.
        kept_layers: the first ``layers`` decoder layers (what the server runs).
        final_norm: the language model's last RMSNorm (the server replaces it with Identity).
        lm_head: output projection, ``[vocab, hidden]``; empty when tied to the embeddings
            (FLUX.2-dev's and Qwen3-8B's are not tied; Qwen3-4B's is).
        vision: everything else: the Pixtral vision tower plus the multimodal projector
            for Mistral-3; nothing for Qwen3.
        layers: number of kept decoder layers.
        num_hidden_layers: decoder layers in the config.
    """

    embeddings: Part
    decoder_layers: Part
    kept_layers: Part
    final_norm: Part
    lm_head: Part
    vision: Part
    layers: int
    num_hidden_layers: int

    @property
    def language_model(self) -> int:
        """Embeddings + all decoder layers + final norm (no lm_head)."""
        return self.embeddings.params + self.decoder_layers.params + self.final_norm.params

    @property
    def full(self) -> Part:
        return self.embeddings + self.decoder_layers + self.final_norm + self.lm_head + self.vision

    @property
    def truncated(self) -> Part:
        """What the server keeps: embeddings and the first ``layers`` decoder layers."""
        return self.embeddings + self.kept_layers

    @property
    def upsampling_extra(self) -> Part:
        """What ``--upsampling`` loads on top of :attr:`truncated`: the deeper layers, the final
        norm, ``lm_head`` and the vision tower (the first layers are shared, not loaded twice)."""
        deeper = Part(
            *(getattr(self.decoder_layers, f) - getattr(self.kept_layers, f) for f in Part.__dataclass_fields__)
        )
        return deeper + self.final_norm + self.lm_head + self.vision


def _rest(model: torch.nn.Module, covered: list[torch.nn.Module]) -> Part:
    """The :class:`Part` of ``model``'s parameters outside the ``covered`` modules."""
    return _part(model, skip=frozenset(id(p) for m in covered for p in m.parameters()))


def count_parameters(config=None, layers: int | None = None) -> ParameterCounts:
    """Count parameters of a text-encoder ``config`` on the meta device.

    Args:
        config: a ``Mistral3Config`` or ``Qwen3Config``, or ``None`` for the bundled FLUX.2-dev one.
        layers: decoder layers the truncated encoder keeps; default: what the config's recipe
            runs (30 for FLUX.2-dev's hidden states 10/20/30, 27 for [klein]'s 9/18/27).
    """
    config = config if config is not None else load_config()
    layers = layers if layers is not None else spec_for_config(config).computed_layers
    n_layers = decoder_config(config).num_hidden_layers
    if not 1 <= layers <= n_layers:
        raise ValueError(f"layers must be between 1 and {n_layers}, got {layers}")
    model = meta_model(config)
    lm = model.get_decoder()  # the backbone the server loads: MistralModel, Qwen3Model
    tied = model.lm_head.weight is lm.embed_tokens.weight
    lm_head = Part() if tied else _part(model.lm_head)
    return ParameterCounts(
        embeddings=_part(lm.embed_tokens),
        decoder_layers=sum((_part(layer) for layer in lm.layers), Part()),
        kept_layers=sum((_part(layer) for layer in lm.layers[:layers]), Part()),
        final_norm=_part(lm.norm),
        lm_head=lm_head,
        vision=_rest(model, [lm, model.lm_head]),
        layers=layers,
        num_hidden_layers=n_layers,
    )


# -- weight bytes --------------------------------------------------------


def bf16_bytes(part: Part) -> int:
    return 2 * part.params


def fp8_bytes(part: Part) -> int:
    """1 byte per linear weight + float32 block scales; the rest bf16."""
    return part.linear + 4 * part.fp8_scales + 2 * part.other


def nf4_bytes(part: Part, *, double_quant: bool = False) -> int:
    """0.5 byte per linear weight + absmax per 64-element block; the rest bf16 (embeddings included)."""
    packed = (part.linear + 1) // 2
    if double_quant:
        absmax = part.nf4_blocks + 4 * math.ceil(part.nf4_blocks / NF4_DOUBLE_QUANT_BLOCK)
    else:
        absmax = 4 * part.nf4_blocks
    return packed + absmax + 2 * part.other


@dataclass(frozen=True)
class WeightRow:
    """One line of the weight-memory table (``bytes`` in bytes)."""

    name: str
    params: int
    bytes: int
    note: str


def weight_rows(counts: ParameterCounts) -> list[WeightRow]:
    """The weight-memory table: full bf16, truncated bf16/fp8/nf4 (the server also loads no more than that)."""
    t, k = counts.truncated, counts.layers
    vision = counts.vision.params > 0
    head = "lm_head" if counts.lm_head.params else "lm_head tied to the embeddings"
    return [
        WeightRow(
            "full model, bf16",
            counts.full.params,
            bf16_bytes(counts.full),
            f"all {counts.num_hidden_layers} layers, {head}{', vision tower' if vision else ''} "
            "(what the reference pipeline loads)",
        ),
        WeightRow(
            f"truncated ({k} layers), bf16",
            t.params,
            bf16_bytes(t),
            f"embeddings + layers 1-{k}; no lm_head, {'no vision tower, ' if vision else ''}no final norm",
        ),
        WeightRow(
            f"truncated ({k} layers), fp8",
            t.params,
            fp8_bytes(t),
            "linear weights float8_e4m3fn + fp32 scale per 128x128 block; embeddings, norms bf16",
        ),
        WeightRow(
            f"truncated ({k} layers), nf4",
            t.params,
            nf4_bytes(t),
            "linear weights 4-bit + fp32 absmax per 64; embeddings (not quantized by bitsandbytes), norms bf16",
        ),
        WeightRow(
            f"truncated ({k} layers), nf4 + double quant",
            t.params,
            nf4_bytes(t, double_quant=True),
            "as nf4, absmax stored 8-bit (bnb_4bit_use_double_quant=True; not the server's default)",
        ),
    ]


def upsampling_rows(counts: ParameterCounts) -> list[WeightRow]:
    """What ``--upsampling`` adds to the truncated weights, per quantization.

    Both transformers quantizers leave the output projection (``lm_head``) unquantized
    by default, so it is counted bf16 in every row.
    """
    extra, head = counts.upsampling_extra, counts.lm_head
    rest = Part(*(getattr(extra, f) - getattr(head, f) for f in Part.__dataclass_fields__))
    note = (
        f"layers {counts.layers + 1}-{counts.num_hidden_layers}, final norm, "
        f"{'lm_head, ' if head.params else ''}{'vision tower' if counts.vision.params else ''}"
    ).rstrip(", ")
    return [
        WeightRow("+ upsampling, bf16", extra.params, bf16_bytes(extra), note),
        WeightRow("+ upsampling, fp8", extra.params, fp8_bytes(rest) + bf16_bytes(head), f"{note}; lm_head bf16"),
        WeightRow("+ upsampling, nf4", extra.params, nf4_bytes(rest) + bf16_bytes(head), f"{note}; lm_head bf16"),
    ]


def kv_cache_bytes(config, tokens: int, bytes_per_el: int = 2) -> int:
    """Bytes of one prompt's KV cache over every decoder layer at ``tokens`` tokens (bf16 by default)."""
    tc = decoder_config(config)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * tokens * bytes_per_el


# -- compute -------------------------------------------------------------


@dataclass(frozen=True)
class FlopCounts:
    """Forward FLOPs per prompt (multiply-add = 2 FLOPs) at ``seq_len`` tokens.

    Attributes:
        reference: the full forward diffusers runs: all layers, final norm, lm_head on every position.
        truncated: embeddings + the kept layers only.
    """

    reference: int
    truncated: int
    seq_len: int

    @property
    def speedup(self) -> float:
        return self.reference / self.truncated


def forward_flops(counts: ParameterCounts, config=None, seq_len: int = FLUX2_DEV.max_sequence_length) -> FlopCounts:
    """Matmul FLOPs of the reference and the truncated forward, per prompt.

    Counts ``2 * linear params`` per token for projections and ``4 * seq_len *
    heads * head_dim`` per token per layer for the attention core (QK^T and
    AV over all ``seq_len`` keys: the padding mask turns SDPA's causal
    shortcut off). Norms, RoPE, SiLU and the embedding gather are O(hidden)
    per token and left out (<0.1%).
    """
    config = config if config is not None else load_config()
    tc = decoder_config(config)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    attn_core = 4 * seq_len * tc.num_attention_heads * head_dim  # per token per layer
    per_layer = 2 * counts.decoder_layers.linear // counts.num_hidden_layers + attn_core
    lm_head = 2 * tc.vocab_size * tc.hidden_size  # computed even when its weight is tied
    reference = seq_len * (counts.num_hidden_layers * per_layer + lm_head)
    truncated = seq_len * counts.layers * per_layer
    return FlopCounts(reference, truncated, seq_len)


@dataclass(frozen=True)
class ActivationEstimate:
    """Estimated peak activation bytes of one forward pass (weights excluded).

    Attributes:
        batch: prompts per forward.
        truncated: the server's forward (3 kept hidden states).
        reference: diffusers' forward (``output_hidden_states=True`` keeps all
            ``num_hidden_layers + 1`` states, plus ``[B, S, vocab]`` logits).
    """

    batch: int
    truncated: int
    reference: int


def activation_estimate(
    config=None, batch: int = 1, seq_len: int = FLUX2_DEV.max_sequence_length, *, bytes_per_el: int = 2
) -> ActivationEstimate:
    """Peak activation bytes at ``batch`` prompts of ``seq_len`` tokens, in a 2-byte dtype.

    With ``state = B*S*hidden`` elements:

    - kept hidden states: 3 (server) or ``num_hidden_layers + 1`` (reference) states;
    - residual stream: 2 states (layer input and output);
    - the largest transient inside a layer: the MLP holds 3 ``[B, S, intermediate]``
      tensors (act(gate), up, their product); the attention core is assumed fused
      (SDPA; eager attention adds ``B*heads*S*S`` fp32 scores);
    - reference only: logits ``[B, S, vocab]`` (computed for every position);
    - output: the stacked ``[B, 3, S, hidden]`` and its ``[B, S, 3*hidden]`` copy.
    """
    config = config if config is not None else load_config()
    tc = decoder_config(config)
    state = batch * seq_len * tc.hidden_size
    n_out = len(spec_for_config(config).hidden_states_layers)
    mlp = 3 * batch * seq_len * tc.intermediate_size
    logits = batch * seq_len * tc.vocab_size
    output = 2 * n_out * state
    truncated = n_out * state + 2 * state + mlp + output
    reference = (tc.num_hidden_layers + 1) * state + 2 * state + max(mlp, logits) + output
    return ActivationEstimate(batch, truncated * bytes_per_el, reference * bytes_per_el)


# -- report --------------------------------------------------------------


def memory_table(
    config_path: str | Path | None = None, layers: int | None = None, batches: tuple[int, ...] = (1, 4, 8)
) -> str:
    """The full memory report as markdown: parameter counts, weight bytes, FLOPs, activations.

    ``layers``: decoder layers kept; default: what the config's recipe runs (30 for [dev], 27 for [klein]).
    """
    config = load_config(config_path)
    counts = count_parameters(config, layers)
    layers = counts.layers
    flops = forward_flops(counts, config)
    rows = weight_rows(counts)
    full_bytes = rows[0].bytes

    def b(n: float) -> str:
        return f"{n / 1e9:.2f}B"

    lines = [
        f"Config: {config_path or default_config_path()} (instantiated on the meta device; no weights)",
        "",
        "| part | parameters |",
        "|---|---:|",
        f"| token embeddings | {b(counts.embeddings.params)} |",
        f"| decoder layers (all {counts.num_hidden_layers}) | {b(counts.decoder_layers.params)} |",
        f"| decoder layers kept (1-{layers}) | {b(counts.kept_layers.params)} |",
        f"| language model (embeddings + layers + norm) | {b(counts.language_model)} |",
        f"| lm_head | {b(counts.lm_head.params)} |"
        if counts.lm_head.params
        else "| lm_head | tied to the embeddings |",
        *([f"| vision tower + projector | {b(counts.vision.params)} |"] if counts.vision.params else []),
        f"| **total** | **{b(counts.full.params)}** |",
        "",
        "| weights | parameters | GB | vs full bf16 | what is counted |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {b(r.params)} | {r.bytes / GB:.2f} | {r.bytes / full_bytes:.3f}x | {r.note} |")
    lines += [
        "",
        f"Forward FLOPs per prompt at {flops.seq_len} tokens: reference {flops.reference / 1e12:.2f} TFLOP, "
        f"truncated {flops.truncated / 1e12:.2f} TFLOP, ratio {flops.speedup:.3f}x",
        "",
        f"| batch (x{flops.seq_len} tokens, bf16) | truncated activations GB | reference activations GB |",
        "|---:|---:|---:|",
    ]
    for batch in batches:
        a = activation_estimate(config, batch)
        lines.append(f"| {batch} | {a.truncated / GB:.2f} | {a.reference / GB:.2f} |")
    if _recipe(config).upsampling:
        lines += [
            "",
            "`--upsampling` (prompt upsampling, docs/upsampling.md) loads the rest of the model once; "
            f"layers 1-{layers} are shared with the embedding path:",
            "",
            "| extra weights | parameters | GB | what is counted |",
            "|---|---:|---:|---|",
            *(f"| {r.name} | {b(r.params)} | {r.bytes / GB:.2f} | {r.note} |" for r in upsampling_rows(counts)),
            "",
            f"Plus a KV cache of {kv_cache_bytes(config, 2048 + 512) / GB:.2f} GB per prompt being upsampled "
            "(2048 prompt tokens + 512 generated, bf16).",
        ]
    lines.append("")
    lines.append("Activation figures are estimates from tensor shapes (encoder_server/memory.py), not measurements.")
    return "\n".join(lines)


# -- the truncation ratio of every bundled text encoder ---------------------


@dataclass(frozen=True)
class TruncationRow:
    """Full against truncated, for one text encoder.

    Attributes:
        name: which model (a key of :data:`BUNDLED_CONFIGS`).
        counts: its parameter counts, truncated at its recipe's depth.
        flops: forward FLOPs per prompt, reference and truncated.
    """

    name: str
    counts: ParameterCounts
    flops: FlopCounts


def truncation_rows(configs: dict[str, str] = BUNDLED_CONFIGS) -> list[TruncationRow]:
    """Counts and FLOPs of each bundled config, truncated where its recipe needs (no weights)."""
    rows = []
    for name, file in configs.items():
        config = load_config(default_config_path(file))
        counts = count_parameters(config)
        rows.append(TruncationRow(name, counts, forward_flops(counts, config)))
    return rows


def truncation_table(configs: dict[str, str] = BUNDLED_CONFIGS) -> str:
    """Markdown: for every bundled text encoder, parameters and FLOPs of the full reference
    forward against the server's truncated one."""
    lines = [
        "| text encoder | layers run | parameters, full | parameters, truncated | ratio "
        f"| TFLOP/prompt (x{FLUX2_DEV.max_sequence_length} tokens), full | truncated | full / truncated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in truncation_rows(configs):
        c, f = r.counts, r.flops
        lines.append(
            f"| {r.name} | {c.layers} of {c.num_hidden_layers} | {c.full.params / 1e9:.2f}B "
            f"| {c.truncated.params / 1e9:.2f}B | {c.truncated.params / c.full.params:.3f}x "
            f"| {f.reference / 1e12:.2f} | {f.truncated / 1e12:.2f} | {f.speedup:.3f}x |"
        )
    lines += [
        "",
        "Full: the reference pipeline's text encoder (lm_head computed, vision tower loaded for [dev]); "
        "truncated: embeddings + the layers run, as flux2-encoder serve loads them.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m encoder_server.memory: the truncation table of docs/memory.md.
    print(truncation_table())
