"""``POST /predict``: the protocol of the hosted FLUX.2 remote text encoder, for existing clients.

Request: JSON ``{"prompt": str | list[str]}`` with ``Authorization: Bearer KEY``.
Answer: the bytes of ``torch.save(tensor)`` for a bfloat16 tensor
``[B, 512, embedding_dim]`` (``[B, 512, 15360]`` for FLUX.2-dev), which those
clients read with ``torch.load(io.BytesIO(body), weights_only=True)``.

That body is a pickle. It is produced here only because diffusers'
``Flux2RemoteTextEncoderStep``, the FLUX.2 DreamBooth LoRA script and community
nodes cannot read anything else; flux2-remote's own clients use gRPC with raw
bytes and never unpickle anything. The server only writes pickles, never reads
one. See docs/hf-compatible-endpoint.md.

The endpoint calls the same :class:`EncodeEngine` as gRPC, on the same event
loop, so it shares batching, the cache, API keys and per-user limits.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math

import grpc
import torch
from aiohttp import web

from common.config import Limits
from common.errors import EncoderOverloaded, EncoderUnavailable, Flux2RemoteError, InvalidRequest, status_of
from encoder_server.auth import Authenticator, UsageLimiter
from encoder_server.engine import EncodeEngine
from encoder_server.identity import ANONYMOUS, current_user
from encoder_server.validation import validate_prompts

log = logging.getLogger(__name__)

# What the hosted endpoint answers with, whatever the compute dtype.
RESPONSE_DTYPE = torch.bfloat16

# The standard gRPC -> HTTP mapping (google.rpc.Code), applied to the status
# that common/errors.py gives each error.
HTTP_STATUS_OF_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class PayloadTooLarge(InvalidRequest):
    """The body, the prompt list or a prompt is over the server's limits (HTTP 413)."""


def embeddings_to_torch_save(embeddings: list[torch.Tensor]) -> bytes:
    """``torch.save`` bytes of ``stack(embeddings)`` as bfloat16 ``[B, L, D]``, as the hosted endpoint sends.

    Stacking makes a fresh contiguous tensor, so the file holds exactly these
    ``B * L * D`` values and no other storage the embeddings might be views of.
    """
    stacked = torch.stack([e.to(RESPONSE_DTYPE) for e in embeddings]).contiguous()
    buffer = io.BytesIO()
    torch.save(stacked, buffer)
    return buffer.getvalue()


def max_body_bytes(limits: Limits) -> int:
    """Largest request body accepted: every prompt at full length, JSON-escaped at worst (``\\uXXXX``), plus slack."""
    return limits.max_prompts_per_request * limits.max_prompt_chars * 6 + 64 * 1024


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status, headers=headers)


def _error_response(exc: Flux2RemoteError) -> web.Response:
    code, message = status_of(exc)
    status = 413 if isinstance(exc, PayloadTooLarge) else HTTP_STATUS_OF_GRPC.get(code, 500)
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="flux2-encoder"'
    return _error(status, message, code.name, headers)


def parse_prompts(body: object, limits: Limits) -> list[str]:
    """The prompts of a decoded ``{"prompt": str | list[str]}`` body, checked against ``limits``.

    Raises:
        InvalidRequest: wrong shape or types (HTTP 400).
        PayloadTooLarge: too many prompts or a prompt too long (HTTP 413).
    """
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object {"prompt": str | list[str]}')
    unknown = sorted(set(body) - {"prompt"})
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; the body takes only \"prompt\"")
    if "prompt" not in body:
        raise InvalidRequest('missing "prompt": send {"prompt": "text"} or {"prompt": ["text", ...]}')
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest('"prompt" must be a string or a list of strings')
    if len(prompts) > limits.max_prompts_per_request:
        raise PayloadTooLarge(
            f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request}"
        )
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            raise PayloadTooLarge(
                f"prompt {i} has {len(p)} characters; the limit is {limits.max_prompt_chars} "
                "(only the first 512 tokens are used anyway)"
            )
    return validate_prompts(prompts, limits)


