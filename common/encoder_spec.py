"""What an embedding *is*: the recipes shared by server, client and cache keys.

FLUX.2-dev's recipe is diffusers' ``Flux2Pipeline._get_mistral_3_small_prompt_embeds``:
the prompt wrapped with the pipeline's system message by ``format_input``, chat
template applied with ``padding="max_length", truncation=True, max_length=512``,
then ``hidden_states[10], [20], [30]`` stacked into ``[B, 512, 3 * hidden]``.

FLUX.2 [klein]'s recipe is ``Flux2KleinPipeline._get_qwen3_prompt_embeds``: one
user turn and no system turn, the chat template rendered with
``add_generation_prompt=True, enable_thinking=False``, then tokenized with
``padding="max_length", truncation=True, max_length=512``, then
``hidden_states[9], [18], [27]`` stacked the same way. ``Flux2KleinKVPipeline``
and ``Flux2KleinInpaintPipeline`` carry copies of that function and take the
same embeddings.

How each recipe is loaded and run lives with the server
(``encoder_server/text_encoder.py``); this module holds only what both sides
must agree on. A new family is one more ``EncoderSpec`` here and one recipe there.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE


@dataclass(frozen=True)
class EncoderSpec:
    """The embedding recipe.

    Attributes:
        name: short id of the recipe, part of every fingerprint (its first ``/``-part
            prefixes the fingerprint, e.g. ``flux2-dev:...``).
        hidden_states_layers: indices into ``hidden_states`` (0 = embedding output).
        max_sequence_length: tokens per prompt after padding/truncation.
        system_message: system turn prepended to every prompt (``""``: the template has none).
        pipelines: diffusers pipeline classes (``model_index.json``'s ``_class_name``)
            whose ``prompt_embeds`` these embeddings are.
        text_encoder_type: ``model_type`` in the text encoder's ``config.json``
            (``"mistral3"``, ``"qwen3"``); how a model folder names its recipe.
    """

    name: str
    hidden_states_layers: tuple[int, ...]
    max_sequence_length: int
    system_message: str
    # Not part of the fingerprint: they say where a recipe applies, not what it computes.
    pipelines: tuple[str, ...] = ()
    text_encoder_type: str = ""

    @property
    def computed_layers(self) -> int:
        """Decoder layers that must run: hidden_states[k] is the output of layer k-1."""
        return max(self.hidden_states_layers)

    @property
    def family(self) -> str:
        """The recipe's short name, e.g. ``"flux2-dev"`` or ``"flux2-klein"`` (the fingerprint prefix)."""
        return self.name.split("/")[0]

    def embedding_dim(self, hidden_size: int) -> int:
        return len(self.hidden_states_layers) * hidden_size


FLUX2_DEV = EncoderSpec(
    name="flux2-dev/mistral3-small",
    hidden_states_layers=(10, 20, 30),
    max_sequence_length=512,
    system_message=SYSTEM_MESSAGE,
    pipelines=("Flux2Pipeline",),
    text_encoder_type="mistral3",
)

FLUX2_KLEIN = EncoderSpec(
    name="flux2-klein/qwen3",
    hidden_states_layers=(9, 18, 27),
    max_sequence_length=512,
    system_message="",
    pipelines=("Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline"),
    text_encoder_type="qwen3",
)

SPECS: tuple[EncoderSpec, ...] = (FLUX2_DEV, FLUX2_KLEIN)
"""Every recipe this version knows, in no particular order."""


def spec_for_pipeline(class_name: str) -> EncoderSpec | None:
    """The recipe whose embeddings pipeline ``class_name`` takes, or None when no recipe names it."""
    return next((s for s in SPECS if class_name in s.pipelines), None)


def spec_for_text_encoder(model_type: str) -> EncoderSpec | None:
    """The recipe for a text encoder whose ``config.json`` says ``model_type``, or None."""
    return next((s for s in SPECS if s.text_encoder_type == model_type), None)
