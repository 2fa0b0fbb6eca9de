"""Which pipeline a model folder is, and which of the encoder's models feeds its DiT.

Read from JSON configs only (``model_index.json`` and ``transformer/config.json``),
so a mismatch is refused before any weight is downloaded or loaded:

- :func:`read_pipeline_kind`: the pipeline class ``model_index.json`` names
  (``Flux2Pipeline`` for [dev], ``Flux2KleinPipeline`` or ``Flux2KleinKVPipeline``
  for [klein]), the embedding recipe it takes (:mod:`common.encoder_spec`), whether
  it is step-distilled, and the DiT's ``joint_attention_dim``.
- :func:`choose_encoder_model`: the server model whose family is the pipeline's and
  whose embedding width is ``joint_attention_dim``; a name given by the user is
  checked the same way.

Every refusal is an :class:`EncoderMismatch` (a :class:`ClientConfigError`: exit 2)
that says what the server serves.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.encoder_spec import EncoderSpec, spec_for_pipeline
from common.model_source import ModelSource
from dit_client.dit_config import ClientConfigError
from dit_client.frames import EncoderInfo, ModelInfo

# The pipelines `flux2-dit generate` runs (text to image, with reference images).
# Flux2KleinInpaintPipeline takes the same embeddings but needs a mask: not a generate.
GENERATE_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")
# model_index.json without a _class_name (folders written by hand): what this client always assumed.
DEFAULT_PIPELINE = "Flux2Pipeline"


class EncoderMismatch(ClientConfigError):
    """The encoder serves no model whose embeddings this DiT reads (CLI exit code 2)."""


@dataclass(frozen=True)
class PipelineKind:
    """What a model folder's configs say about the pipeline to run.

    Attributes:
        class_name: ``model_index.json``'s ``_class_name``.
        spec: the embedding recipe the pipeline takes (``spec.family``: ``flux2-dev`` or ``flux2-klein``).
        is_distilled: step-distilled ([klein] 4B, 9B): no classifier-free guidance. Base
            models (``FLUX.2-klein-base-*``) run CFG when ``guidance_scale > 1``.
        joint_attention_dim: the embedding width the DiT reads.
    """

    class_name: str
    spec: EncoderSpec
    is_distilled: bool
    joint_attention_dim: int

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.class_name)

    def call_parameters(self) -> Mapping[str, inspect.Parameter]:
        return inspect.signature(self.pipeline_class.__call__).parameters

    def takes_guidance(self) -> bool:
        return "guidance_scale" in self.call_parameters()

    def uses_cfg(self, guidance: float) -> bool:
        """Whether the pipeline runs classifier-free guidance at ``guidance``, and so needs a negative embedding.

        The rule of ``Flux2KleinPipeline.do_classifier_free_guidance``:
        ``guidance_scale > 1 and not is_distilled``, for pipelines that take ``negative_prompt_embeds``.
        """
        return "negative_prompt_embeds" in self.call_parameters() and guidance > 1 and not self.is_distilled

    def default_steps(self) -> int:
        """28 for [dev] (its model card); 4 for step-distilled [klein] (what it is distilled for);
        a [klein] base model: ``num_inference_steps``' default in the pipeline's ``__call__`` (50)."""
        if self.spec.family == "flux2-dev":
            return 28
        if self.is_distilled:
            return 4
        return int(self.call_parameters()["num_inference_steps"].default)

    def default_guidance(self) -> float:
        """``guidance_scale``'s default in the pipeline's ``__call__`` (4.0 for [dev] and [klein] base);
        1.0 for a distilled [klein], which ignores it (diffusers warns when it is above 1)."""
        if self.is_distilled and self.spec.family != "flux2-dev":
            return 1.0
        param = self.call_parameters().get("guidance_scale")
        return float(param.default) if param is not None else 1.0


def read_model_index(source: ModelSource) -> dict[str, Any]:
    """``model_index.json`` of ``source``; ``{}`` when the folder has none."""
    path = source.folder / "model_index.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClientConfigError(f"cannot read {path}: {exc}") from exc


def read_pipeline_kind(source: ModelSource, transformer_config: Mapping[str, Any]) -> PipelineKind:
    """The :class:`PipelineKind` of ``source`` from its configs alone; refuses pipelines generate cannot run."""
    index = read_model_index(source)
    class_name = index.get("_class_name") or DEFAULT_PIPELINE
    spec = spec_for_pipeline(class_name)
    if spec is None or class_name not in GENERATE_PIPELINES:
        raise ClientConfigError(
            f"{source.model_id} is a {class_name} (model_index.json); flux2-dit generate runs "
            f"{', '.join(GENERATE_PIPELINES)}"
        )
    import diffusers

    cls = getattr(diffusers, class_name)
    is_distilled = index.get("is_distilled")
    if is_distilled is None:  # model_index.json leaves out defaults: the class default
        param = inspect.signature(cls.__init__).parameters.get("is_distilled")
        is_distilled = bool(param.default) if param is not None else False
    jad = transformer_config.get("joint_attention_dim")
    if jad is None:  # config.json leaves out defaults: the class default is FLUX.2-dev's
        jad = inspect.signature(diffusers.Flux2Transformer2DModel.__init__).parameters["joint_attention_dim"].default
    return PipelineKind(class_name, spec, bool(is_distilled), int(jad))


def _describe(m: ModelInfo) -> str:
    return f"{m.name} ({m.family or 'family unknown'}, {m.embedding_dim} wide, {m.model_id or '?'})"


def choose_encoder_model(
    info: EncoderInfo, kind: PipelineKind, *, wanted: str | None, target: str, dit_model: str
) -> str:
    """The name of the server model whose embeddings the DiT of ``dit_model`` reads.

    Args:
        info: the server's ``GetInfo`` (its :attr:`EncoderInfo.models`).
        kind: the DiT's pipeline, from :func:`read_pipeline_kind`.
        wanted: a model name the user chose (``--encoder-model``); it must fit too.
        target, dit_model: for the messages.

    Returns:
        The model's name; ``""`` for a server that predates several models (its
        only model, checked by width alone: such a server reports no family).
    """
    need = f"{dit_model} is a {kind.class_name} ({kind.spec.family}, joint_attention_dim {kind.joint_attention_dim})"
    served = "; ".join(_describe(m) for m in info.models)
    hint = "Point --encoder at a server running the text encoder that belongs to this DiT"

    def fits(m: ModelInfo) -> bool:
        # A server reports each model's family; an empty one (a backend outside the recipes) is judged by width.
        return m.embedding_dim == kind.joint_attention_dim and (not m.family or m.family == kind.spec.family)

    if not info.models:  # a one-model server from before several models per server
        if wanted:
            raise EncoderMismatch(
                f"the encoder at {target} cannot select models by name (it serves only "
                f"{info.model_id}); drop --encoder-model"
            )
        if info.embedding_dim != kind.joint_attention_dim:
            raise EncoderMismatch(
                f"the encoder at {target} (model {info.model_id or '?'}, fingerprint {info.fingerprint}) makes "
                f"{info.embedding_dim}-wide embeddings, but {need}: they are different models. {hint}"
            )
        return ""
    if wanted:
        m = info.model(wanted)
        if m is None:
            raise EncoderMismatch(f"the encoder at {target} has no model named {wanted!r}; it serves: {served}")
        if not fits(m):
            why = (
                f"makes {m.embedding_dim}-wide embeddings"
                if m.embedding_dim != kind.joint_attention_dim
                else f"is a {m.family} encoder"
            )
            raise EncoderMismatch(f"encoder model {_describe(m)} {why}, but {need}. The server serves: {served}")
        return m.name
    candidates = [m for m in info.models if fits(m)]
    if not candidates:
        raise EncoderMismatch(
            f"the encoder at {target} serves no model for this DiT: {need}, and it serves: {served}. {hint}"
        )
    if len(candidates) == 1:
        return candidates[0].name
    same_id = [m for m in candidates if m.model_id == dit_model]
    if len(same_id) == 1:
        return same_id[0].name
    if len({m.fingerprint for m in candidates}) == 1:  # the same encoder under several names
        return candidates[0].name
    raise EncoderMismatch(
        f"several models on the encoder at {target} fit {dit_model}: "
        f"{', '.join(_describe(m) for m in candidates)}; choose one with --encoder-model NAME"
    )


def encoder_model_for(dit_model: str, encoder, *, revision: str | None = None, wanted: str | None = None) -> str:
    """The server model of ``encoder`` that feeds the DiT of ``dit_model`` (a hub id, folder, ``demo``...).

    Reads the model's configs only (a hub model downloads kilobytes), as
    :meth:`dit_client.generate.DiTClient.prepare` does; raises :class:`EncoderMismatch`.
    """
    from common.model_source import resolve_model
    from dit_client.dit_config import DIT_COMPONENTS
    from dit_client.loading import read_transformer_config

    configs = resolve_model(dit_model, components=DIT_COMPONENTS, revision=revision, configs_only=True)
    kind = read_pipeline_kind(configs, read_transformer_config(configs))
    return choose_encoder_model(
        encoder.info(model=""), kind, wanted=wanted or encoder.model, target=encoder.target, dit_model=dit_model
    )
