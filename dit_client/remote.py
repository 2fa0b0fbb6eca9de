"""``RemoteTextEncoder``: prompt embeddings from a flux2-remote encoder service.

    >>> enc = RemoteTextEncoder("gpu-box:50051")
    >>> prompt_embeds = enc.encode(["a red fox in the snow"])  # [1, 512, 15360] bfloat16, CPU
    >>> image = pipe(prompt_embeds=prompt_embeds.to("cuda")).images[0]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch

from common.errors import (
    EncoderUnavailable,
    Flux2RemoteError,
    IntegrityError,
    InvalidRequest,
    error_from_code,
    retry_after_from_metadata,
)
from common.protocol import SERVICE_NAME, pb2, pb2_grpc
from common.wire import DTYPE_NAMES, TensorAssembler, decode_response_frame, dtype_from_wire, dtype_to_wire

if TYPE_CHECKING:  # stream.py imports this module; annotations only
    from dit_client.stream import RetryPolicy, StreamedEmbedding

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS settings (paths to PEM files).

    Attributes:
        ca_cert: CA bundle that signed the server certificate; None uses the system roots.
        client_cert, client_key: for mutual TLS, the client's certificate and key.
        server_name: override the name checked against the server certificate.
    """

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


@dataclass(frozen=True)
class EncoderInfo:
    """What ``GetInfo`` reports about the server (see encoder.proto for each field)."""

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

    @classmethod
    def from_proto(cls, m: pb2.GetInfoResponse) -> "EncoderInfo":
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
        )


@dataclass(frozen=True)
class PromptMetadata:
    """Per-prompt facts the server reports with each embedding (times in nanoseconds)."""

    token_count: int
    truncated: bool
    queue_time_ns: int
    tokenization_time_ns: int
    inference_time_ns: int
    total_time_ns: int
    model_fingerprint: str
    cache_hit: bool
    batch_size: int

    @classmethod
    def from_proto(cls, m: pb2.PromptMetadata) -> "PromptMetadata":
        return cls(**{f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields})


class ResponseAssembler:
    """Reassembles the prompts of one request from its response frames into ``out``.

    Used by ``Encode`` and ``EncodeStream`` alike. Checks prompt indices, the
    fingerprint on every header, byte counts and CRCs; any mismatch raises
    :class:`IntegrityError`.

    Args:
        out: ``[n_prompts, max_sequence_length, embedding_dim]`` buffer to fill.
        fingerprint: the model fingerprint every embedding must carry.
    """

    def __init__(self, out: torch.Tensor, fingerprint: str):
        self.out = out
        self.fingerprint = fingerprint
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
            self._tensor = TensorAssembler(self.out[index], msg.header)
            self.metadata[index] = meta
            self._current = index
        elif self._tensor is None or msg.prompt_index != self._current:
            raise IntegrityError("chunk arrived before its header")
        self._tensor.add_bytes(offset, data)

    def finish(self) -> list[PromptMetadata]:
        """Check the last prompt and that every prompt arrived; return their metadata in order."""
        if self._tensor is not None:
            self._tensor.finish()
        missing = [i for i, m in enumerate(self.metadata) if m is None]
        if missing:
            raise IntegrityError(f"the server sent no embedding for prompt(s) {missing}")
        return self.metadata  # type: ignore[return-value]


def _describe_rpc_error(target: str, err: grpc.RpcError) -> Flux2RemoteError:
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return EncoderUnavailable(f"cannot reach the encoder at {target}: {details}")
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return error_from_code(code, details or code.name, retry_after_s=retry_after_from_metadata(trailing))


