"""Server wiring: gRPC server, health, reflection, options, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from common.config import ServerConfig
from common.protocol import SERVICE_NAME, pb2, pb2_grpc
from encoder_server import __version__
from encoder_server.admission import Admission, resolve_cache_scope
from encoder_server.auth import Authenticator, KeyStore
from encoder_server.cluster import ClusterLimits, RedisLink, SharedCache
from encoder_server.engine import EncodeEngine
from encoder_server.http_endpoint import HTTPEndpoint
from encoder_server.interceptor import PolicyInterceptor
from encoder_server.metrics import EncoderMetrics, MetricsEndpoint
from encoder_server.models import ModelRegistry, ServedModel, config_for, model_configs, served_pad_table
from encoder_server.ports import describe_bind_error, listen_socket
from encoder_server.servicer import TextEncoderServicer
from encoder_server.text_encoder import DTYPES, EmbeddingBackend, load_backend
from encoder_server.tls import ServerTLS, load_server_tls
from encoder_server.upsampling import Upsampler, UpsampleService, upsampler_for_backend
from encoder_server.usage import UsageLimiter

log = logging.getLogger(__name__)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Every channel option the server sets, in one visible list."""
    limits = config.limits
    return [
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        # A response message is one chunk plus its header.
        ("grpc.max_send_message_length", limits.max_chunk_bytes + 64 * 1024),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Reconnect clients now and then so a load balancer can spread them
        # over replicas (gRPC balances connections, not requests).
        ("grpc.max_connection_age_ms", 30 * 60_000),
        ("grpc.max_connection_age_grace_ms", 60_000),
        # Never share a port with another process: two servers on one port
        # would each get some of the connections (and maybe another model).
        ("grpc.so_reuseport", 0),
    ]


def build_info(
    config: ServerConfig,
    registry: ModelRegistry,
    admission: Admission,
    *,
    cache_scope: str,
    upsampling: UpsampleService | None = None,
):
    """What GetInfo answers, but for the per-model fields (the servicer fills those per request)."""
    limits = config.limits
    info = pb2.GetInfoResponse(
        limits=pb2.ServerLimits(
            max_prompts_per_request=limits.max_prompts_per_request,
            max_prompt_chars=limits.max_prompt_chars,
            max_chunk_bytes=limits.max_chunk_bytes,
            max_in_flight_per_stream=limits.max_in_flight_per_stream,
            max_concurrent_calls=limits.max_concurrent_calls,
            max_concurrent_calls_per_user=admission.max_calls_per_user,
            write_timeout_ms=round(limits.write_timeout_s * 1000),
            max_request_id_chars=limits.max_request_id_chars,
        ),
        server_version=__version__,
        cache_scope=cache_scope,
        models=[m.info() for m in registry],
    )
    if upsampling is not None:
        upsampling.limits(info.limits)
        for model in info.models:
            upsampling.describe(model)
    return info


@dataclass(frozen=True)
class Security:
    """Keys, per-user limits and TLS, read and checked once (before the model loads)."""

    authenticator: Authenticator
    limiter: UsageLimiter
    tls: ServerTLS | None


def load_security(config: ServerConfig) -> Security:
    """Read the keys file and TLS files named in ``config``; raises a ConfigError subclass naming the problem."""
    keys = KeyStore.from_file(config.auth.api_key_file) if config.auth.api_key_file else None
    return Security(Authenticator(keys), UsageLimiter.from_config(config.auth), load_server_tls(config.tls))


