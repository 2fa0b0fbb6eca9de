"""The models one server serves, by name.

A studio with FLUX.2 [dev] and [klein] users needs one encoder box, not two:
``flux2-encoder serve --model dev=black-forest-labs/FLUX.2-dev --model
klein=black-forest-labs/FLUX.2-klein-4B``. Each model has its own engine, so
batches never mix models, and its own fingerprint, so cache entries never mix
either (the caches themselves are shared, bounded once for the server). The
request policy (quotas, rate, slots) spans every model: a user's limits are
the user's, whatever model they ask.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import torch

from common.config import ModelConfig, ServerConfig
from common.errors import InvalidRequest
from common.pad_table import pad_table_id, same_bits
from common.protocol import pb2
from common.wire import dtype_to_wire
from encoder_server.engine import EncodedPrompt, EncodeEngine
from encoder_server.text_encoder import ConfigError, EmbeddingBackend

log = logging.getLogger(__name__)

# An explicit NAME in --model NAME=SOURCE; hub ids (with '/') are names only by default.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEV_FAMILY = "flux2-dev"


@dataclass
class ServedModel:
    """One model: its backend, the engine that batches for it, and what GetInfo says of it.

    ``pad_table`` (``[P, D]``, compute dtype) holds the rows every left-padded
    prompt has at its pad positions (see :func:`served_pad_table`); ``None``
    when the model cannot leave pad rows out.
    """

    name: str
    backend: EmbeddingBackend
    engine: EncodeEngine
    model_id: str = ""
    revision: str = ""
    demo: bool = False
    pad_table: torch.Tensor | None = None

    def __post_init__(self):
        self.pad_table_id = pad_table_id(self.backend.fingerprint, self.pad_table)

    @property
    def family(self) -> str:
        return self.backend.spec.family

    def elide(self, embedding: torch.Tensor, token_count: int, client_table: str) -> tuple[torch.Tensor, int]:
        """``(rows to send, leading rows left out)`` for one ``[L, D]`` embedding.

        Rows are left out only when the client holds this very table and they
        equal it bit for bit: the check runs on every answer, so a batch that
        happened to compute a pad row differently is sent whole, never wrong.
        """
        if not client_table or client_table != self.pad_table_id or self.pad_table is None:
            return embedding, 0
        pad = min(embedding.shape[0] - token_count, self.pad_table.shape[0])
        if pad <= 0 or not same_bits(embedding[:pad], self.pad_table[:pad]):
            return embedding, 0
        return embedding[pad:], pad

    def answer_rows(self, result: EncodedPrompt, client_table: str) -> tuple[torch.Tensor, int]:
        """:meth:`elide` for one engine answer, straight from its compact rows when it has them.

        An answer whose pad rows the engine already left out (a compact cache entry, checked
        bit for bit against this very table when it was stored) is sent as it is, without
        building the full tensor; any other answer goes through :meth:`elide`.
        """
        if result.pad_count and client_table and client_table == self.pad_table_id == result.pad_table_id:
            return result.rows, result.pad_count
        return self.elide(result.embedding, result.token_count, client_table)

    def info(self) -> pb2.ModelInfo:
        backend, spec = self.backend, self.backend.spec
        return pb2.ModelInfo(
            name=self.name,
            model_id=self.model_id,
            revision=self.revision,
            fingerprint=backend.fingerprint,
            hidden_states_layers=list(spec.hidden_states_layers),
            num_hidden_layers=backend.num_hidden_layers,
            computed_layers=spec.computed_layers,
            hidden_size=backend.hidden_size,
            embedding_dim=spec.embedding_dim(backend.hidden_size),
            max_sequence_length=spec.max_sequence_length,
            dtype=dtype_to_wire(backend.dtype),
            quantization=backend.quantization,
            device=str(backend.device),
            demo=self.demo,
            padding_side=backend.padding_side,
            family=self.family,
            pad_table=self.pad_table_id,
            pad_table_rows=0 if self.pad_table is None else self.pad_table.shape[0],
            compute=backend.compute,
        )


class ModelRegistry:
    """The served models by name; resolves what a request names."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ConfigError("a server needs at least one model")
        self._models = {m.name: m for m in models}
        if len(self._models) != len(models):
            raise ConfigError("two models have the same name; give each its own with --model NAME=SOURCE")

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def __iter__(self):
        return iter(self._models.values())

    def get(self, name: str) -> ServedModel:
        """The model ``name`` names; ``""`` is the only model of a one-model server."""
        return self._models[resolve_model_name(name, self.names)]

    def first_of_family(self, family: str) -> ServedModel | None:
        return next((m for m in self._models.values() if m.family == family), None)

    def close(self) -> None:
        for model in self._models.values():
            model.engine.close()


def served_pad_table(backend: EmbeddingBackend) -> torch.Tensor | None:
    """The pad table a model may elide with: the backend's (computed at load through the exact
    path), when the load-time check found it shared by every prompt; None otherwise."""
    rows = backend.pad_rows()
    if rows is None or rows.shape[0] == 0 or not backend.pad_rows_shared:
        return None
    return rows


def resolve_model_name(name: str, names: list[str]) -> str:
    """Which served model a request's ``model`` field names; raises InvalidRequest listing them."""
    if not name:
        if len(names) == 1:
            return names[0]
        raise InvalidRequest(f"this server serves {len(names)} models; name one in the request: {', '.join(names)}")
    if name not in names:
        raise InvalidRequest(f"this server does not serve a model named {name!r}; it serves: {', '.join(names)}")
    return name


def parse_model_flag(value: str) -> ModelConfig:
    """``--model [NAME=]SOURCE``: NAME is letters, digits, ``.``, ``_``, ``-``; without it the default name."""
    from common.config import default_model_name

    head, sep, rest = value.partition("=")
    if sep and NAME_RE.fullmatch(head) and rest:
        return ModelConfig(head, rest)
    return ModelConfig(default_model_name(value), value)


def apply_per_model(models: tuple[ModelConfig, ...], values: list[str], field: str, flag: str):
    """Fold ``--dtype VALUE`` / ``--dtype NAME=VALUE`` into the models; returns (server default, models).

    A plain VALUE sets the server's default (the last one wins); NAME=VALUE one model's.
    """
    default = None
    by_name: dict[str, str] = {}
    names = {m.name for m in models}
    for value in values:
        head, sep, rest = value.partition("=")
        if sep:
            if head not in names:
                raise ConfigError(f"{flag} {value}: no model is named {head!r} (models: {', '.join(sorted(names))})")
            by_name[head] = rest
        else:
            default = value
    return default, tuple(replace(m, **{field: by_name[m.name]}) if m.name in by_name else m for m in models)


def model_configs(config: ServerConfig) -> tuple[ModelConfig, ...]:
    """The server's models, checked: unique names (a second ``--model`` with a used name refuses to start)."""
    models = config.served_models()
    seen: set[str] = set()
    for m in models:
        if m.name in seen:
            raise ConfigError(f"two --model flags use the name {m.name!r}; name them apart with --model NAME=SOURCE")
        seen.add(m.name)
    return models


def config_for(config: ServerConfig, model: ModelConfig) -> ServerConfig:
    """The one-model config that loads ``model`` (its own dtype and quantization, or the server's)."""
    return replace(
        config,
        model=model.source,
        models=(),
        dtype=model.dtype or config.dtype,
        quantization=model.quantization or config.quantization,
        compute=model.compute or config.compute,
    )
