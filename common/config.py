"""The one typed configuration of the encoder server.

Built once (by the CLI from flags, or by tests directly) and passed down
explicitly; nothing reads settings from the environment at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from common.model_source import DEFAULT_MODEL
from common.wire import DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class Limits:
    """Bounds on everything a client controls; requests past them get INVALID_ARGUMENT."""

    max_prompts_per_request: int = 32
    # 512 tokens is ~2-3k characters of English; this leaves room and still
    # bounds tokenizer work per prompt.
    max_prompt_chars: int = 16_384
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_in_flight_per_stream: int = 8
    # Encode/EncodeStream calls (and, separately, HTTP /predict requests) served
    # at once; past it new ones get RESOURCE_EXHAUSTED (HTTP 429) at once. Each
    # may hold finished embeddings while its client reads them (up to
    # max_prompts_per_request x 15.7 MB for Encode, max_in_flight_per_stream
    # times that for a stream), so this also bounds that memory.
    max_concurrent_calls: int = 64
    # A user's share of max_concurrent_calls, so one user cannot take every
    # slot. 0 means automatic: a quarter of max_concurrent_calls when an API
    # key file names several users, the whole of it otherwise (without keys
    # every caller is the same user, "anonymous").
    max_concurrent_calls_per_user: int = 0
    # An answer (a gRPC message or the HTTP body) the client does not read for
    # this long is cancelled and its slot freed: a client that stops reading
    # must not hold a slot, and the embeddings in it, for ever.
    write_timeout_s: float = 30.0
    # An HTTP request body must arrive within this long (a slow sender holds a
    # connection, never a slot: the slot is taken only after the body is read).
    body_timeout_s: float = 30.0
    # request_id is echoed in every response message; bound it so an answer
    # always fits a message.
    max_request_id_chars: int = 256
    # A deadline shorter than this cannot be met by any forward pass; refuse
    # it at once instead of queueing work nobody will read.
    min_deadline_ms: int = 5
    max_receive_message_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class BatchingConfig:
    """How the engine groups prompts into forward passes (see docs/serving.md).

    Attributes:
        max_batch_tokens: tokens per forward pass, as the compute mode runs them.
            ``--compute exact``: padded tokens; every prompt is padded to
            ``max_sequence_length`` (512), so this is 512 x prompts (8192: 16 prompts).
            ``--compute packed``: real tokens (the prompt's own, after the chat
            template and truncation; pads do not run), so the same budget takes
            4-12x more FLUX.2-dev prompts of realistic length (43-132 tokens).
        max_batch_prompts: prompts per forward pass.
        max_queue_delay_ms: how long the oldest queued prompt may wait for
            others to fill its batch before it runs anyway. 0 by default: the
            model takes a batch only when it is idle, so under load prompts
            that arrive during a forward pass share the next one anyway, and a
            window would only delay a lone prompt (5 ms cost ~35% of the wire
            throughput of one embedding, benchmarks/wire.py).
        max_queue_prompts: prompts that may wait in the queue; past it unary
            calls get RESOURCE_EXHAUSTED and streams wait (backpressure).
        fair: take work round-robin across users (False: first come, first
            served; kept for benchmarks).
    """

    max_batch_tokens: int = 8192
    max_batch_prompts: int = 32
    max_queue_delay_ms: float = 0.0
    max_queue_prompts: int = 1024
    fair: bool = True


CACHE_SCOPES = ("auto", "shared", "user")


@dataclass(frozen=True)
class CacheConfig:
    """Embedding caches: an in-memory LRU in front of an optional disk cache.

    Attributes:
        memory_mb: in-memory LRU size in MiB (0 disables it). One FLUX.2-dev
            embedding is 15 MiB (bf16 ``[512, 15360]``).
        dir: persistent cache folder; ``None`` keeps no disk cache.
        max_gb: disk cache size bound in GiB; least recently used entries go first.
        scope: who shares cached embeddings and running computations: ``shared``
            (every user: a prompt one user sent is a hit for another, which tells
            that other user it was sent), ``user`` (each user their own: nothing one
            user sends can reveal another's prompts) or ``auto`` (``user`` when the
            API key file names several users, ``shared`` otherwise). See docs/security.md.
        shared_url: ``redis://HOST:PORT/DB`` of a Redis or Valkey server that replicas
            share: embeddings, compute-once leases, and the per-user rate and daily quota
            (docs/replicas.md); ``None``: this server shares nothing.
    """

    memory_mb: int = 2048
    dir: str | None = None
    max_gb: float = 50.0
    scope: str = "auto"
    shared_url: str | None = None


@dataclass(frozen=True)
class AuthConfig:
    """Who may call, and how much (see docs/security.md).

    Attributes:
        api_key_file: ``user:key`` per line (``#`` comments); ``None`` lets anyone
            on the network call (every caller is then the user ``anonymous``).
        rate_limit_rpm: Encode requests (stream messages and HTTP calls count one
            each) per user per minute, as a token bucket; 0 is unlimited.
        quota_prompts_per_day: prompts per user per UTC day; 0 is unlimited.
        usage_file: JSON file keeping today's prompt counts across restarts;
            ``None`` keeps them in memory (a restart resets the daily quota).
    """

    api_key_file: str | None = None
    rate_limit_rpm: int = 0
    quota_prompts_per_day: int = 0
    usage_file: str | None = None


@dataclass(frozen=True)
class ServerTLSConfig:
    """PEM files for TLS on the gRPC port and the HTTP endpoint (all ``None``: plaintext).

    Attributes:
        cert: server certificate chain.
        key: the certificate's private key.
        client_ca: when set, clients must present a certificate signed by this CA (mutual TLS).
    """

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.client_ca)


@dataclass(frozen=True)
class HTTPConfig:
    """The Hugging Face-compatible ``POST /predict`` endpoint (docs/hf-compatible-endpoint.md).

    Attributes:
        host: address to bind; loopback unless the operator opens it on purpose.
        port: TCP port; ``None`` serves no HTTP endpoint, 0 picks a free one (tests).
    """

    host: str = "127.0.0.1"
    port: int | None = None


@dataclass(frozen=True)
class UpsamplingConfig:
    """Prompt upsampling (``flux2-encoder serve --upsampling``; docs/upsampling.md).

    Attributes:
        enabled: load the whole language model (all layers, ``lm_head``, vision tower) so
            ``Upsample`` can generate; the embedding path runs on the same weights.
        max_queued: ``Upsample`` requests waiting for the generator; more get
            RESOURCE_EXHAUSTED. One generation runs at a time (see encoder_server/upsampling.py).
        max_prompts_per_request: prompts in one ``Upsample`` call, generated as one batch
            (each holds a KV cache of up to 2048 + ``max_new_tokens`` tokens).
        max_new_tokens: tokens generated per prompt at most. 512 is the reference's; a lower
            cap bounds the cost, but then long answers differ from ``upsample_prompt``'s.
        max_per_user: ``Upsample`` calls one user may have queued or generating at once; more
            get RESOURCE_EXHAUSTED. 0 means automatic: a quarter of ``max_queued`` + 1 (at least 1)
            when an API key file names several users, no cap otherwise (as
            ``Limits.max_concurrent_calls_per_user`` shares the slots).
        max_images_per_prompt: reference images per prompt (I2I).
        max_image_bytes: encoded size of one image (PNG or JPEG).
        max_request_image_bytes: encoded size of every image of one request together. The default
            leaves room in one 4 MiB gRPC message (``Limits.max_receive_message_bytes``) for
            ``max_prompts_per_request`` prompts of ``Limits.max_prompt_chars`` characters.
        max_image_pixels: width x height of one image, read from its header before decoding
            (a decompression-bomb guard).
        max_request_image_pixels: width x height of every image of one request together, read from the
            headers: bounds the decoding work of one request. Each image is shrunk right after decoding
            to the area the model sees (768x768), so a queued or running request holds little.
        max_image_aspect_ratio: longer side / shorter side of one image at most; a thinner image would be
            resized to a side of 0 pixels by the pipeline's area cap.
        max_temperature: highest sampling temperature accepted (the reference's default is 0.15).
        min_deadline_ms: a shorter deadline cannot see a generation through; refused at once.
        timeout_s: the server's own deadline on one ``Upsample`` call (waiting and generating), for HTTP
            calls, which carry none, and gRPC calls with none or a longer one.
    """

    enabled: bool = False
    max_queued: int = 8
    max_prompts_per_request: int = 8
    max_new_tokens: int = 512
    max_per_user: int = 0
    max_images_per_prompt: int = 4
    max_image_bytes: int = 3 * 1024 * 1024
    max_request_image_bytes: int = 3 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_request_image_pixels: int = 2 * 4096 * 4096
    max_image_aspect_ratio: float = 32.0
    max_temperature: float = 5.0
    min_deadline_ms: int = 1000
    timeout_s: float = 300.0

    def per_user_share(self, users: int) -> int:
        """Calls one user may have queued or generating: ``max_per_user``, or the automatic share when 0."""
        return fair_share(self.max_queued + 1, self.max_per_user, users)


def fair_share(total: int, explicit: int, users: int) -> int:
    """What one user may hold of ``total`` (slots, generation places): ``explicit`` when set
    (> 0; more than ``total`` could never be used), else the automatic share.

    The automatic share is a quarter of the total when the keys file names several
    ``users`` (so at least four users always find room), and the whole total otherwise
    (with one user, or none, there is nobody to be fair to).
    """
    if explicit > 0:
        return min(explicit, total)
    if users > 1:
        return max(1, total // 4)
    return total


@dataclass(frozen=True)
class ModelConfig:
    """One model of a server that serves several (``--model NAME=SOURCE``).

    Attributes:
        name: what requests name it by (``EncodeRequest.model``, ``/models/NAME/predict``).
        source: hub id, local folder, ``demo`` or ``demo-klein``.
        dtype: its compute dtype; ``None``: the server's ``--dtype``.
        quantization: its quantization; ``None``: the server's ``--quantization``.
        compute: ``exact`` or ``packed``; ``None``: the server's ``--compute``.
    """

    name: str
    source: str
    dtype: str | None = None
    quantization: str | None = None
    compute: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``flux2-encoder serve`` needs.

    Attributes:
        model: hub id, local folder in the FLUX.2 layout, ``"demo"`` or ``"demo-klein"``
            (the one model, when ``models`` is empty).
        models: the models of a server that serves several; see :meth:`served_models`.
        revision: hub revision (branch, tag or commit) for hub ids.
        host: address to bind; loopback unless the operator opens it on purpose.
        port: TCP port; 0 picks a free one (tests).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: compute dtype name: ``bfloat16``, ``float16`` or ``float32``.
        quantization: ``none``, ``fp8`` or ``nf4`` (the latter two need CUDA).
        grace_period_s: how long SIGTERM waits for in-flight work before exiting.
        batching: dynamic batching and admission control.
        cache: in-memory and disk embedding caches.
        metrics_port: Prometheus exposition port; ``None`` serves no metrics.
        metrics_host: address the metrics port binds; loopback by default, because
            the exposition is unauthenticated and names users.
        auth: API keys and per-user limits.
        tls: TLS / mutual TLS files.
        http: the Hugging Face-compatible HTTP endpoint.
        upsampling: prompt upsampling (off by default).
    """

    model: str = DEFAULT_MODEL
    # Several models on one server; empty: just ``model``, named after it.
    models: tuple[ModelConfig, ...] = ()
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    dtype: str = "bfloat16"
    quantization: str = "none"
    # "exact": bit-exact with the reference; "packed": only real tokens run (faster, not bit-exact).
    compute: str = "exact"
    grace_period_s: float = 30.0
    limits: Limits = field(default_factory=Limits)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Prometheus text on http://METRICS_HOST:PORT/metrics; None: off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: ServerTLSConfig = field(default_factory=ServerTLSConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    upsampling: UpsamplingConfig = field(default_factory=UpsamplingConfig)

    def served_models(self) -> tuple[ModelConfig, ...]:
        """The models to serve: ``models``, or ``model`` alone under its default name."""
        return self.models or (ModelConfig(default_model_name(self.model), self.model),)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def default_model_name(source: str) -> str:
    """The name a model is served under when ``--model`` gives none: a hub id as it is
    (``black-forest-labs/FLUX.2-dev``), a folder by its last part, ``demo`` as ``demo``."""
    if os.path.isdir(source) or source.startswith((".", "/", "~")):
        return os.path.basename(os.path.normpath(os.path.expanduser(source))) or source
    return source