@dataclass
class RunningServer:
    """A started server; ``port`` is the one actually bound (useful with port 0)."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    models: ModelRegistry
    admission: Admission
    metrics: EncoderMetrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    http: HTTPEndpoint | None = None
    link: RedisLink | None = None
    upsampling: UpsampleService | None = field(default=None, init=False)
    _usage_saver: asyncio.Task | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.limiter.state_file is not None:
            self._usage_saver = asyncio.get_running_loop().create_task(_save_usage_every(self.limiter, 5.0))

    @property
    def limiter(self) -> UsageLimiter:
        return self.admission.limiter

    @property
    def engine(self) -> EncodeEngine:
        """The engine of the first model (the only one, on a one-model server)."""
        return next(iter(self.models)).engine

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new work, let running work finish within ``grace`` seconds, then stop.

        Only TextEncoder calls and HTTP requests are waited for; health
        watchers and reflection streams, which never end on their own, are
        closed once that work is done. The HTTP port stays open until then,
        answering 503, so HTTP callers learn the server is draining instead of
        meeting a closed port.
        """
        await self.health.enter_graceful_shutdown()
        self.admission.close()  # new gRPC calls get UNAVAILABLE, new HTTP requests 503, from here on
        drained = await self.admission.wait_idle(grace)
        if drained:
            await self.admission.wait_quiet(_QUIET_S, _QUIET_AT_MOST_S)
        elif grace:
            log.warning("grace period over with call(s) still running; cutting them off")
        if self.http is not None:
            await self.http.stop()
        # One stop only: overlapping grpc.aio stop() calls crashed the process
        # (segfault inside grpc's shutdown) about one run in three.
        await self.server.stop(0)
        if self.upsampling is not None:
            self.upsampling.close()
        self.models.close()
        if self._usage_saver is not None:
            self._usage_saver.cancel()
            await _save_usage(self.limiter)  # what was counted up to the very end
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
        if self.link is not None:
            await self.link.close()


# Before the ports close, wait for a moment without new calls, so late callers
# get UNAVAILABLE ("retry elsewhere") rather than gRPC's CANCELLED; bounded so
# a client hammering a stopping server cannot hold it up.
_QUIET_S = 0.1
_QUIET_AT_MOST_S = 2.0


async def _save_usage(limiter: UsageLimiter) -> None:
    try:
        await asyncio.to_thread(limiter.save)
    except OSError as exc:  # a full disk must not stop the serving; the next try may work
        log.error("cannot write the usage file %s: %s", limiter.state_file, exc)


async def _save_usage_every(limiter: UsageLimiter, period_s: float) -> None:
    """Keep the daily quota counts on disk, so a crash loses at most ``period_s`` of them."""
    while True:
        await asyncio.sleep(period_s)
        await _save_usage(limiter)


@dataclass
class Listeners:
    """Everything that needs no model, set up and bound before it loads.

    ``port`` is the gRPC port actually bound (useful with port 0).
    """

    security: Security
    metrics: EncoderMetrics
    admission: Admission
    server: grpc.aio.Server
    port: int
    http_socket: socket.socket | None
    metrics_endpoint: MetricsEndpoint | None
    link: RedisLink | None = None

    async def close(self) -> None:
        """Release every port (start-up failed before serving)."""
        await self.server.stop(0)
        if self.link is not None:
            await self.link.close()
        if self.http_socket is not None:
            self.http_socket.close()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()


def _bind_grpc(server: grpc.aio.Server, config: ServerConfig, tls: ServerTLS | None) -> int:
    if config.port != 0:
        # Our own bind first, for an error that says why; gRPC's only says it failed.
        listen_socket(config.host, config.port, "--port").close()
    try:
        if tls is not None:
            port = server.add_secure_port(config.address, tls.grpc_credentials())
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise describe_bind_error(config.host, config.port, "--port")
    return port


