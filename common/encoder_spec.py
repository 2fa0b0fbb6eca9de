"""What an embedding *is*: the recipe shared by server, client and cache keys.

FLUX.2-dev's recipe is diffusers' ``Flux2Pipeline._get_mistral_3_small_prompt_embeds``:
the prompt wrapped with the pipeline's system message by ``format_input``, chat
template applied with ``padding="max_length", truncation=True, max_length=512``,
then ``hidden_states[10], [20], [30]`` stacked into ``[B, 512, 3 * hidden]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE


@dataclass(frozen=True)
class EncoderSpec:
    """The embedding recipe.

    Attributes:
        name: short id of the recipe, part of every fingerprint.
        hidden_states_layers: indices into ``hidden_states`` (0 = embedding output).
        max_sequence_length: tokens per prompt after padding/truncation.
        system_message: system turn prepended to every prompt.
    """

    name: str
    hidden_states_layers: tuple[int, ...]
    max_sequence_length: int
    system_message: str

    @property
    def computed_layers(self) -> int:
        """Decoder layers that must run: hidden_states[k] is the output of layer k-1."""
        return max(self.hidden_states_layers)

    def embedding_dim(self, hidden_size: int) -> int:
        return len(self.hidden_states_layers) * hidden_size


FLUX2_DEV = EncoderSpec(
    name="flux2-dev/mistral3-small",
    hidden_states_layers=(10, 20, 30),
    max_sequence_length=512,
    system_message=SYSTEM_MESSAGE,
)
