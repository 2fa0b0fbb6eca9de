"""``RemoteTextEncoder``: prompt embeddings from a flux2-remote encoder service.

    >>> enc = RemoteTextEncoder("gpu-box:50051")
    >>> prompt_embeds = enc.encode(["a red fox in the snow"])  # [1, 512, 15360] bfloat16, CPU
    >>> image = pipe(prompt_embeds=prompt_embeds.to("cuda")).images[0]

Layers: :mod:`dit_client.connection` (channel, TLS, errors) and
:mod:`dit_client.frames` (messages) below; this module and
:mod:`dit_client.stream` (bulk ``EncodeStream``) on top.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from common.errors import EncoderUnavailable, IntegrityError, InvalidRequest, UpsamplingUnavailable, error_from_code
from common.protocol import pb2
from common.wire import decode_response_frame, dtype_to_wire
from dit_client.connection import DEFAULT_TIMEOUT_S, Connection, TLSConfig
from dit_client.frames import EncoderInfo, PromptMetadata, ResponseAssembler, Upsampled, check_output_dtype
from dit_client.images import encoded_image
from dit_client.pad_table import Elision, HeldTable, PadTables
from dit_client.retry import RetryPolicy
from dit_client.stream import StreamedEmbedding, encode_stream

log = logging.getLogger(__name__)

# Names users import from here (``from dit_client.remote import TLSConfig``) keep working.
__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EncoderInfo",
    "PromptMetadata",
    "RemoteTextEncoder",
    "RetryPolicy",
    "StreamedEmbedding",
    "TLSConfig",
]


class RemoteTextEncoder:
    """Client of a flux2-remote encoder service.

    Args:
        target: ``host:port`` of the server's gRPC port; ``host`` alone gets port 50051, and
            gRPC URI schemes (``dns:///host:port``, ``ipv4:``, ``unix:``) pass through
            (see :func:`dit_client.connection.parse_target`; a bad value raises ``TargetError``).
            Several replicas: ``host-a:50051,host-b:50051`` (names looked up once),
            ``ipv4:10.0.0.1:50051,10.0.0.2:50051``, or ``dns:///name:50051`` (every address of
            the name, re-resolved by gRPC): see docs/replicas.md.
        api_key: sent as ``authorization: Bearer KEY`` on every call.
        tls: ``None`` for plaintext, ``True`` for TLS with the system roots, or a :class:`TLSConfig`.
        timeout: seconds per call (deadline), covering queueing, compute and transfer.
        expected_fingerprint: refuse to return embeddings made by any other model.
        model: the server model to use when a call names none (a name from ``info().models``);
            ``None``: the server's only model (a server with several then refuses ``encode``).
        lb_policy: ``round_robin`` or ``pick_first``; default ``round_robin`` when the target
            can name several addresses, else ``pick_first``.
        channel_options: extra gRPC channel arguments, ``(name, value)`` pairs (they win over ours).
        retry: how a response broken mid-way (its replica died after answering in part, which
            gRPC's own retry cannot cover) is sent again, and the default for :meth:`encode_stream`.
        elide: receive only each prompt's real rows when the server's model has a pad table
            (``ModelInfo.pad_table``), and put the pad rows back here; results are bit-identical
            either way. ``False``: every embedding travels whole (``[512, D]``), as from older clients.
        pad_table_dir: where pad tables are kept (one file per table, a few MB, checked on every
            read); default ``<user cache dir>/flux2-remote/pad-tables`` (``FLUX2_REMOTE_CACHE``
            moves the cache dir).

    Pad tables: the first encode for a model whose server names a table reads it
    from ``pad_table_dir``, or fetches it (``GetPadTable``) and keeps it there. A
    damaged or foreign file is deleted and fetched again, never used. If it cannot
    be got, a warning is logged once and embeddings travel whole.

    Failover: gRPC retries ``GetInfo`` and ``Encode`` on ``UNAVAILABLE`` before any answer
    arrived, on another replica (the channel's service config,
    :func:`dit_client.connection.service_config`); an ``Encode`` whose answer broke
    off part-way is sent again here. Either way the caller sees no failure while
    any replica is up.

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
        lb_policy: str | None = None,
        channel_options: Sequence[tuple[str, object]] = (),
        retry: RetryPolicy | None = None,
        model: str | None = None,
        elide: bool = True,
        pad_table_dir: str | Path | None = None,
    ):
        self.connection = Connection(
            target, api_key=api_key, tls=tls, timeout=timeout, lb_policy=lb_policy, channel_options=channel_options
        )
        self.retry = retry or RetryPolicy()
        self.expected_fingerprint = expected_fingerprint
        self.model = model or None
        self._infos: dict[str, EncoderInfo] = {}  # GetInfo per model name ("" = the server's default)
        self.elision = Elision(PadTables(pad_table_dir) if elide else None)

    @property
    def target(self) -> str:
        """The address as dialled (``host`` alone gets port 50051)."""
        return self.connection.target

    @property
    def timeout(self) -> float:
        """Seconds per call (deadline)."""
        return self.connection.timeout

    # -- lifecycle -------------------------------------------------------

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> RemoteTextEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API -------------------------------------------------------------

    @property
    def _info(self) -> EncoderInfo | None:
        """The cached info of the default model (tests pre-seed it)."""
        return self._infos.get(self.model or "")

    @_info.setter
    def _info(self, info: EncoderInfo | None) -> None:
        if info is None:
            self._infos.pop(self.model or "", None)
        else:
            self._infos[self.model or ""] = info

    def info(self, *, model: str | None = None, refresh: bool = False) -> EncoderInfo:
        """Server facts about ``model`` (default: the client's ``model``, else the server's first), cached per model.

        :attr:`EncoderInfo.models` lists every model the server serves. A name the
        server does not serve raises :class:`InvalidRequest` listing those it does.
        Raises :class:`IntegrityError` if the fingerprint is not the expected one.
        """
        name = (model if model is not None else self.model) or ""
        info = self._infos.get(name)
        if info is None or refresh:
            info = EncoderInfo.from_proto(self.connection.get_info(name))
            if name and info.model_name != name:
                # A server from before several models ignores the name: it would answer with its only model.
                raise InvalidRequest(
                    f"the encoder at {self.target} serves one model ({info.model_id}) and cannot select "
                    f"model {name!r}: it predates several models per server; call without a model name"
                )
            if self.expected_fingerprint and info.fingerprint != self.expected_fingerprint:
                raise IntegrityError(
                    f"encoder at {self.target} serves fingerprint {info.fingerprint}, "
                    f"expected {self.expected_fingerprint}: it runs a different model or settings"
                )
            self._infos[name] = info
        return info

    def pad_table_for(self, info: EncoderInfo) -> HeldTable | None:
        """The pad table to name in requests to ``info``'s model; None: they get whole embeddings."""
        return self.elision.table_for(self.connection, info.described, timeout=self.timeout)

    def encode(
        self,
        prompts: str | Sequence[str],
        *,
        dtype: torch.dtype | None = None,
        cache_only: bool = False,
        model: str | None = None,
    ) -> torch.Tensor:
        """Prompt embeddings, ready for ``Flux2Pipeline(prompt_embeds=...)``.

        Args:
            prompts: one prompt or a list; lists longer than the server's
                ``max_prompts_per_request`` are split into several calls.
            dtype: output dtype; ``None`` is the server's compute dtype (bit-exact).
            cache_only: answer only from the server cache; a miss raises ``NotCached``.
            model: which of the server's models encodes (a name from ``info().models``);
                default: the client's ``model``, else the server's only one.

        Returns:
            ``[B, max_sequence_length, embedding_dim]`` tensor on the CPU
            (``[B, 512, 15360]`` bfloat16 for FLUX.2-dev, ``[B, 512, 7680]`` for [klein] 4B).
        """
        return self.encode_with_metadata(prompts, dtype=dtype, cache_only=cache_only, model=model)[0]

    def encode_with_metadata(
        self,
        prompts: str | Sequence[str],
        *,
        dtype: torch.dtype | None = None,
        cache_only: bool = False,
        model: str | None = None,
    ) -> tuple[torch.Tensor, list[PromptMetadata]]:
        """Like :meth:`encode`, plus the per-prompt metadata (token counts, timings, cache hits)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InvalidRequest("no prompts given")
        name = (model if model is not None else self.model) or ""
        info = self.info(model=name)
        info.check_named(name, self.target)
        out_dtype = dtype or info.dtype
        check_output_dtype(out_dtype)
        # One preallocated buffer; chunks are copied straight into it.
        out = torch.empty((len(prompts), info.max_sequence_length, info.embedding_dim), dtype=out_dtype)
        metadata: list[PromptMetadata] = []
        held = self.pad_table_for(info)
        step = max(1, info.limits.get("max_prompts_per_request", len(prompts)))
        for start in range(0, len(prompts), step):
            part = prompts[start : start + step]
            request = pb2.EncodeRequest(
                prompts=part,
                dtype=dtype_to_wire(out_dtype),
                cache_only=cache_only,
                model=name,
                pad_table=held.id if held else "",
            )
            metadata.extend(self._encode_part(request, out[start : start + len(part)], info, held))
        return out, metadata

    def upsample(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        temperature: float = 0.15,
        seed: int | None = None,
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Rewrite short prompts into detailed ones on the encoder (``Flux2Pipeline.upsample_prompt``).

        Args:
            prompts: one prompt or a list, generated as one batch.
            images: ``None`` for text-to-image; else, per prompt, its reference images
                (PNG/JPEG bytes, file paths or PIL images) for image-to-image.
            temperature: sampling temperature (0.15 is the reference's).
            seed: the same seed, prompts and batch give the same texts (on the same server
                device and dtype); None: the server draws one (see :meth:`upsample_with_metadata`).
            model: as in :meth:`encode`.
            timeout: seconds for this call (default: the client's); generation takes seconds.

        Returns:
            One upsampled prompt per prompt. A server or model without upsampling raises
            :class:`~common.errors.UpsamplingUnavailable` saying why (``--upsampling``).
        """
        return self.upsample_with_metadata(prompts, images, temperature, seed, model=model, timeout=timeout).texts

    def upsample_with_metadata(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        temperature: float = 0.15,
        seed: int | None = None,
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Upsampled:
        """Like :meth:`upsample`, with the seed used, token counts and timings."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InvalidRequest("no prompts given")
        if images is not None and len(images) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(images)} image lists: give one list per prompt")
        request = pb2.UpsampleRequest(
            prompts=prompts,
            images=[pb2.UpsampleImages(images=[encoded_image(i) for i in entry]) for entry in images or ()],
            temperature=temperature,
            model=(model if model is not None else self.model) or "",
        )
        if seed is not None:
            request.seed = seed
        try:
            reply = self.connection.stub.Upsample(
                request, timeout=timeout or self.timeout, metadata=self.connection.metadata
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise UpsamplingUnavailable(
                    f"the encoder at {self.target} predates prompt upsampling; update it and start it with "
                    "`flux2-encoder serve --upsampling`"
                ) from None
            raise self.connection.translate(err) from None
        return Upsampled.from_proto(reply)

    # -- internals -------------------------------------------------------

    def _encode_part(
        self, request: pb2.EncodeRequest, out: torch.Tensor, info: EncoderInfo, held: HeldTable | None = None
    ) -> list[PromptMetadata]:
        """One ``Encode`` call into ``out``, sent again while its answer breaks off part-way.

        A call that fails before any answer arrived was already retried by gRPC
        (service config); it failing means no replica could take it, so it is
        raised. A call whose answer had begun is committed to its replica, which
        gRPC cannot retry (A6): after ``UNAVAILABLE`` it is sent again here, by
        :attr:`retry`, and round_robin places it on a live replica. ``out`` is
        filled anew each time; nothing half-received is returned.
        """
        attempt = 0
        while True:
            frames = 0
            try:
                responses = self.connection.encode_raw(request, timeout=self.timeout, metadata=self.connection.metadata)
                assembler = ResponseAssembler(out, info.fingerprint, held.rows if held else None)
                for raw in responses:
                    frames += 1
                    msg, offset, data = decode_response_frame(raw)
                    if msg.HasField("error"):
                        raise error_from_code(msg.error.code, msg.error.message)
                    assembler.add(msg, offset, data)
                return assembler.finish()
            except grpc.RpcError as err:
                exc = self.connection.translate(err)
                if frames == 0 or not isinstance(exc, EncoderUnavailable):
                    raise exc from None
                attempt += 1
                if attempt >= self.retry.max_attempts:
                    raise type(exc)(f"{exc} (the answer broke off {attempt} times)") from None
                wait = self.retry.wait_before_retry(attempt, exc)
                log.warning(
                    "%s: the answer broke off after %d messages (%s); sending it again in %.2f s",
                    self.target,
                    frames,
                    exc,
                    wait,
                )
                time.sleep(wait)

    # -- bulk streaming (EncodeStream) -------------------------------------

    def encode_stream(
        self,
        prompts: Iterable[str],
        *,
        batch_size: int | None = None,
        max_in_flight: int | None = None,
        dtype: torch.dtype | None = None,
        cache_only: bool = False,
        retry: RetryPolicy | None = None,
        model: str | None = None,
    ) -> Iterator[StreamedEmbedding]:
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
                (:class:`dit_client.retry.RetryPolicy`; default: the client's ``retry``).
                A stream that breaks (its replica died) is reopened, on a live replica
                when the target names several, and the requests that were in flight are
                sent again; prompts already yielded are never yielded again.
            model: which of the server's models encodes; default: the client's ``model``.

        Yields:
            :class:`dit_client.stream.StreamedEmbedding` per prompt, with
            ``index`` (position in ``prompts``) and ``embedding``
            ``[max_sequence_length, embedding_dim]`` on the CPU. Order follows
            completion, not input; every prompt appears exactly once. A request's
            prompts are yielded only after all of them arrived and passed the
            size, CRC-32C and fingerprint checks.
        """
        return encode_stream(
            self,
            prompts,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            dtype=dtype,
            cache_only=cache_only,
            retry=retry or self.retry,
            model=model if model is not None else self.model,
        )