async def bind_listeners(
    config: ServerConfig, security: Security | None = None, model_names: list[str] | None = None
) -> Listeners:
    """Read keys and TLS, build the request policy and bind every port; no model needed.

    Raises a ConfigError subclass for a bad keys or TLS file and
    :class:`~encoder_server.ports.PortInUse` naming the port and its flag.
    """
    security = security or load_security(config)
    metrics = EncoderMetrics()
    link = None
    cluster_limits = None
    if config.cache.shared_url:
        link = RedisLink(config.cache.shared_url, metrics=metrics)
        metrics.bind_gauge(metrics.shared_cache_up, lambda: float(link.up))
        cluster_limits = ClusterLimits(
            link, requests_per_minute=config.auth.rate_limit_rpm, prompts_per_day=config.auth.quota_prompts_per_day
        )
    if model_names is None:
        model_names = [m.name for m in model_configs(config)]
    admission = Admission(
        security.authenticator,
        security.limiter,
        config.limits,
        metrics,
        cluster_limits,
        model_names=model_names,
        upsampling=config.upsampling,
    )
    server = grpc.aio.server(interceptors=[PolicyInterceptor(admission)], options=server_options(config))
    http_socket = metrics_socket = None
    try:
        port = _bind_grpc(server, config, security.tls)
        if config.http.port is not None:
            http_socket = listen_socket(config.http.host, config.http.port, "--http-port")
        if config.metrics_port is not None:
            metrics_socket = listen_socket(config.metrics_host, config.metrics_port, "--metrics-port")
    except OSError:
        for sock in (http_socket, metrics_socket):
            if sock is not None:
                sock.close()
        await server.stop(0)
        raise
    metrics_endpoint = None
    if metrics_socket is not None:
        metrics_endpoint = MetricsEndpoint(metrics, metrics_socket)
        await metrics_endpoint.start()
    return Listeners(security, metrics, admission, server, port, http_socket, metrics_endpoint, link)


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded for serving, before its engine exists."""

    name: str
    backend: EmbeddingBackend
    model_id: str = ""
    revision: str = ""
    demo: bool = False
    pad_table: torch.Tensor | None = None


def load_models(config: ServerConfig) -> list[LoadedModel]:
    """Load every model ``config`` names, each with its own dtype and quantization, and its pad table."""
    loaded = []
    for model in model_configs(config):
        backend, source = load_backend(config_for(config, model))
        loaded.append(
            LoadedModel(model.name, backend, source.model_id, source.revision, source.demo, served_pad_table(backend))
        )
    return loaded


async def start_server(
    config: ServerConfig,
    backend: EmbeddingBackend | None = None,
    *,
    models: list[LoadedModel] | None = None,
    model_id: str = "",
    revision: str = "",
    demo: bool = False,
    security: Security | None = None,
    listeners: Listeners | None = None,
    upsamplers: dict[str, Upsampler | str] | None = None,
) -> RunningServer:
    """Start serving ``models`` (or the one ``backend``); returns once every port is serving.

    ``listeners`` are the ports :func:`bind_listeners` bound before the model
    loaded; without them they are bound here. ``upsamplers`` (per model name, an
    :class:`~encoder_server.upsampling.Upsampler` or why there is none) replaces
    what ``config.upsampling`` would build from the backends.
    """
    if models is None:
        if backend is None:
            raise ValueError("start_server needs a backend or models")
        models = [LoadedModel(config.served_models()[0].name, backend, model_id, revision, demo)]
    listeners = listeners or await bind_listeners(config, security, [m.name for m in models])
    security, metrics, admission, server = listeners.security, listeners.metrics, listeners.admission, listeners.server
    cache_scope = resolve_cache_scope(config.cache.scope, security.authenticator)
    shared_cache = SharedCache(listeners.link) if listeners.link is not None else None
    caches = EncodeEngine.caches_from_config(config)  # one bound for every model
    registry = ModelRegistry(
        [
            ServedModel(
                m.name,
                m.backend,
                EncodeEngine.from_config(
                    config,
                    m.backend,
                    caches=caches,
                    metrics=metrics,
                    cache_scope=cache_scope,
                    shared_cache=shared_cache,
                    pad_table=m.pad_table,
                ),
                m.model_id,
                m.revision,
                m.demo,
                m.pad_table,
            )
            for m in models
        ]
    )
    if upsamplers is None:
        upsamplers = {m.name: upsampler_for_backend(m.backend, config.upsampling) for m in models}
    upsampling = UpsampleService(upsamplers, config.upsampling, metrics, users=admission.authenticator.users)
    info = build_info(config, registry, admission, cache_scope=cache_scope, upsampling=upsampling)
    pb2_grpc.add_TextEncoderServicer_to_server(
        TextEncoderServicer(registry, info, config.limits, metrics, upsampling), server
    )

    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    service_names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(service_names, server)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    http = None
    if listeners.http_socket is not None:
        http = HTTPEndpoint(
            registry,
            admission,
            ssl_context=security.tls.ssl_context() if security.tls is not None else None,
            upsampling=upsampling,
        )
        await http.start(listeners.http_socket)
    running = RunningServer(
        server, listeners.port, health, registry, admission, metrics, listeners.metrics_endpoint, http, listeners.link
    )
    running.upsampling = upsampling
    return running


_LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


async def serve(config: ServerConfig, *, on_ready=None) -> None:
    """Load the model, serve until SIGTERM/SIGINT, drain, exit. A second signal exits at once."""
    security = load_security(config)  # a bad keys or TLS file fails before minutes of loading weights
    if config.host not in _LOOPBACK and not security.authenticator.required:
        log.warning("listening on %s without --api-key-file: anyone who can reach the port may use it", config.host)
    if config.auth.quota_prompts_per_day and config.auth.usage_file is None:
        log.warning("daily quota counts are kept in memory only: a restart resets them (see --usage-file)")
    if config.http.port is not None and config.http.host not in _LOOPBACK and not security.authenticator.required:
        log.warning(
            "HTTP /predict on %s without --api-key-file: anyone who can reach the port may use it", config.http.host
        )
    listeners = await bind_listeners(config, security)  # a port clash fails now, not after loading the weights
    try:
        models = load_models(config)
    except BaseException:
        await listeners.close()
        raise
    running = await start_server(config, models=models, listeners=listeners)
    for m in running.models:
        log.info(
            "serving %s as %r (%s, fingerprint %s) on %s:%d, %s %s%s",
            m.model_id,
            m.name,
            m.family,
            m.backend.fingerprint,
            config.host,
            running.port,
            m.backend.device,
            next(k for k, v in DTYPES.items() if v == m.backend.dtype),
            " [DEMO MODEL: random weights]" if m.demo else "",
        )
    log.info(
        "%s; %s; %s",
        ("mutual TLS" if security.tls.mutual else "TLS") if security.tls else "plaintext (no TLS)",
        "API keys required" if security.authenticator.required else "no API keys (every caller is 'anonymous')",
        f"HTTP /predict on {config.http.host}:{running.http.port}" if running.http else "no HTTP endpoint",
    )
    admission = running.admission
    if running.engine.cache_scope == "shared" and security.authenticator.users > 1:
        log.warning(
            "cache scope 'shared': the %d users share cached embeddings and running computations, so any of "
            "them can learn whether a prompt was sent by another (a cache hit, or a faster answer); "
            "--cache-scope user keeps each user's apart (docs/security.md)",
            security.authenticator.users,
        )
    else:
        log.info(
            "cache scope '%s'; up to %d calls at once, %d per user; answers not read within %.0f s are cancelled",
            running.engine.cache_scope,
            admission.max_calls,
            admission.max_calls_per_user,
            config.limits.write_timeout_s,
        )
    if on_ready is not None:
        on_ready(running)

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info(
                "%s: draining in-flight work (up to %.0fs); send again to exit now",
                signal.Signals(signum).name,
                config.grace_period_s,
            )
            stop_requested.set()
        else:
            log.warning("second signal: exiting without waiting")
            import os

            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop_requested.wait()
    await running.stop(config.grace_period_s)
    log.info("stopped")
