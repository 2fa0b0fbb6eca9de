"""The model behind the service: a FLUX.2 text encoder, truncated.

Computes exactly what the pipeline's reference function computes, bit for bit
(``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` for [dev],
``Flux2KleinPipeline._get_qwen3_prompt_embeds`` for [klein]), but runs only the
embedding layer and the decoder layers up to the deepest requested hidden state
(30 of 40 for FLUX.2-dev, 27 of 36 for [klein]). Only the language model's
backbone is loaded, cut after that layer: the deeper layers, the final norm,
``lm_head`` (and for [dev] the vision tower and projector) are never read from disk.

What differs between families is one :class:`TextEncoderRecipe`: which config
holds the decoder, which bare backbone class runs it, how checkpoint keys map
onto it, and how prompts become token ids. Everything else (loading, truncation,
the forward pass, fingerprints) is shared by :class:`TruncatedTextEncoder`.

Two compute modes (``compute=``):

- ``"exact"`` (the default): every prompt padded to 512 tokens, one forward,
  bit-exact with the reference.
- ``"packed"``: only the real tokens run, several prompts packed into one
  sequence with per-prompt causal attention (variable-length batching, as TEI
  does) and the positions the reference gives them; the rows at pad positions
  come from the pad table (:meth:`TruncatedTextEncoder.pad_rows`). Close to the
  reference (within rounding), not bit-exact. Left padding only.

Invariant both rely on: with left padding, a pad token attends to nothing (every
key before it is a pad, and pads are masked), so the row at pad position ``i``
is the same for every prompt and batch. The pad table is computed once per
loaded model, through the exact path, and that claim is checked at load
(:attr:`TruncatedTextEncoder.pad_rows_shared`). With right padding a pad token
attends to the prompt, its rows differ per prompt, and there is no table.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from common import dtypes as dtype_table
from common.encoder_spec import FLUX2_DEV, FLUX2_KLEIN, EncoderSpec, spec_for_pipeline
from common.errors import InvalidRequest
from common.fingerprint import fingerprint
from common.model_source import WEIGHTS_INDEX, ModelSource
from common.pad_table import same_bits

log = logging.getLogger(__name__)

# Compute dtypes by command-line name, from the one dtype table.
DTYPES = {row.name: row.torch for row in dtype_table.DTYPES}
QUANTIZATIONS = ("none", "fp8", "nf4")
COMPUTE_MODES = ("exact", "packed")
# Appended to a packed backend's fingerprint (see use_packed_compute).
PACKED_FINGERPRINT_SUFFIX = "+packed"

_LAYER = re.compile(r"layers\.(\d+)\.")
# Read by nothing: the server replaces the final norm with the identity, and
# ``TextEncoderRecipe.key_mapping`` renames it out of the backbone's reach.
_UNUSED_BACKBONE_WEIGHTS = frozenset({"norm.weight"})


class ConfigError(Exception):
    """The model or the settings cannot work together (caught by the CLI, exit code 2)."""


# -- recipes: what differs between text-encoder families ----------------------


@functools.cache
def _flux2_format_input():
    """diffusers' own prompt formatting for [dev] (``format_input``); the first import takes over a second."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    return format_input


