"""The model behind the service: FLUX.2's Mistral-3 text encoder, truncated.

Computes exactly what ``Flux2Pipeline._get_mistral_3_small_prompt_embeds``
computes, bit for bit, but runs only the embedding layer and the decoder
layers up to the deepest requested hidden state (30 of 40 for FLUX.2-dev).
Only the language model's backbone is loaded, cut after that layer: the
deeper layers, the vision tower, the projector and ``lm_head`` are never
read from disk.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from common.encoder_spec import FLUX2_DEV, EncoderSpec
from common.errors import InvalidRequest
from common.fingerprint import fingerprint
from common.model_source import WEIGHTS_INDEX, ModelSource

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZATIONS = ("none", "fp8", "nf4")

# Mistral3ForConditionalGeneration checkpoints name the backbone's weights
# ``language_model.model.*`` (as saved by transformers 4.x and 5.x) or
# ``model.language_model.*`` (the in-memory layout of transformers >= 4.52);
# both map onto a bare MistralModel. Every other weight stays unexpected and unread.
BACKBONE_KEY_MAPPING = {r"^language_model\.model\.": "", r"^model\.language_model\.": ""}
_BACKBONE_PREFIX = re.compile("|".join(BACKBONE_KEY_MAPPING))
_LAYER = re.compile(r"layers\.(\d+)\.")
# Loaded by nothing: the server replaces the final norm with the identity.
_UNUSED_BACKBONE_WEIGHTS = frozenset({"norm.weight"})


def is_needed_weight(name: str, computed_layers: int) -> bool:
    """True for a checkpoint weight the truncated encoder reads: the token embeddings
    and decoder layers below ``computed_layers`` (not the final norm, lm_head or vision tower)."""
    prefix = _BACKBONE_PREFIX.match(name)
    if prefix is None:
        return False
    rest = name[prefix.end():]
    layer = _LAYER.match(rest)
    return int(layer.group(1)) < computed_layers if layer else rest not in _UNUSED_BACKBONE_WEIGHTS


def needed_weight_files(te_dir: Path, computed_layers: int) -> list[Path]:
    """The checkpoint files of ``te_dir`` that hold a needed weight (all of them without an index)."""
    index = te_dir / WEIGHTS_INDEX
    if not index.is_file():
        return sorted(te_dir.glob("*.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    return [te_dir / f for f in sorted({f for k, f in weight_map.items() if is_needed_weight(k, computed_layers)})]


class ConfigError(Exception):
    """The model or the settings cannot work together (caught by the CLI, exit code 2)."""


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
    """What the engine needs from a model; tests swap in fakes."""

    spec: EncoderSpec
    fingerprint: str
    hidden_size: int
    dtype: torch.dtype

    def encode(self, prompts: list[str]) -> EncodedBatch: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


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
        import json

        for name in ("chat_template.jinja", "chat_template.json"):
            p = folder / name
            if p.is_file():
                text = p.read_text()
                tok.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise ConfigError(f"{folder} has no chat template; FLUX.2 embeddings need the Mistral chat template")
    return tok


class TruncatedMistral3Encoder:
    """FLUX.2-dev's text encoder, running only the layers the embeddings need.

    Args:
        source: resolved model folder with ``text_encoder/`` and ``tokenizer/``.
        device: ``torch.device`` to compute on.
        dtype: compute dtype (``torch.bfloat16`` for the published weights).
        quantization: ``"none"``, ``"fp8"`` or ``"nf4"`` (the latter two need CUDA).
        spec: the embedding recipe; FLUX.2-dev's by default.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.bfloat16,
        quantization: str = "none",
        spec: EncoderSpec = FLUX2_DEV,
    ):
        from transformers import AutoConfig, MistralModel
        from transformers.utils import logging as hf_logging

        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        te_dir, tok_dir = source.component("text_encoder"), source.component("tokenizer")

        self.tokenizer = load_tokenizer(tok_dir)
        self.padding_side = self.tokenizer.padding_side
        self._format_input  # import it now: the first import takes over a second

        config = AutoConfig.from_pretrained(te_dir)
        text_config = getattr(config, "text_config", None)
        if text_config is None or not hasattr(text_config, "num_hidden_layers"):
            raise ConfigError(f"{te_dir} is not a Mistral-3 text encoder (no text_config in config.json)")
        self.num_hidden_layers = text_config.num_hidden_layers
        self.hidden_size = text_config.hidden_size
        if spec.computed_layers > self.num_hidden_layers:
            raise ConfigError(
                f"the recipe needs hidden state {spec.computed_layers}, but the model has {self.num_hidden_layers} layers"
            )
        # Layers past the deepest requested hidden state are never loaded.
        text_config.num_hidden_layers = spec.computed_layers

        qconfig = quantization_config(quantization, dtype, device)
        t0 = time.perf_counter()
        # transformers reports every skipped weight; skipping them is the point.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            # The backbone alone (Mistral3's language_model is this class), so the
            # vision tower, projector and lm_head are never materialised.
            lm, info = MistralModel.from_pretrained(
                te_dir,
                config=text_config,
                dtype=dtype,
                quantization_config=qconfig,
                key_mapping=BACKBONE_KEY_MAPPING,
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
                f"{te_dir} does not hold the Mistral-3 language model weights this server expects "
                f"(missing {sorted(missing)[:5]}, mismatched {list(info['mismatched_keys'])[:5]})"
            )
        if lm.device != device and qconfig is None:
            lm.to(device)
        # transformers overwrites hidden_states[-1] with the final-normed output;
        # after truncation hidden_states[-1] is a state we return, so the norm must go.
        lm.norm = torch.nn.Identity()
        self._lm = lm.eval().requires_grad_(False)
        log.info(
            "loaded %s: %d of %d layers in %.1fs", te_dir, spec.computed_layers, self.num_hidden_layers,
            time.perf_counter() - t0,
        )
        dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
        self.fingerprint = fingerprint(
            te_dir, tok_dir, spec, dtype_name, quantization,
            weight_files=needed_weight_files(te_dir, spec.computed_layers),
        )

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim(self.hidden_size)

    @functools.cached_property
    def _format_input(self):
        """The reference's own prompt formatting (diffusers' ``format_input``)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        return format_input

    def warm_up(self) -> float:
        """One forward pass of the empty prompt, so the first client does not pay for lazy
        initialisation (CUDA kernels and allocator, oneDNN); returns its seconds."""
        t0 = time.perf_counter()
        self.encode([""])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self._lm.parameters())

    def tokenize(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Token ids exactly as the reference builds them, plus a truncation flag per prompt."""
        messages = self._format_input(prompts=prompts, system_message=self.spec.system_message)
        inputs = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.spec.max_sequence_length,
        )
        full = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
        truncated = [len(ids) > self.spec.max_sequence_length for ids in full["input_ids"]]
        return inputs, truncated

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> EncodedBatch:
        """Embeddings for ``prompts``: ``[B, 512, 3 * hidden]`` on the CPU, in ``self.dtype``."""
        if not prompts:
            raise InvalidRequest("no prompts given")
        t0 = time.perf_counter_ns()
        inputs, truncated = self.tokenize(prompts)
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs["attention_mask"].to(self.device)
        t1 = time.perf_counter_ns()
        out = self._lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            # Keep only the requested states, not all 31 (transformers >= 5.2x accepts indices).
            output_hidden_states=list(self.spec.hidden_states_layers),
            use_cache=False,
        )
        stacked = torch.stack([out.hidden_states[k] for k in self.spec.hidden_states_layers], dim=1)
        stacked = stacked.to(dtype=self.dtype)
        b, n, seq, hidden = stacked.shape
        embeddings = stacked.permute(0, 2, 1, 3).reshape(b, seq, n * hidden).to("cpu")
        t2 = time.perf_counter_ns()
        return EncodedBatch(
            embeddings=embeddings,
            token_counts=attention_mask.sum(dim=1).tolist(),
            truncated=truncated,
            tokenization_ns=t1 - t0,
            inference_ns=t2 - t1,
        )


def load_backend(config) -> tuple[TruncatedMistral3Encoder, ModelSource]:
    """Resolve ``config.model`` and load the truncated encoder it names (a ServerConfig)."""
    from common.model_source import resolve_model

    if config.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {config.dtype!r}; choose from {', '.join(DTYPES)}")
    device = resolve_device(config.device)
    def keep_weight(component: str, name: str) -> bool:
        return component != "text_encoder" or is_needed_weight(name, FLUX2_DEV.computed_layers)

    # A hub download skips the shards that hold only weights the server never reads.
    source = resolve_model(
        config.model, components=("text_encoder", "tokenizer"), revision=config.revision, keep_weight=keep_weight
    )
    backend = TruncatedMistral3Encoder(
        source, device=device, dtype=DTYPES[config.dtype], quantization=config.quantization
    )
    # Before health says SERVING: a model that cannot run a forward pass fails here, at start.
    log.info("warm-up forward pass: %.2fs", backend.warm_up())
    return backend, source