class HTTPEndpoint:
    """aiohttp application serving ``POST /predict`` and ``GET /health`` on the server's event loop.

    Args:
        engine: the engine gRPC uses.
        authenticator, limiter: shared with the gRPC interceptor.
        limits: request bounds (prompts per request, characters per prompt).
        fingerprint: sent back in the ``X-Flux2-Fingerprint`` header.
        ssl_context: TLS (and mutual TLS) policy; ``None`` for plain HTTP.
    """

    def __init__(
        self,
        engine: EncodeEngine,
        *,
        authenticator: Authenticator,
        limiter: UsageLimiter,
        limits: Limits,
        fingerprint: str,
        ssl_context=None,
    ):
        self._engine = engine
        self._authenticator = authenticator
        self._limiter = limiter
        self._limits = limits
        self._fingerprint = fingerprint
        self._ssl_context = ssl_context
        self._shutting_down = False
        self._in_flight: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

        self.app = web.Application(client_max_size=max_body_bytes(limits))
        self.app.router.add_post("/predict", self._predict)
        self.app.router.add_get("/health", self._health)

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0 picks a free port) and serve; returns the bound port."""
        # handler_cancellation: a client that hangs up cancels its request, so
        # the engine can drop the work before it reaches the model.
        # shutdown_timeout: stop() drains on its own; cleanup need not wait again.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        return self.port

    def begin_shutdown(self) -> None:
        """Answer new requests with 503 from now on; requests already running go on."""
        self._shutting_down = True

    async def stop(self, grace: float | None) -> None:
        """Let running requests finish within ``grace`` seconds (``None``: wait for them), then close."""
        self.begin_shutdown()
        if self._in_flight and grace != 0:
            await asyncio.wait(set(self._in_flight), timeout=grace)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self._shutting_down:
            return web.json_response({"status": "NOT_SERVING"}, status=503)
        return web.json_response({"status": "SERVING"})

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        if self._shutting_down:
            self._engine.metrics.count_request("HTTP /predict", grpc.StatusCode.UNAVAILABLE.name, ANONYMOUS)
            return _error_response(EncoderUnavailable("the server is shutting down; retry on another replica or later"))
        if len(self._in_flight) >= self._limits.max_concurrent_calls:
            self._engine.metrics.count_request("HTTP /predict", grpc.StatusCode.RESOURCE_EXHAUSTED.name, ANONYMOUS)
            return _error_response(EncoderOverloaded(
                f"the encoder is serving {len(self._in_flight)} HTTP requests at once, its limit "
                "(--max-concurrent-calls); retry in a moment",
                retry_after_s=1.0,
            ))
        task = asyncio.current_task()
        self._in_flight.add(task)
        # Reset per request: aiohttp may run several keep-alive requests in one context.
        user_token = current_user.set(ANONYMOUS)
        status = grpc.StatusCode.OK
        try:
            return await self._predict_checked(request)
        except Flux2RemoteError as exc:
            status = exc.code
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                log.info("POST /predict from %s (user %s): %s", request.remote, current_user.get(), exc)
            return _error_response(exc)
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED  # the client hung up
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            log.exception("POST /predict failed")
            return _error(500, "internal error; see the server log", grpc.StatusCode.INTERNAL.name)
        finally:
            # Counted beside the gRPC methods, so one query covers every way in.
            self._engine.metrics.count_request("HTTP /predict", status.name, current_user.get())
            current_user.reset(user_token)
            self._in_flight.discard(task)

    async def _predict_checked(self, request: web.Request) -> web.Response:
        # 1. Who is calling (before reading a body a stranger may have sent).
        user = self._authenticator.authenticate(request.headers.get("Authorization"))
        current_user.set(user)

        # 2. Read and check the body.
        limit = max_body_bytes(self._limits)
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the body has {request.content_length} bytes; the limit is {limit}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes") from None
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequest(f'the body is not valid JSON ({exc}); send {{"prompt": "text"}}') from None
        prompts = parse_prompts(body, self._limits)

        # 3. Per-user limits, then the shared engine.
        self._limiter.admit(user, len(prompts))
        results = await self._engine.encode(prompts, user=user)

        # 4. Serialise off the loop: torch.save of 15 MiB per prompt takes tens of ms.
        payload = await asyncio.to_thread(embeddings_to_torch_save, [r.embedding for r in results])
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={
                "X-Flux2-Fingerprint": self._fingerprint,
                "X-Flux2-Cache-Hits": ",".join("1" if r.cache_hit else "0" for r in results),
            },
        )