@dataclass(frozen=True)
class TextEncoderRecipe:
    """How one text-encoder family is loaded and turned into its :class:`EncoderSpec`'s embeddings.

    Attributes:
        spec: what the embeddings are (layers, length, fingerprint name).
        label: the family in messages, e.g. ``"Mistral-3"``.
        checkpoint_class: the transformers class the reference pipeline loads
            (``text_encoder/config.json``'s ``architectures``).
        backbone_class: the bare transformers decoder stack the server loads instead.
        backbone_prefixes: regexes for the checkpoint-key prefixes in front of the
            backbone's own names; they are stripped on load, every other key
            (``lm_head``, vision tower, the final norm) stays unexpected and unread.
        upsampling: the family's pipeline has prompt upsampling (``Flux2Pipeline.upsample_prompt``;
            [klein]'s pipelines have none), so ``--upsampling`` loads ``checkpoint_class`` whole.
    """

    spec: EncoderSpec
    label: str
    checkpoint_class: str
    backbone_class: str
    backbone_prefixes: tuple[str, ...]
    upsampling: bool = False

    def generator_backbone(self, model):
        """The decoder stack inside a loaded ``checkpoint_class`` model (for families with upsampling)."""
        raise NotImplementedError

    @property
    def key_mapping(self) -> dict[str, str]:
        """transformers' ``from_pretrained(key_mapping=...)``: checkpoint prefix -> backbone name.

        The renamings apply in order. The final norm is renamed first to a name the
        backbone lacks: transformers strips a leading ``model.`` on its own, so a
        Qwen3 checkpoint's ``model.norm.weight`` would otherwise be read.
        """
        mapping = {rf"{p}norm\.": "unread_final_norm." for p in self.backbone_prefixes}
        mapping.update({p: "" for p in self.backbone_prefixes})
        return mapping

    def decoder_config(self, config):
        """The config of the decoder stack inside the checkpoint's ``config`` (ConfigError when absent)."""
        raise NotImplementedError

    def tokenize(self, tokenizer, prompts: list[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """``input_ids`` and ``attention_mask``, ``[B, max_sequence_length]``, exactly as the reference
        builds them, and whether each prompt was cut to fit."""
        raise NotImplementedError

    def is_needed_weight(self, name: str) -> bool:
        """True for a checkpoint weight the truncated encoder reads: the token embeddings
        and decoder layers below ``spec.computed_layers`` (not the final norm, lm_head or vision tower)."""
        prefix = re.match("|".join(self.backbone_prefixes), name)
        if prefix is None:
            return False
        rest = name[prefix.end() :]
        layer = _LAYER.match(rest)
        return int(layer.group(1)) < self.spec.computed_layers if layer else rest not in _UNUSED_BACKBONE_WEIGHTS

    def needed_weight_files(self, te_dir: Path) -> list[Path]:
        """The checkpoint files of ``te_dir`` that hold a needed weight (all of them without an index)."""
        index = te_dir / WEIGHTS_INDEX
        if not index.is_file():
            return sorted(te_dir.glob("*.safetensors"))
        weight_map = json.loads(index.read_text())["weight_map"]
        return [te_dir / f for f in sorted({f for k, f in weight_map.items() if self.is_needed_weight(k)})]


@dataclass(frozen=True)
class Mistral3Recipe(TextEncoderRecipe):
    """[dev]: ``Flux2Pipeline._get_mistral_3_small_prompt_embeds``.

    ``format_input`` wraps each prompt with the system message (and strips
    literal ``[IMG]``), the chat template tokenizes and pads the whole batch.
    """

    def generator_backbone(self, model):
        return model.model.language_model

    def decoder_config(self, config):
        text_config = getattr(config, "text_config", None)
        if text_config is None or not hasattr(text_config, "num_hidden_layers"):
            raise ConfigError("it is not a Mistral-3 text encoder (no text_config in config.json)")
        return text_config

    def tokenize(self, tokenizer, prompts):
        messages = _flux2_format_input()(prompts=prompts, system_message=self.spec.system_message)
        inputs = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.spec.max_sequence_length,
        )
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
        truncated = [len(ids) > self.spec.max_sequence_length for ids in full["input_ids"]]
        return inputs, truncated


@dataclass(frozen=True)
class Qwen3Recipe(TextEncoderRecipe):
    """[klein]: ``Flux2KleinPipeline._get_qwen3_prompt_embeds``.

    Each prompt is one user turn, no system turn, rendered as text with
    ``add_generation_prompt=True, enable_thinking=False`` (so it ends with the
    assistant header and an empty think block), then tokenized as plain text:
    the tokenizer's own special-token handling and padding side apply, as in
    the reference.
    """

    def decoder_config(self, config):
        if getattr(config, "model_type", None) != "qwen3":
            raise ConfigError(f"it is not a Qwen3 text encoder (model_type {getattr(config, 'model_type', None)!r})")
        return config

    def tokenize(self, tokenizer, prompts):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for prompt in prompts
        ]
        # One call for the batch: every row is padded to max_length, so each row's
        # ids equal the reference's one-prompt-at-a-time call.
        inputs = tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.spec.max_sequence_length
        )
        truncated = [len(ids) > self.spec.max_sequence_length for ids in tokenizer(texts)["input_ids"]]
        return inputs, truncated


MISTRAL3 = Mistral3Recipe(
    spec=FLUX2_DEV,
    label="Mistral-3",
    checkpoint_class="Mistral3ForConditionalGeneration",
    backbone_class="MistralModel",
    # Mistral3ForConditionalGeneration checkpoints name the backbone's weights
    # ``language_model.model.*`` (as saved by transformers 4.x and 5.x) or
    # ``model.language_model.*`` (the in-memory layout of transformers >= 4.52).
    backbone_prefixes=(r"^language_model\.model\.", r"^model\.language_model\."),
    upsampling=True,
)

QWEN3 = Qwen3Recipe(
    spec=FLUX2_KLEIN,
    label="Qwen3",
    checkpoint_class="Qwen3ForCausalLM",
    backbone_class="Qwen3Model",
    # Qwen3ForCausalLM checkpoints hold ``model.*`` (the backbone) and, unless the
    # embeddings are tied (Qwen3-4B), ``lm_head.weight``.
    backbone_prefixes=(r"^model\.",),
)

RECIPES: tuple[TextEncoderRecipe, ...] = (MISTRAL3, QWEN3)
"""Every family the server can run; the text encoder's ``model_type`` picks one."""


def recipe_for_model_type(model_type: str | None) -> TextEncoderRecipe:
    """The recipe for a text encoder whose ``config.json`` says ``model_type`` (ConfigError when none)."""
    recipe = next((r for r in RECIPES if r.spec.text_encoder_type == model_type), None)
    if recipe is None:
        known = ", ".join(f"{r.spec.text_encoder_type} ({r.spec.family})" for r in RECIPES)
        raise ConfigError(f"has model_type {model_type!r}; this server knows {known}")
    return recipe


