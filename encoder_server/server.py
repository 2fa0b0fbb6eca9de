"""Server wiring: gRPC server, health, reflection, options, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from common.config import ServerConfig
from common.protocol import SERVICE_NAME, pb2, pb2_grpc
from common.wire import dtype_to_wire
from encoder_server import __version__
from encoder_server.engine import EncodeEngine
from encoder_server.servicer import TextEncoderServicer
from encoder_server.text_encoder import DTYPES, EmbeddingBackend, load_backend
from encoder_server.validation import tolerant_deserializer

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
    ]


class TolerantDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Turns unparseable TextEncoder requests into INVALID_ARGUMENT instead of INTERNAL."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (
            handler is not None
            and handler_call_details.method.startswith(f"/{SERVICE_NAME}/")
            and handler.request_deserializer is not None
        ):
            handler = handler._replace(request_deserializer=tolerant_deserializer(handler.request_deserializer))
        return handler


def build_info(config: ServerConfig, backend: EmbeddingBackend, *, model_id: str, revision: str, demo: bool):
    spec = backend.spec
    limits = config.limits
    return pb2.GetInfoResponse(
        model_id=model_id,
        revision=revision,
        fingerprint=backend.fingerprint,
        hidden_states_layers=list(spec.hidden_states_layers),
        num_hidden_layers=getattr(backend, "num_hidden_layers", spec.computed_layers),
        computed_layers=spec.computed_layers,
        hidden_size=backend.hidden_size,
        embedding_dim=spec.embedding_dim(backend.hidden_size),
        max_sequence_length=spec.max_sequence_length,
        dtype=dtype_to_wire(backend.dtype),
        quantization=getattr(backend, "quantization", "none"),
        device=str(getattr(backend, "device", "cpu")),
        limits=pb2.ServerLimits(
            max_prompts_per_request=limits.max_prompts_per_request,
            max_prompt_chars=limits.max_prompt_chars,
            max_chunk_bytes=limits.max_chunk_bytes,
            max_in_flight_per_stream=limits.max_in_flight_per_stream,
        ),
        server_version=__version__,
        demo=demo,
        padding_side=getattr(backend, "padding_side", ""),
    )


@dataclass
class RunningServer:
    """A started server; ``port`` is the one actually bound (useful with port 0)."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    engine: EncodeEngine

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish within ``grace`` seconds, then stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.engine.close()


async def start_server(
    config: ServerConfig, backend: EmbeddingBackend, *, model_id: str = "", revision: str = "", demo: bool = False
) -> RunningServer:
    """Start serving ``backend`` on ``config.address``; returns once the port is bound."""
    engine = EncodeEngine(backend)
    info = build_info(config, backend, model_id=model_id, revision=revision, demo=demo)
    server = grpc.aio.server(interceptors=[TolerantDecodingInterceptor()], options=server_options(config))
    pb2_grpc.add_TextEncoderServicer_to_server(TextEncoderServicer(engine, info, config.limits), server)

    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    service_names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(service_names, server)

    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"could not bind {config.address}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health, engine)


async def serve(config: ServerConfig, *, on_ready=None) -> None:
    """Load the model, serve until SIGTERM/SIGINT, drain, exit. A second signal exits at once."""
    backend, source = load_backend(config)
    running = await start_server(config, backend, model_id=source.model_id, revision=source.revision, demo=source.demo)
    log.info(
        "serving %s (fingerprint %s) on %s:%d, %s %s%s",
        source.model_id, backend.fingerprint, config.host, running.port, backend.device,
        next(k for k, v in DTYPES.items() if v == backend.dtype),
        " [DEMO MODEL: random weights]" if source.demo else "",
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
            log.info("%s: draining in-flight work (up to %.0fs); send again to exit now",
                     signal.Signals(signum).name, config.grace_period_s)
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
