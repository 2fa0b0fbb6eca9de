"""The message layer of the client: what ``GetInfo`` says, per-prompt metadata, reassembling chunks.

Sits on :mod:`common.wire` (the byte format) and below the clients
(:mod:`dit_client.remote`, :mod:`dit_client.stream`); it opens no connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from common.dtypes import DTYPE_NAMES
from common.errors import IntegrityError, InvalidRequest
from common.pad_table import pad_rows
from common.protocol import pb2
from common.wire import TensorAssembler, dtype_from_wire


@dataclass(frozen=True)
class ModelInfo:
    """One model a server serves (``GetInfoResponse.models``): what :meth:`RemoteTextEncoder.encode`'s
    ``model=`` names, and what its embeddings are."""

    name: str
    model_id: str
    fingerprint: str
    family: str  # the recipe: "flux2-dev" or "flux2-klein" (common.encoder_spec)
    hidden_states_layers: tuple[int, ...]
    num_hidden_layers: int
    computed_layers: int
    hidden_size: int
    embedding_dim: int
    max_sequence_length: int
    dtype: torch.dtype
    quantization: str
    device: str
    demo: bool
    padding_side: str
    revision: str = ""
    pad_table: str = ""  # the id of the model's pad table; "": it never leaves pad rows out
    pad_table_rows: int = 0
    # Upsample serves it (the server runs --upsampling; FLUX.2-dev only); with images too.
    upsampling: bool = False
    upsampling_images: bool = False
    upsampling_unavailable: str = ""  # why it, or its image form, is unavailable

    @classmethod
    def from_proto(cls, m: pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=m.name,
            model_id=m.model_id,
            fingerprint=m.fingerprint,
            family=m.family,
            hidden_states_layers=tuple(m.hidden_states_layers),
            num_hidden_layers=m.num_hidden_layers,
            computed_layers=m.computed_layers,
            hidden_size=m.hidden_size,
            embedding_dim=m.embedding_dim,
            max_sequence_length=m.max_sequence_length,
            dtype=dtype_from_wire(m.dtype),
            quantization=m.quantization,
            device=m.device,
            demo=m.demo,
            padding_side=m.padding_side,
            revision=m.revision,
            pad_table=m.pad_table,
            pad_table_rows=m.pad_table_rows,
            upsampling=m.upsampling,
            upsampling_images=m.upsampling_images,
            upsampling_unavailable=m.upsampling_unavailable,
        )


@dataclass(frozen=True)
class EncoderInfo:
    """What ``GetInfo`` reports about the server (see encoder.proto for each field).

    The model fields describe one model: the one ``GetInfo`` was asked about
    (:attr:`model_name`), or the server's first. :attr:`models` lists every model
    the server serves (empty from servers older than several-model support).
    """

    model_id: str
    revision: str
    fingerprint: str
    hidden_states_layers: tuple[int, ...]
    num_hidden_layers: int
    computed_layers: int
    hidden_size: int
    embedding_dim: int
    max_sequence_length: int
    dtype: torch.dtype
    quantization: str
    device: str
    server_version: str
    demo: bool
    padding_side: str
    limits: dict[str, int] = field(default_factory=dict)
    model_name: str = ""
    family: str = ""
    models: tuple[ModelInfo, ...] = ()

    def model(self, name: str) -> ModelInfo | None:
        """The entry of :attr:`models` called ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)

    @property
    def described(self) -> ModelInfo | None:
        """The entry of :attr:`models` that the model fields describe; None from servers older than several models."""
        return self.model(self.model_name) if self.model_name else None

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def check_named(self, name: str, target: str) -> None:
        """Raise :class:`InvalidRequest` when no model is named and the server serves several (it would refuse)."""
        if not name and len(self.models) > 1:
            raise InvalidRequest(
                f"the encoder at {target} serves {len(self.models)} models ({', '.join(self.model_names)}); "
                "name one: model=NAME (flux2-dit: --encoder-model NAME)"
            )

    @classmethod
    def from_proto(cls, m: pb2.GetInfoResponse) -> EncoderInfo:
        return cls(
            model_id=m.model_id,
            revision=m.revision,
            fingerprint=m.fingerprint,
            hidden_states_layers=tuple(m.hidden_states_layers),
            num_hidden_layers=m.num_hidden_layers,
            computed_layers=m.computed_layers,
            hidden_size=m.hidden_size,
            embedding_dim=m.embedding_dim,
            max_sequence_length=m.max_sequence_length,
            dtype=dtype_from_wire(m.dtype),
            quantization=m.quantization,
            device=m.device,
            server_version=m.server_version,
            demo=m.demo,
            padding_side=m.padding_side,
            limits={f.name: getattr(m.limits, f.name) for f in m.limits.DESCRIPTOR.fields},
            model_name=m.model_name,
            family=m.family,
            models=tuple(ModelInfo.from_proto(x) for x in m.models),
        )


