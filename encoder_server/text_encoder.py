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
"""

from __future__ import annotations

import functools
import json
import logging
import re
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

log = logging.getLogger(__name__)

# Compute dtypes by command-line name, from the one dtype table.
DTYPES = {row.name: row.torch for row in dtype_table.DTYPES}
QUANTIZATIONS = ("none", "fp8", "nf4")

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
    """

    spec: EncoderSpec
    label: str
    checkpoint_class: str
    backbone_class: str
    backbone_prefixes: tuple[str, ...]

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
        rest = name[prefix.end():]
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
    """

    spec: EncoderSpec
    fingerprint: str
    hidden_size: int
    num_hidden_layers: int
    dtype: torch.dtype
    quantization: str
    device: torch.device
    padding_side: str

    def encode(self, prompts: list[str]) -> EncodedBatch: ...


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
            raise ConfigError(f"{folder} has no chat template; FLUX.2 embeddings are made from the chat-templated prompt")
    return tok


class TruncatedTextEncoder:
    """A FLUX.2 text encoder, running only the layers the embeddings need.

    Args:
        source: resolved model folder with ``text_encoder/`` and ``tokenizer/``.
        device: ``torch.device`` to compute on.
        dtype: compute dtype (``torch.bfloat16`` for the published weights).
        quantization: ``"none"``, ``"fp8"`` or ``"nf4"`` (the latter two need CUDA).
        recipe: the family's recipe; by default the folder's (:func:`recipe_for_folder`).
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.bfloat16,
        quantization: str = "none",
        recipe: TextEncoderRecipe | None = None,
    ):
        import transformers
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        self.recipe = recipe if recipe is not None else recipe_for_folder(source.folder)
        spec = self.spec = self.recipe.spec
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        te_dir, tok_dir = source.component("text_encoder"), source.component("tokenizer")

        self.tokenizer = load_tokenizer(tok_dir)
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
        try:
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
            "loaded %s (%s): %d of %d layers in %.1fs", te_dir, spec.family, spec.computed_layers,
            self.num_hidden_layers, time.perf_counter() - t0,
        )
        dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
        self.fingerprint = fingerprint(
            te_dir, tok_dir, spec, dtype_name, quantization, weight_files=self.recipe.needed_weight_files(te_dir)
        )

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim(self.hidden_size)

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

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> EncodedBatch:
        """Embeddings for ``prompts``: ``[B, 512, 3 * hidden]`` on the CPU, in ``self.dtype``."""
        if not prompts:
            raise InvalidRequest("no prompts given")
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
    ):
        super().__init__(source, device=device, dtype=dtype, quantization=quantization,
                         recipe=replace(MISTRAL3, spec=spec))


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
    # A hub download skips the shards that hold only weights the server never reads.
    source = resolve_model(
        config.model, components=("text_encoder", "tokenizer"), revision=config.revision, keep_weight_for=keep_weight_for
    )
    backend = TruncatedTextEncoder(
        source, device=device, dtype=DTYPES[config.dtype], quantization=config.quantization
    )
    # Before health says SERVING: a model that cannot run a forward pass fails here, at start.
    log.info("warm-up forward pass: %.2fs", backend.warm_up())
    return backend, source