def recipe_for_folder(folder: Path) -> TextEncoderRecipe:
    """The recipe for the model in ``folder`` (``text_encoder/``, and ``model_index.json`` when present).

    ``text_encoder/config.json``'s ``model_type`` picks it (``"mistral3"`` -> [dev],
    ``"qwen3"`` -> [klein]); a pipeline class in ``model_index.json`` that belongs
    to another recipe is refused rather than guessed around.
    """
    config_path = folder / "text_encoder" / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} has no text_encoder/config.json")
    model_type = json.loads(config_path.read_text()).get("model_type")
    try:
        recipe = recipe_for_model_type(model_type)
    except ConfigError as exc:
        raise ConfigError(f"{config_path} {exc}") from None
    index = folder / "model_index.json"
    if index.is_file():
        pipeline = json.loads(index.read_text()).get("_class_name", "")
        expected = spec_for_pipeline(pipeline)
        if expected is not None and expected != recipe.spec:
            raise ConfigError(
                f"{folder}: model_index.json names {pipeline} ({expected.family} embeddings), but its text "
                f"encoder is a {model_type} model ({recipe.spec.family}); the folder is mixed up"
            )
    return recipe


# -- the shared machinery ------------------------------------------------------


@dataclass
class EncodedBatch:
    """Output of one forward pass.

    Attributes:
        embeddings: ``[B, max_sequence_length, embedding_dim]`` on the CPU, in the compute dtype.
        token_counts: non-pad tokens per prompt after truncation.
        truncated: whether each templated prompt was longer than ``max_sequence_length``.
        tokenization_ns: wall time spent tokenizing the batch.
        inference_ns: wall time of the forward pass and the copy to the CPU.
    """

    embeddings: torch.Tensor
    token_counts: list[int]
    truncated: list[bool]
    tokenization_ns: int
    inference_ns: int


@dataclass(frozen=True)
class PadTable:
    """The rows every prompt gets at its pad positions, computed once per loaded model.

    Attributes:
        rows: ``[P, embedding_dim]`` in the compute dtype, on the CPU: row ``i`` is the
            embedding row at position ``i`` of any prompt whose position ``i`` is a pad.
            ``P`` is the pad count of the prompt with the fewest tokens the server knows
            (the empty prompt, which still carries the chat template), so it covers every
            pad position of every prompt that is at least as long. None with right padding.
        shared: True when the check at load found the rows bit-identical for two different
            prompts at batch sizes 1 and 2 (always false without ``rows``).
        reason: why there are no rows, or why they were not found shared ("" otherwise).
    """

    rows: torch.Tensor | None
    shared: bool
    reason: str = ""


PACKED_ATTENTION = "flux2_packed_sdpa"
"""The transformers attention implementation a ``compute="packed"`` backbone runs with."""


@dataclass(frozen=True)
class PackedLayout:
    """Where each prompt's tokens sit in a packed row of ``T`` tokens (TEI's ``cu_seqlens``, as indices).

    Attributes:
        gather: ``[B, N]`` (``N``: the longest prompt): indices into the packed row that lay
            prompt ``b``'s tokens out at columns ``0 .. n_b - 1``; the columns after them
            repeat its first token (padding that no real token attends to).
        scatter: ``[T]``: for each packed token, its place in the flattened ``[B * N]`` layout.
    """

    gather: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def from_counts(cls, counts: list[int], device: torch.device) -> PackedLayout:
        """The layout of prompts of ``counts`` tokens, packed one after the other in that order."""
        lengths = torch.tensor(counts)  # [B]
        starts = torch.tensor(list(itertools.accumulate(counts, initial=0))[:-1])  # [B]
        columns = torch.arange(max(counts))  # [N]
        real = columns[None, :] < lengths[:, None]  # [B, N]
        gather = torch.where(real, starts[:, None] + columns[None, :], starts[:, None])
        # Row-major order of ``real`` is the packed order: prompt 0's tokens, then prompt 1's, ...
        scatter = (torch.arange(len(counts))[:, None] * len(columns) + columns[None, :])[real]
        return cls(gather.to(device), scatter.to(device))