class RemoteTextEncoder:
    """Client of a flux2-remote encoder service.

    Args:
        target: ``host:port`` of the server.
        api_key: sent as ``authorization: Bearer KEY`` on every call.
        tls: ``None`` for plaintext, ``True`` for TLS with the system roots, or a :class:`TLSConfig`.
        timeout: seconds per call (deadline), covering queueing, compute and transfer.
        expected_fingerprint: refuse to return embeddings made by any other model.

    All failures raise a :class:`common.errors.Flux2RemoteError` subclass with a
    readable message: ``EncoderUnavailable`` (unreachable), ``EncoderOverloaded``,
    ``Unauthenticated``, ``InvalidRequest``, ``NotCached``, ``IntegrityError``...
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: TLSConfig | bool | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        expected_fingerprint: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self.expected_fingerprint = expected_fingerprint
        # Large responses come as 1 MiB chunks; allow some slack for headers.
        options = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
        if tls:
            tls_cfg = tls if isinstance(tls, TLSConfig) else TLSConfig()
            if tls_cfg.server_name:
                options.append(("grpc.ssl_target_name_override", tls_cfg.server_name))
            self._channel = grpc.secure_channel(target, tls_cfg.credentials(), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb2_grpc.TextEncoderStub(self._channel)
        # Encode responses arrive as raw bytes and are split by common.wire, so
        # chunk bytes are copied once, into the output tensor (protobuf would copy them twice more).
        self._encode_raw = self._channel.unary_stream(
            f"/{SERVICE_NAME}/Encode",
            request_serializer=pb2.EncodeRequest.SerializeToString,
            response_deserializer=None,
        )
        self._encode_stream_raw = self._channel.stream_stream(
            f"/{SERVICE_NAME}/EncodeStream",
            request_serializer=pb2.EncodeRequest.SerializeToString,
            response_deserializer=None,
        )
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._info: EncoderInfo | None = None

    # -- lifecycle -------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RemoteTextEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API -------------------------------------------------------------

    def info(self, *, refresh: bool = False) -> EncoderInfo:
        """Server facts (cached after the first call). Raises if the fingerprint is not the expected one."""
        if self._info is None or refresh:
            try:
                reply = self._stub.GetInfo(pb2.GetInfoRequest(), timeout=min(self.timeout, 30.0), metadata=self._metadata)
            except grpc.RpcError as err:
                raise _describe_rpc_error(self.target, err) from None
            info = EncoderInfo.from_proto(reply)
            if self.expected_fingerprint and info.fingerprint != self.expected_fingerprint:
                raise IntegrityError(
                    f"encoder at {self.target} serves fingerprint {info.fingerprint}, "
                    f"expected {self.expected_fingerprint}: it runs a different model or settings"
                )
            self._info = info
        return self._info

    def encode(
        self, prompts: str | Sequence[str], *, dtype: torch.dtype | None = None, cache_only: bool = False
    ) -> torch.Tensor:
        """Prompt embeddings, ready for ``Flux2Pipeline(prompt_embeds=...)``.

        Args:
            prompts: one prompt or a list; lists longer than the server's
                ``max_prompts_per_request`` are split into several calls.
            dtype: output dtype; ``None`` is the server's compute dtype (bit-exact).
            cache_only: answer only from the server cache; a miss raises ``NotCached``.

        Returns:
            ``[B, max_sequence_length, embedding_dim]`` tensor on the CPU
            (``[B, 512, 15360]`` bfloat16 for FLUX.2-dev).
        """
        return self.encode_with_metadata(prompts, dtype=dtype, cache_only=cache_only)[0]

    def encode_with_metadata(
        self, prompts: str | Sequence[str], *, dtype: torch.dtype | None = None, cache_only: bool = False
    ) -> tuple[torch.Tensor, list[PromptMetadata]]:
        """Like :meth:`encode`, plus the per-prompt metadata (token counts, timings, cache hits)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InvalidRequest("no prompts given")
        info = self.info()
        out_dtype = dtype or info.dtype
        if out_dtype not in DTYPE_NAMES:
            raise InvalidRequest(f"dtype {out_dtype} is not supported; use one of {', '.join(DTYPE_NAMES.values())}")
        # One preallocated buffer; chunks are copied straight into it.
        out = torch.empty((len(prompts), info.max_sequence_length, info.embedding_dim), dtype=out_dtype)
        metadata: list[PromptMetadata] = []
        step = max(1, info.limits.get("max_prompts_per_request", len(prompts)))
        for start in range(0, len(prompts), step):
            part = prompts[start : start + step]
            request = pb2.EncodeRequest(prompts=part, dtype=dtype_to_wire(out_dtype), cache_only=cache_only)
            try:
                responses = self._encode_raw(request, timeout=self.timeout, metadata=self._metadata)
                metadata.extend(self._receive(responses, out[start : start + len(part)], info))
            except grpc.RpcError as err:
                raise _describe_rpc_error(self.target, err) from None
        return out, metadata

    # -- internals -------------------------------------------------------

    def _receive(self, responses: Iterator[bytes], out: torch.Tensor, info: EncoderInfo) -> list[PromptMetadata]:
        """Reassemble the chunks of ``len(out)`` prompts into ``out``; verify sizes, CRC and fingerprint."""
        assembler = ResponseAssembler(out, info.fingerprint)
        for raw in responses:
            msg, offset, data = decode_response_frame(raw)
            if msg.HasField("error"):
                raise error_from_code(msg.error.code, msg.error.message)
            assembler.add(msg, offset, data)
        return assembler.finish()

    # -- bulk streaming (EncodeStream) -------------------------------------

    def encode_stream(
        self,
        prompts: Iterable[str],
        *,
        batch_size: int | None = None,
        max_in_flight: int | None = None,
        dtype: torch.dtype | None = None,
        cache_only: bool = False,
        retry: "RetryPolicy | None" = None,
    ) -> Iterator["StreamedEmbedding"]:
        """Embeddings for many prompts over one ``EncodeStream`` call, yielded as they complete.

        Args:
            prompts: any iterable of prompts; consumed lazily, so it may be far
                larger than memory allows to hold as embeddings.
            batch_size: prompts per request (default: ``min(8, max_prompts_per_request)``).
            max_in_flight: requests outstanding at once (default: ``min(8, max_in_flight_per_stream)``);
                they wait on the server, and the client assembles one request at a time.
            dtype: output dtype; ``None`` is the server's compute dtype (bit-exact).
            cache_only: answer only from the server cache; a miss raises ``NotCached``.
            retry: how ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``, broken streams and
                stalls (no response for ``timeout`` seconds) are retried
                (:class:`dit_client.stream.RetryPolicy`).

        Yields:
            :class:`dit_client.stream.StreamedEmbedding` per prompt, with
            ``index`` (position in ``prompts``) and ``embedding``
            ``[max_sequence_length, embedding_dim]`` on the CPU. Order follows
            completion, not input; every prompt appears exactly once. A request's
            prompts are yielded only after all of them arrived and passed the
            size, CRC-32C and fingerprint checks.
        """
        from dit_client.stream import encode_stream

        return encode_stream(
            self, prompts, batch_size=batch_size, max_in_flight=max_in_flight, dtype=dtype,
            cache_only=cache_only, retry=retry,
        )
