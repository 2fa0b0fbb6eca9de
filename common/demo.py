"""Tiny, random, FLUX.2-shaped model folders for demos and tests.

``build_tiny_flux2(path)`` writes the same layout ``Flux2Pipeline.save_pretrained``
writes for FLUX.2-dev (``text_encoder/``, ``tokenizer/``, ``transformer/``,
``vae/``, ``scheduler/``, ``model_index.json``), at toy sizes, so the demo and
the tests load it through exactly the ``from_pretrained`` path real weights use.
``build_tiny_klein(path)`` does the same for FLUX.2 [klein]
(``Flux2KleinPipeline``: a Qwen3 text encoder with a Qwen-style chat template).

THE WEIGHTS ARE RANDOM. Embeddings and images made from them are noise; they
only prove that the plumbing works end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the builder changes what it writes, so stale caches are rebuilt.
DEMO_FORMAT_VERSION = 1
DEMO_NOTICE = "demo model: weights are RANDOM, embeddings and images are noise"

# Mistral's Tekken tokenizer puts its control tokens first, at these ids.
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]  # fmt: skip

# Mistral-Small-3.x style: system prompt in [SYSTEM_PROMPT] tags, user turns in
# [INST] tags, content given either as a string or as a list of typed blocks
# (the form diffusers' format_input produces).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'text' -%}{%- set ns.text = ns.text + block['text'] -%}"
    "{%- elif block['type'] == 'image' -%}{%- set ns.text = ns.text + '[IMG]' -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]{{ ns.text }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' -%}[INST]{{ ns.text }}[/INST]"
    "{%- elif message['role'] == 'assistant' -%}{{ ns.text }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class TinyFlux2Spec:
    """Sizes of the tiny model. Defaults keep FLUX.2-dev's depth (40 text layers,
    of which hidden_states 10/20/30 are used) at toy width."""

    text_layers: int = 40
    text_hidden: int = 16
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 32
    vocab_size: int = 384
    padding_side: str = "left"
    dit_layers: int = 1
    dit_single_layers: int = 1
    seed: int = 0
    with_dit: bool = True


def _build_tokenizer(padding_side: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE without merges: every byte is a token, so any text
    # (unicode included) tokenizes, with nothing to train or download.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
        model_max_length=131072,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in {"<unk>", "<s>", "</s>", "<pad>"}],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build_text_encoder(spec: TinyFlux2Spec, vocab_size: int):
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab_size,
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "max_position_embeddings": 1024,
            "num_attention_heads": spec.text_heads,
            "num_hidden_layers": spec.text_layers,
            "num_key_value_heads": spec.text_kv_heads,
            "head_dim": spec.text_hidden // spec.text_heads,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 11,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 32,
            "image_size": 28,
            "patch_size": 14,
            "num_channels": 3,
        },
        image_token_index=SPECIAL_TOKENS.index("[IMG]"),
        spatial_merge_size=1,
    )
    torch.manual_seed(spec.seed)
    return Mistral3ForConditionalGeneration(config).eval()


def _build_dit(spec, joint_attention_dim: int, *, guidance_embeds: bool = True):
    """DiT, VAE and scheduler for a tiny spec (``TinyFlux2Spec`` or ``TinyKleinSpec``: seed and DiT depth)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(spec.seed + 1)
    vae = AutoencoderKLFlux2(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(spec.seed + 2)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * 4,  # latent_channels x 2x2 patchify, like 32 x 4 = 128 in FLUX.2-dev
        num_layers=spec.dit_layers,
        num_single_layers=spec.dit_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    return transformer, vae, FlowMatchEulerDiscreteScheduler()


def _write_marker(path: Path, spec) -> None:
    (path / "flux2_remote_demo.json").write_text(
        json.dumps({"format_version": DEMO_FORMAT_VERSION, "spec": asdict(spec), "notice": DEMO_NOTICE}, indent=2)
    )


def build_tiny_flux2(path: str | os.PathLike, spec: TinyFlux2Spec = TinyFlux2Spec()) -> Path:
    """Write a tiny random FLUX.2 model folder at ``path`` and return it.

    Deterministic: the same ``spec`` always gives the same weights. With
    ``spec.with_dit`` the folder is a complete ``Flux2Pipeline`` (loadable with
    ``Flux2Pipeline.from_pretrained(path)``); without, only ``text_encoder/`` and
    ``tokenizer/`` are written.
    """
    from diffusers import Flux2Pipeline

    path = Path(path)
    tokenizer = _build_tokenizer(spec.padding_side)
    vocab_size = max(spec.vocab_size, len(tokenizer))
    text_encoder = _build_text_encoder(spec, vocab_size)
    if spec.with_dit:
        from common.encoder_spec import FLUX2_DEV

        joint_dim = len(FLUX2_DEV.hidden_states_layers) * spec.text_hidden
        transformer, vae, scheduler = _build_dit(spec, joint_dim)
        pipe = Flux2Pipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        pipe.save_pretrained(path)
    else:
        text_encoder.save_pretrained(path / "text_encoder")
        tokenizer.save_pretrained(path / "tokenizer")
    _write_marker(path, spec)
    return path


def end_generation_soon(model) -> None:
    """Bend a random ``Mistral3ForConditionalGeneration``'s weights so its sampled answers end soon.

    A random model almost never samples its end-of-sequence token, so every answer
    would run ``max_new_tokens`` (512 for prompt upsampling: a minute on a CPU even at
    toy size). After this, each step samples EOS with a probability of about one in
    twenty, whatever came before: the residual stream is dominated by one dimension,
    the final norm keeps only that one, and EOS's embedding row (tied to ``lm_head``)
    is a little larger there. For tests and dry runs of the generation path only.
    """
    import torch

    backbone = model.model.language_model
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        backbone.embed_tokens.weight[:, 1] += 20.0
        backbone.embed_tokens.weight[eos, 1] += 0.1
        backbone.norm.weight.zero_()
        backbone.norm.weight[1] = 1.0
        if model.lm_head.weight is not backbone.embed_tokens.weight:
            model.lm_head.weight.copy_(backbone.embed_tokens.weight)


# -- FLUX.2 [klein]: a Qwen3 text encoder --------------------------------------

# Qwen3's control tokens; "<think>"/"</think>" are plain added tokens there, not special ones.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_THINK_TOKENS = ["<think>", "</think>"]

# A small template of our own with the structure Qwen3's renders for the turns
# FLUX.2 [klein] uses: "<|im_start|>{role}\n{content}<|im_end|>\n" per message,
# then with add_generation_prompt the assistant header, and with
# enable_thinking=False an empty think block:
# "<|im_start|>assistant\n<think>\n\n</think>\n\n". Tools and reasoning
# content, which FLUX.2 never sends, are left out.
KLEIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class TinyKleinSpec:
    """Sizes of the tiny [klein] model. Defaults keep Qwen3-4B's depth (36 layers, of
    which hidden_states 9/18/27 are used), its tied embeddings and its wider attention
    (heads x head_dim > hidden) at toy width."""

    text_layers: int = 36
    text_hidden: int = 16
    text_heads: int = 4
    text_kv_heads: int = 2
    text_head_dim: int = 8
    text_intermediate: int = 32
    vocab_size: int = 300
    tie_word_embeddings: bool = True
    padding_side: str = "right"
    is_distilled: bool = True
    dit_layers: int = 1
    dit_single_layers: int = 1
    seed: int = 0
    with_dit: bool = True


def _build_qwen_tokenizer(padding_side: str):
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    # Byte-level BPE without merges, as for [dev]: any text tokenizes, byte by
    # byte, with nothing to train or download. Qwen2Tokenizer supplies Qwen's own
    # pre-tokenizer and NFC normalizer.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in QWEN_SPECIAL_TOKENS + QWEN_THINK_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side=padding_side,
        model_max_length=131072,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_THINK_TOKENS])
    tok.chat_template = KLEIN_CHAT_TEMPLATE
    return tok