def _packed_sdpa_attention(module, query, key, value, attention_mask, *, packed_layout=None, **kwargs):
    """transformers' SDPA attention, per prompt when the hidden states are packed.

    ``query`` is ``[1, heads, T, head_dim]`` (``key``/``value`` with the KV heads) and holds
    several prompts one after another, laid out by ``packed_layout``. For attention only,
    the prompts are put in rows of their own, padded on the right to the longest of them,
    and one causal SDPA call runs: a real token at column ``i`` attends to columns
    ``0 .. i`` of its own prompt, all real, and never to another prompt or to the padding
    (whose outputs are dropped). So no mask is needed, and attention costs
    ``B * max(n_b) ** 2`` instead of the reference's ``B * 512 ** 2``, or the
    ``(sum n_b) ** 2`` of one block-diagonal mask over the packed row. Without
    ``packed_layout`` (a padded batch, as in the exact path) this is exactly
    ``sdpa_attention_forward``, mask included.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError("packed attention expects one packed row and no mask")

    def per_prompt(x: torch.Tensor) -> torch.Tensor:  # [1, heads, T, d] -> [B, heads, N, d]
        return x[0][:, packed_layout.gather].transpose(0, 1)

    out, _ = sdpa_attention_forward(module, per_prompt(query), per_prompt(key), per_prompt(value), None, **kwargs)
    out = out.reshape(-1, *out.shape[2:])[packed_layout.scatter]  # [B, N, heads, d] -> [T, heads, d]
    return out.unsqueeze(0), None


@functools.cache
def _register_packed_attention() -> None:
    """Make :data:`PACKED_ATTENTION` a transformers attention implementation (once per process).

    Its mask function is SDPA's own, so a padded batch through it (the exact fallback)
    gets the same 4D mask as under ``"sdpa"``; a packed call passes an all-ones 2D mask,
    for which SDPA's mask function builds nothing (``is_causal`` instead).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def shared_backbone(backbone, config):
    """A decoder stack of ``type(backbone)`` built on ``backbone``'s own modules, cut to
    ``config.num_hidden_layers`` layers: the token embeddings, those layers and the rotary
    embedding are the very same objects (no weight is copied); the final norm is left out.

    Built on the meta device first, so the layers it replaces never take memory.
    """
    config._attn_implementation = backbone.config._attn_implementation
    with torch.device("meta"):
        view = type(backbone)(config)
    view.embed_tokens = backbone.embed_tokens
    view.layers = torch.nn.ModuleList(backbone.layers[: config.num_hidden_layers])
    view.rotary_emb = backbone.rotary_emb
    view.norm = torch.nn.Identity()
    left = [name for name, t in itertools.chain(view.named_parameters(), view.named_buffers()) if t.is_meta]
    if left:  # a transformers version with more parts than these: never run on empty tensors
        raise ConfigError(f"cannot share the {type(backbone).__name__} weights: {left[:3]} have no storage")
    return view


class EmbeddingBackend(Protocol):
    """What the engine and the server need from a model; tests swap in fakes.

    Attributes:
        spec: the embedding recipe (layers, length, family name as ``spec.family``).
        fingerprint: ``"<family>:<16 hex>"`` for these weights, tokenizer, recipe, dtype and quantization.
        hidden_size: width of one hidden state; embeddings are ``spec.embedding_dim(hidden_size)`` wide.
        num_hidden_layers: decoder layers in the checkpoint (of which ``spec.computed_layers`` run).
        dtype: compute dtype, also the embeddings' dtype.
        quantization: ``"none"``, ``"fp8"`` or ``"nf4"``.
        device: where the forward pass runs.
        padding_side: the tokenizer's, ``"left"`` or ``"right"``.
        compute: ``"exact"`` (bit-exact with the reference) or ``"packed"`` (real tokens
            only, within rounding of the reference).
    """

    spec: EncoderSpec
    fingerprint: str
    hidden_size: int
    num_hidden_layers: int
    dtype: torch.dtype
    quantization: str
    device: torch.device
    padding_side: str
    compute: str

    def encode(self, prompts: list[str]) -> EncodedBatch: ...

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Non-pad tokens of each prompt after truncation, as :meth:`encode` will run them.

        Called from another thread while :meth:`encode` runs (the engine budgets packed batches
        with it), so it must be safe to call concurrently with ``encode``.
        """
        ...

    def pad_rows(self) -> torch.Tensor | None:
        """``[P, embedding_dim]``: row ``i`` is every prompt's row at pad position ``i``; None with right padding."""
        ...

    @property
    def pad_rows_shared(self) -> bool:
        """True when the pad rows were found the same for every prompt and batch size (so they may be elided)."""
        ...


def resolve_device(device: str) -> torch.device:
    """:func:`common.devices.resolve_device`, with its refusal as a :class:`ConfigError` (exit code 2)."""
    from common.devices import DeviceUnavailable
    from common.devices import resolve_device as _resolve_device

    try:
        return _resolve_device(device)
    except DeviceUnavailable as exc:
        raise ConfigError(str(exc)) from None


def quantization_config(quantization: str, dtype: torch.dtype, device: torch.device):
    """The transformers quantization config for ``--quantization``, or None."""
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    if device.type != "cuda":
        raise ConfigError(f"--quantization {quantization} needs a CUDA GPU; on {device.type} use --quantization none")
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config()