@dataclass(frozen=True)
class PromptMetadata:
    """Per-prompt facts the server reports with each embedding (times in nanoseconds).

    ``pad_rows_elided``: leading pad rows the server left out because the client
    holds them (its pad table); the client put them back. The wire carried
    ``max_sequence_length - pad_rows_elided`` rows. 0: every row was sent.
    ``compute``: ``"exact"`` (bit-exact with diffusers) or ``"packed"`` (within
    rounding); ``""`` from a server older than the field (exact).
    """

    token_count: int
    truncated: bool
    queue_time_ns: int
    tokenization_time_ns: int
    inference_time_ns: int
    total_time_ns: int
    model_fingerprint: str
    cache_hit: bool
    batch_size: int
    pad_rows_elided: int = 0
    compute: str = ""

    @classmethod
    def from_proto(cls, m: pb2.PromptMetadata) -> PromptMetadata:
        # The dataclass's fields, not the message's: a field added to the proto reaches callers when it is added here.
        return cls(**{f.name: getattr(m, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Upsampled:
    """What ``Upsample`` answered (times in nanoseconds).

    Attributes:
        texts: the upsampled prompt of each prompt, in order.
        generated_tokens: tokens the model generated for each.
        seed: the seed generation ran with: the one asked for, or the random one the server
            drew; sending it again with the same prompts in the same batch gives the same texts.
        temperature: the sampling temperature used.
        model_fingerprint: the embedding fingerprint of the model that generated.
    """

    texts: list[str]
    generated_tokens: list[int]
    seed: int
    temperature: float
    model_fingerprint: str
    queue_time_ns: int
    generation_time_ns: int
    total_time_ns: int

    @classmethod
    def from_proto(cls, m: pb2.UpsampleResponse) -> Upsampled:
        return cls(
            texts=[r.text for r in m.results],
            generated_tokens=[r.generated_tokens for r in m.results],
            seed=m.seed,
            temperature=m.temperature,
            model_fingerprint=m.model_fingerprint,
            queue_time_ns=m.queue_time_ns,
            generation_time_ns=m.generation_time_ns,
            total_time_ns=m.total_time_ns,
        )


class ResponseAssembler:
    """Reassembles the prompts of one request from its response frames into ``out``.

    Used by ``Encode`` and ``EncodeStream`` alike. Checks prompt indices, the
    fingerprint on every header, byte counts and CRCs; any mismatch raises
    :class:`IntegrityError`.

    An embedding sent without its leading pad rows (``pad_rows_elided``) has
    its real rows written to the end of its slot and the pad table's rows
    (:func:`common.pad_table.pad_rows`, cast like the rows) to the start, so
    ``out`` holds the full embedding, bit for bit what the server computed.

    Args:
        out: ``[n_prompts, max_sequence_length, embedding_dim]`` buffer to fill.
        fingerprint: the model fingerprint every embedding must carry.
        pad_table: ``[P, embedding_dim]``, the table the request named
            (``EncodeRequest.pad_table``); None when it named none, and then an
            answer with rows left out is an :class:`IntegrityError`.
    """

    def __init__(self, out: torch.Tensor, fingerprint: str, pad_table: torch.Tensor | None = None):
        self.out = out
        self.fingerprint = fingerprint
        self.pad_table = pad_table
        self.metadata: list[PromptMetadata | None] = [None] * len(out)
        self._tensor: TensorAssembler | None = None
        self._current = -1

    def add(self, msg: pb2.EncodeResponse, offset: int, data: bytes | memoryview) -> None:
        """Take one frame, split by :func:`common.wire.decode_response_frame`."""
        if msg.HasField("header"):
            if self._tensor is not None:
                self._tensor.finish()
            index = msg.prompt_index
            if index >= len(self.out) or self.metadata[index] is not None:
                raise IntegrityError(f"unexpected prompt index {index} in the response")
            meta = PromptMetadata.from_proto(msg.header.metadata)
            if meta.model_fingerprint != self.fingerprint:
                raise IntegrityError(f"embedding made by {meta.model_fingerprint}, expected {self.fingerprint}")
            self._tensor = TensorAssembler(self._slot(index, meta.pad_rows_elided), msg.header)
            self.metadata[index] = meta
            self._current = index
        elif self._tensor is None or msg.prompt_index != self._current:
            raise IntegrityError("chunk arrived before its header")
        self._tensor.add_bytes(offset, data)

    def _slot(self, index: int, elided: int) -> torch.Tensor:
        """Where prompt ``index``'s rows go: all of its slot, or the part after the ``elided`` pad rows, filled here."""
        slot = self.out[index]  # [L, D]
        if elided == 0:
            return slot
        if self.pad_table is None:
            raise IntegrityError(f"the server left out {elided} rows, but this client named no pad table")
        if elided >= slot.shape[0]:
            raise IntegrityError(f"the server left out {elided} of {slot.shape[0]} rows")
        slot[:elided] = pad_rows(elided, slot.shape[1], slot.dtype, self.pad_table)
        return slot[elided:]

    def finish(self) -> list[PromptMetadata]:
        """Check the last prompt and that every prompt arrived; return their metadata in order."""
        if self._tensor is not None:
            self._tensor.finish()
        arrived = [m for m in self.metadata if m is not None]
        if len(arrived) != len(self.metadata):
            missing = [i for i, m in enumerate(self.metadata) if m is None]
            raise IntegrityError(f"the server sent no embedding for prompt(s) {missing}")
        return arrived


def check_output_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if the wire can carry it, else :class:`InvalidRequest` listing the ones it can."""
    if dtype not in DTYPE_NAMES:
        raise InvalidRequest(f"dtype {dtype} is not supported; use one of {', '.join(DTYPE_NAMES.values())}")
    return dtype