def _build_qwen3_text_encoder(spec: TinyKleinSpec, vocab_size: int, eos_token_id: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=spec.text_head_dim,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        rms_norm_eps=1e-06,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(spec.seed)
    return Qwen3ForCausalLM(config).eval()


def build_tiny_klein(path: str | os.PathLike, spec: TinyKleinSpec = TinyKleinSpec()) -> Path:
    """Write a tiny random FLUX.2 [klein] model folder at ``path`` and return it.

    Deterministic, like :func:`build_tiny_flux2`. With ``spec.with_dit`` the folder
    is a complete ``Flux2KleinPipeline`` (``model_index.json`` records
    ``is_distilled``); without, only ``text_encoder/`` and ``tokenizer/``.
    """
    from common.encoder_spec import FLUX2_KLEIN

    path = Path(path)
    tokenizer = _build_qwen_tokenizer(spec.padding_side)
    vocab_size = max(spec.vocab_size, len(tokenizer))
    text_encoder = _build_qwen3_text_encoder(spec, vocab_size, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if spec.with_dit:
        from diffusers import Flux2KleinPipeline

        joint_dim = FLUX2_KLEIN.embedding_dim(spec.text_hidden)
        # Flux2KleinPipeline never passes a guidance value (base models use real CFG), so no guidance embedding.
        transformer, vae, scheduler = _build_dit(spec, joint_dim, guidance_embeds=False)
        pipe = Flux2KleinPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=spec.is_distilled,
        )
        pipe.save_pretrained(path)
    else:
        text_encoder.save_pretrained(path / "text_encoder")
        tokenizer.save_pretrained(path / "tokenizer")
    _write_marker(path, spec)
    return path


# -- the cached demo folders ---------------------------------------------------

DEMO_MODELS = {"demo": "dev", "demo-klein": "klein"}
"""MODEL names that resolve to a demo folder, and the variant each builds."""
_BUILDERS: dict[str, Callable[..., Path]] = {"dev": build_tiny_flux2, "klein": build_tiny_klein}


def cache_root() -> Path:
    """flux2-remote's own cache folder: the user cache dir (FLUX2_REMOTE_CACHE overrides)."""
    import platformdirs

    return Path(os.environ.get("FLUX2_REMOTE_CACHE") or platformdirs.user_cache_dir("flux2-remote"))


def default_demo_dir(variant: str = "dev") -> Path:
    """Where ``--model demo`` (``variant="dev"``) or ``--model demo-klein`` (``"klein"``) lives, in :func:`cache_root`."""
    if variant not in _BUILDERS:
        raise ValueError(f"unknown demo variant {variant!r}; choose from {', '.join(_BUILDERS)}")
    prefix = "demo" if variant == "dev" else f"demo-{variant}"
    return cache_root() / f"{prefix}-v{DEMO_FORMAT_VERSION}"


def is_demo_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` was written by :func:`build_tiny_flux2` (random weights)."""
    return (Path(path) / "flux2_remote_demo.json").is_file()


def ensure_demo_model(target: str | os.PathLike | None = None, *, variant: str = "dev") -> Path:
    """Build the demo folder of ``variant`` (``"dev"`` or ``"klein"``) once and return it; later calls reuse it.

    The folder is built in a temporary sibling and renamed into place, so an
    interrupted build never leaves a half-written model behind, and two
    processes racing to build it both end with one complete folder.
    """
    target = Path(target) if target is not None else default_demo_dir(variant)
    if is_demo_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _BUILDERS[variant](tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_demo_folder(target):
                if target.exists():  # a torn folder from an older, non-atomic writer
                    shutil.rmtree(target)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