def load_tokenizer(folder):
    """The tokenizer with its chat template, from ``folder`` (FLUX.2's ``tokenizer/``).

    FLUX.2-dev ships a PixtralProcessor there; its tokenizer with the same chat
    template gives the same ids for text-only input (tested against the
    processor's own ``apply_chat_template``), without needing torchvision.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if not getattr(tok, "chat_template", None):
        for name in ("chat_template.jinja", "chat_template.json"):
            p = folder / name
            if p.is_file():
                text = p.read_text()
                tok.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise ConfigError(
                f"{folder} has no chat template; FLUX.2 embeddings are made from the chat-templated prompt"
            )
    return tok


class TruncatedTextEncoder:
    """A FLUX.2 text encoder, running only the layers the embeddings need.

    Args:
        source: resolved model folder with ``text_encoder/`` and ``tokenizer/``.
        device: ``torch.device`` to compute on.
        dtype: compute dtype (``torch.bfloat16`` for the published weights).
        quantization: ``"none"``, ``"fp8"`` or ``"nf4"`` (the latter two need CUDA).
        recipe: the family's recipe; by default the folder's (:func:`recipe_for_folder`).
        compute: ``"exact"`` (default): each prompt padded to ``max_sequence_length`` and run
            as the reference runs it, bit-exact. ``"packed"``: only the real tokens run
            (see :meth:`encode`); **not bit-exact**, within rounding of the reference; needs
            a tokenizer that pads on the left (ConfigError otherwise).
        upsampling: load the checkpoint's whole model (all layers, ``lm_head``, vision tower) as
            :attr:`generator`, for prompt upsampling (encoder_server/upsampling.py); the embedding
            path then runs on its first layers, the same weights (one copy), bit-exact as without.
            A family without upsampling ([klein]) loads as usual and says why in :attr:`upsampling_note`.

    The pad table (:meth:`pad_rows`) is computed at load, in both modes, through the exact path.
    """

    compute: str = "exact"  # also for subclasses that skip __init__ (benchmarks/gpu_encoder.py)
    fingerprint: str = ""  # likewise: set by __init__ from the files read
    # With upsampling=True: the whole checkpoint model, whose first layers the embedding path runs.
    generator = None
    upsampling_note: str = ""  # why there is no generator, when upsampling was asked for
    tokenizer_dir: Path | None = None
    _pad_table: PadTable | None = None

    def __init__(
        self,
        source: ModelSource,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.bfloat16,
        quantization: str = "none",
        recipe: TextEncoderRecipe | None = None,
        compute: str = "exact",
        upsampling: bool = False,
    ):
        import transformers
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        if compute not in COMPUTE_MODES:
            raise ConfigError(f"unknown compute mode {compute!r}; choose from {', '.join(COMPUTE_MODES)}")
        self.recipe = recipe if recipe is not None else recipe_for_folder(source.folder)
        spec = self.spec = self.recipe.spec
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        te_dir, tok_dir = source.component("text_encoder"), source.component("tokenizer")

        self.tokenizer = load_tokenizer(tok_dir)
        self.tokenizer_dir = tok_dir
        self.padding_side = self.tokenizer.padding_side

        # 1. The decoder's config, cut after the deepest requested hidden state:
        #    layers past it are never built, so their weights are never read.
        try:
            config = self.recipe.decoder_config(AutoConfig.from_pretrained(te_dir))
        except ConfigError as exc:
            raise ConfigError(f"{te_dir}: {exc}") from None
        self.num_hidden_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        if spec.computed_layers > self.num_hidden_layers:
            raise ConfigError(
                f"the recipe needs hidden state {spec.computed_layers}, but the model has {self.num_hidden_layers} layers"
            )
        config.num_hidden_layers = spec.computed_layers
        if getattr(config, "layer_types", None) is not None:
            # Per-layer attention kinds (Qwen3): keep the entries of the layers that stay.
            config.layer_types = list(config.layer_types[: spec.computed_layers])

        # 2. The bare backbone: lm_head (and any vision tower) is never materialised.
        qconfig = quantization_config(quantization, dtype, device)
        t0 = time.perf_counter()
        # transformers reports every skipped weight; skipping them is the point.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        if upsampling and not self.recipe.upsampling:
            upsampling = False
            self.upsampling_note = (
                f"{spec.family} ({self.recipe.label}) has no prompt upsampling in diffusers; use a FLUX.2-dev model"
            )
            log.warning("--upsampling: %s", self.upsampling_note)
        if upsampling and compute != "exact":
            raise ConfigError("--upsampling runs with --compute exact only (generation shares the attention setup)")
        try:
            if upsampling:
                lm, info = self._load_generator(te_dir, config, dtype, qconfig, device)
            else:
                lm, info = getattr(transformers, self.recipe.backbone_class).from_pretrained(
                    te_dir,
                    config=config,
                    dtype=dtype,
                    quantization_config=qconfig,
                    key_mapping=self.recipe.key_mapping,
                    # Straight onto the GPU: no detour through host RAM.
                    device_map={"": device} if device.type == "cuda" else None,
                    output_loading_info=True,
                )
        finally:
            hf_logging.set_verbosity(previous)
        missing = set(info["missing_keys"]) - _UNUSED_BACKBONE_WEIGHTS
        if missing or info["mismatched_keys"]:
            # Never serve a half-random model: a checkpoint in another key layout
            # would otherwise load as freshly initialised weights.
            raise ConfigError(
                f"{te_dir} does not hold the {self.recipe.label} language model weights this server expects "
                f"(missing {sorted(missing)[:5]}, mismatched {list(info['mismatched_keys'])[:5]})"
            )
        if lm.device != device and qconfig is None:
            lm.to(device)
        # transformers overwrites hidden_states[-1] with the final-normed output;
        # after truncation hidden_states[-1] is a state we return, so the norm must go.
        lm.norm = torch.nn.Identity()
        self._lm = lm.eval().requires_grad_(False)
        log.info(
            "loaded %s (%s): %d of %d layers in %.1fs",
            te_dir,
            spec.family,
            spec.computed_layers,
            self.num_hidden_layers,
            time.perf_counter() - t0,
        )
        dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
        self.fingerprint = fingerprint(
            te_dir, tok_dir, spec, dtype_name, quantization, weight_files=self.recipe.needed_weight_files(te_dir)
        )
        # 3. The pad table, through the exact path, before any switch to packed attention.
        self._pad_table = self._compute_pad_table()
        self._count_lock = threading.Lock()
        if compute == "packed":
            self.use_packed_compute()

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim(self.hidden_size)

    def _load_generator(self, te_dir: Path, config, dtype, qconfig, device):
        """Load the checkpoint's whole model as :attr:`generator`; return ``(backbone, loading info)``, the
        backbone being a view of its first ``config.num_hidden_layers`` layers (the same modules, no copy)."""
        import transformers

        generator, info = getattr(transformers, self.recipe.checkpoint_class).from_pretrained(
            te_dir,
            dtype=dtype,
            quantization_config=qconfig,
            device_map={"": device} if device.type == "cuda" else None,
            output_loading_info=True,
        )
        if generator.device != device and qconfig is None:
            generator.to(device)
        self.generator = generator.eval().requires_grad_(False)
        return shared_backbone(self.recipe.generator_backbone(generator), config), info

    def warm_up(self) -> float:
        """One forward pass of the empty prompt, so the first client does not pay for lazy
        initialisation (imports, CUDA kernels and allocator, oneDNN); returns its seconds."""
        t0 = time.perf_counter()
        self.encode([""])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self._lm.parameters())

    def tokenize(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Token ids exactly as the reference builds them, plus a truncation flag per prompt."""
        return self.recipe.tokenize(self.tokenizer, prompts)

    # A fast tokenizer's padding and truncation settings live on the object, so one object must
    # never tokenize on two threads at once: count_tokens has its own copy, behind this lock.
    # One lock per loaded model (set in __init__; this one is for subclasses that skip it),
    # so counting for one model never waits on another's.
    _count_lock = threading.Lock()
    _count_tokenizer = None

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Non-pad tokens of each prompt after truncation (what :meth:`encode` reports as
        ``token_counts``). Safe to call from any thread while :meth:`encode` runs."""
        with self._count_lock:
            if self._count_tokenizer is None:
                self._count_tokenizer = copy.deepcopy(self.tokenizer)
            inputs, _ = self.recipe.tokenize(self._count_tokenizer, prompts)
        return inputs["attention_mask"].sum(dim=1).tolist()

    # -- the pad table ----------------------------------------------------------

    # A second prompt for the load-time check that pad rows do not depend on the prompt.
    _PAD_PROBE = "a red fox sitting in fresh snow, golden hour"

    def pad_rows(self) -> torch.Tensor | None:
        """The pad table: ``[P, embedding_dim]`` in ``self.dtype`` on the CPU, or None with right padding.

        With left padding, row ``i`` is the embedding row at position ``i`` of every prompt
        whose position ``i`` is a pad (any prompt of ``n`` tokens has pads at
        ``0 .. max_sequence_length - n - 1``). ``P`` is the pad count of the empty prompt,
        the prompt with the fewest tokens (it still carries the chat template). Computed
        once, through the exact path (for the packed mode: before it switched attention),
        so it holds exactly what the reference puts there for that prompt at batch size 1;
        :attr:`pad_rows_shared` says whether another prompt at batch size 2 got the same
        bits. With right padding a pad token attends to the prompt, the rows differ per
        prompt, and there is no table. Returns a copy: the packed path reads the original.
        """
        rows = self._pad_rows()
        return None if rows is None else rows.clone()

    def _pad_rows(self) -> torch.Tensor | None:
        return self._table().rows

    def _table(self) -> PadTable:
        if self._pad_table is None:  # a subclass that skipped __init__
            self._pad_table = self._compute_pad_table()
        return self._pad_table

    @property
    def pad_rows_shared(self) -> bool:
        """True when the load-time check found the pad rows bit-identical across prompts and batch sizes."""
        return self._table().shared

    def _compute_pad_table(self) -> PadTable:
        """The empty prompt's pad rows (batch 1), checked against the empty prompt and
        :attr:`_PAD_PROBE` together (batch 2): three exact forward passes' worth of rows."""
        if self.padding_side != "left":
            return PadTable(
                None,
                False,
                f"the tokenizer pads on the {self.padding_side}, so pad tokens attend to the "
                "prompt and their rows differ per prompt",
            )
        length = self.spec.max_sequence_length
        alone = self._encode_exact([""])
        pads = length - alone.token_counts[0]
        rows = alone.embeddings[0, :pads].clone()  # [P, D]
        pair = self._encode_exact(["", self._PAD_PROBE])
        probe_pads = length - pair.token_counts[1]
        shared = same_bits(pair.embeddings[0, :pads], rows) and same_bits(
            pair.embeddings[1, :probe_pads], rows[:probe_pads]
        )
        reason = "" if shared else "pad rows differed between two prompts or batch sizes 1 and 2"
        if not shared:
            log.warning("%s: %s; they cannot be elided losslessly", self.spec.family, reason)
        return PadTable(rows, shared, reason)

    # -- packed compute ---------------------------------------------------------

    def use_packed_compute(self) -> None:
        """Switch to ``compute="packed"`` (what the constructor does for it), for encoders built in memory.

        The pad table is computed first, through the exact path, if it was not yet.
        ConfigError where packing cannot reproduce the reference's layout (right padding,
        attention other than SDPA, a sliding window shorter than the prompt).
        """
        self._pad_rows()
        self._use_packed_attention()
        if self.compute != "packed":
            # Packed embeddings are not the exact ones: a fingerprint of their own keeps them
            # out of exact caches, stores and clients that expect the exact function.
            self.fingerprint = f"{self.fingerprint}{PACKED_FINGERPRINT_SUFFIX}"
        self.compute = "packed"

    def _use_packed_attention(self) -> None:
        """Switch the backbone to :data:`PACKED_ATTENTION` (ConfigError where packing cannot match the reference)."""
        table = self._table()
        if table.rows is None:
            raise ConfigError(f"--compute packed needs left padding: {table.reason}; use --compute exact")
        config = self._lm.config
        if config._attn_implementation != "sdpa":
            raise ConfigError(
                f"--compute packed runs on SDPA attention; this backbone loaded {config._attn_implementation!r}"
            )
        window = getattr(config, "sliding_window", None)
        if window is not None and window < self.spec.max_sequence_length:
            raise ConfigError(f"--compute packed does not implement sliding-window attention (window {window})")
        _register_packed_attention()
        self._lm.set_attn_implementation(PACKED_ATTENTION)

    # -- encoding ---------------------------------------------------------------

    def encode(self, prompts: list[str]) -> EncodedBatch:
        """Embeddings for ``prompts``: ``[B, 512, 3 * hidden]`` on the CPU, in ``self.dtype``.

        ``compute="exact"``: bit-exact with the reference. ``compute="packed"``: only the real
        tokens run, the pad rows come from :meth:`pad_rows`; the same shape and fields, but
        the real rows are within rounding of the reference, **not bit-exact** (see
        :meth:`_encode_packed`).
        """
        if not prompts:
            raise InvalidRequest("no prompts given")
        if self.compute == "packed":
            return self._encode_packed(prompts)
        return self._encode_exact(prompts)

    @torch.inference_mode()
    def _encode_packed(self, prompts: list[str]) -> EncodedBatch:
        """Only the real tokens of ``prompts`` through the model, in one packed sequence.

        Variable-length batching as TEI does it: the prompts' real tokens (the reference's
        own token ids) are concatenated into one ``[1, T]`` sequence; each token keeps the
        position id the padded reference gives it (its column in the 512-token row, i.e.
        offset by the prompt's pad count), so RoPE sees the same angles; attention is
        causal within each prompt and never across prompts (:func:`_packed_sdpa_attention`;
        it costs ``B * max(n_b) ** 2``, so a batch of very unequal prompts pays for its longest).
        The pad positions get the pad table's rows.

        Not bit-exact: the reference's attention reduces over 512 keys of which the pads are
        masked out, this one over the real keys only, and every matmul runs on another
        shape, so the floating-point rounding differs (measured in tests/encoder_server/test_packed.py
        and docs/benchmarks.md). A prompt with more pads than the table holds (a tokenizer
        where some prompt is shorter than the empty one) sends the batch down the exact path.
        """
        t0 = time.perf_counter_ns()
        inputs, truncated = self.tokenize(prompts)
        mask = inputs["attention_mask"].bool()  # [B, L]
        batch, length = mask.shape
        table = self._pad_rows()  # [P, D]; packed runs only where there is one (_use_packed_attention)
        counts = mask.sum(dim=1)  # [B]
        positions = torch.arange(length).expand(batch, length)  # [B, L]
        left_padded = torch.equal(mask, positions >= (length - counts)[:, None])
        if table is None or not left_padded or int((length - counts).max()) > table.shape[0]:
            log.warning("packed compute: a prompt has pads the table does not cover; this batch runs exact")
            return self._encode_exact(prompts)
        # 1. One packed row of real tokens, each at the position the padded reference gives it.
        input_ids = inputs["input_ids"][mask].unsqueeze(0).to(self.device)  # [1, T]
        position_ids = positions[mask].unsqueeze(0).to(self.device)  # [1, T]
        layout = PackedLayout.from_counts(counts.tolist(), self.device)
        t1 = time.perf_counter_ns()
        out = self._lm(
            input_ids=input_ids,
            # All ones: SDPA's mask function then builds no [T, T] mask (each prompt is causal on its own).
            attention_mask=torch.ones_like(input_ids),
            position_ids=position_ids,
            output_hidden_states=list(self.spec.hidden_states_layers),
            use_cache=False,
            packed_layout=layout,
        )
        rows = torch.cat([out.hidden_states[k][0] for k in self.spec.hidden_states_layers], dim=-1)  # [T, 3 * H]
        rows = rows.to(dtype=self.dtype).to("cpu")
        # 2. Back to the padded layout: real rows where the mask is set, the pad table elsewhere.
        embeddings = torch.empty(batch, length, rows.shape[-1], dtype=self.dtype)  # [B, L, 3 * H]
        embeddings[mask] = rows
        embeddings[~mask] = table[positions[~mask]]
        t2 = time.perf_counter_ns()
        return EncodedBatch(
            embeddings=embeddings,
            token_counts=counts.tolist(),
            truncated=truncated,
            tokenization_ns=t1 - t0,
            inference_ns=t2 - t1,
        )

    @torch.inference_mode()
    def _encode_exact(self, prompts: list[str]) -> EncodedBatch:
        """Every prompt padded to 512 tokens and run as the reference runs it: bit-exact."""
        t0 = time.perf_counter_ns()
        inputs, truncated = self.tokenize(prompts)
        input_ids = inputs["input_ids"].to(self.device)  # [B, 512]
        attention_mask = inputs["attention_mask"].to(self.device)  # [B, 512]
        t1 = time.perf_counter_ns()
        out = self._lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            # Keep only the requested states, not all of them (transformers >= 5.2x accepts indices).
            output_hidden_states=list(self.spec.hidden_states_layers),
            use_cache=False,
        )
        stacked = torch.stack([out.hidden_states[k] for k in self.spec.hidden_states_layers], dim=1)  # [B, 3, 512, H]
        stacked = stacked.to(dtype=self.dtype)
        b, n, seq, hidden = stacked.shape
        embeddings = stacked.permute(0, 2, 1, 3).reshape(b, seq, n * hidden).to("cpu")  # [B, 512, 3 * H]
        t2 = time.perf_counter_ns()
        return EncodedBatch(
            embeddings=embeddings,
            token_counts=attention_mask.sum(dim=1).tolist(),
            truncated=truncated,
            tokenization_ns=t1 - t0,
            inference_ns=t2 - t1,
        )


class TruncatedMistral3Encoder(TruncatedTextEncoder):
    """FLUX.2-dev's text encoder (the [dev] recipe whatever the folder says; kept for existing callers).

    ``spec`` replaces the recipe's :class:`EncoderSpec` (other layers, another length).
    """

    recipe = MISTRAL3  # also for subclasses that skip __init__ (benchmarks/gpu_encoder.py)

    def __init__(
        self,
        source: ModelSource,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.bfloat16,
        quantization: str = "none",
        spec: EncoderSpec = FLUX2_DEV,
        compute: str = "exact",
        upsampling: bool = False,
    ):
        super().__init__(
            source,
            device=device,
            dtype=dtype,
            quantization=quantization,
            recipe=replace(MISTRAL3, spec=spec),
            compute=compute,
            upsampling=upsampling,
        )


def keep_weight_for(folder: Path):
    """``keep_weight(component, name)`` for a hub download whose configs are in ``folder``:
    every tokenizer file, and of the text encoder only what its recipe reads."""
    recipe = recipe_for_folder(folder)

    def keep_weight(component: str, name: str) -> bool:
        return component != "text_encoder" or recipe.is_needed_weight(name)

    return keep_weight


def load_backend(config) -> tuple[TruncatedTextEncoder, ModelSource]:
    """Resolve ``config.model`` and load the truncated encoder it names (a ServerConfig).

    The family ([dev] Mistral-3, [klein] Qwen3) is read from the model's own
    ``text_encoder/config.json``; see :func:`recipe_for_folder`.
    """
    from common.model_source import resolve_model

    if config.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {config.dtype!r}; choose from {', '.join(DTYPES)}")
    device = resolve_device(config.device)
    # Like compute: a config from before the field (a plain namespace in tests) means off.
    upsampling = getattr(getattr(config, "upsampling", None), "enabled", False)
    # A hub download skips the shards that hold only weights the server never reads
    # (upsampling reads them all).
    source = resolve_model(
        config.model,
        components=("text_encoder", "tokenizer"),
        revision=config.revision,
        keep_weight_for=None if upsampling else keep_weight_for,
    )
    backend = TruncatedTextEncoder(
        source,
        device=device,
        dtype=DTYPES[config.dtype],
        quantization=config.quantization,
        compute=getattr(config, "compute", "exact"),
        upsampling=upsampling,
    )
    # Before health says SERVING: a model that cannot run a forward pass fails here, at start.
    log.info("warm-up forward pass: %.2fs", backend.warm_up())
    return backend, source
