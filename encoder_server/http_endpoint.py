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

The endpoint calls the same engines as gRPC, on the same event loop, so it
shares batching, the caches, API keys and per-user limits. ``/predict`` is
FLUX.2-dev's; every served model, [klein] included, is also at
``/models/NAME/predict`` with the same body and answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import socket

import grpc
import torch
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from common.config import Limits, UpsamplingConfig
from common.errors import (
    Cancelled,
    DeadlineExceeded,
    Flux2RemoteError,
    InvalidRequest,
    PayloadTooLarge,
    UpsamplingUnavailable,
    http_status_of,
    status_of,
)
from encoder_server.admission import HTTP_PREDICT, HTTP_UPSAMPLE, Admission, Method
from encoder_server.identity import ANONYMOUS, current_user
from encoder_server.models import DEV_FAMILY, ModelRegistry
from encoder_server.validation import UpsampleArgs

log = logging.getLogger(__name__)

# What the hosted endpoint answers with, whatever the compute dtype.
RESPONSE_DTYPE = torch.bfloat16
# The body is written in pieces of this size, each within the write timeout.
_WRITE_CHUNK_BYTES = 1 << 20


class ModelNotServed(Flux2RemoteError):
    """The path names no model this server serves there (HTTP 404)."""

    code = grpc.StatusCode.NOT_FOUND


class BodyTimeout(DeadlineExceeded):
    """The request body did not arrive within ``Limits.body_timeout_s`` (HTTP 408)."""

    http_status = 408


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


def max_upsample_body_bytes(limits: Limits, upsampling: UpsamplingConfig) -> int:
    """Largest ``POST /upsample`` body: its prompts as :func:`max_body_bytes` counts them, plus every
    image a request may carry in base64 (4 characters per 3 bytes) with its JSON quotes and commas."""
    prompts = upsampling.max_prompts_per_request * limits.max_prompt_chars * 6
    images = 4 * -(-upsampling.max_request_image_bytes // 3)
    separators = 4 * upsampling.max_prompts_per_request * (upsampling.max_images_per_prompt + 1)
    return prompts + images + separators + 64 * 1024


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status, headers=headers)


def _error_response(exc: Flux2RemoteError) -> web.Response:
    code, message = status_of(exc)
    status = http_status_of(exc)
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="flux2-encoder"'
    return _error(status, message, code.name, headers)


def parse_prompts(body: object, limits: Limits) -> list[str]:
    """The prompts of a decoded ``{"prompt": str | list[str]}`` body (shape and types only).

    Counts, lengths and text are checked by the request policy's validation
    step, the same one gRPC requests pass. The prompt count is bounded here
    too, before a list of millions is copied.

    Raises:
        InvalidRequest: wrong shape or types (HTTP 400).
        PayloadTooLarge: more prompts than a request may hold (HTTP 413).
    """
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object {"prompt": str | list[str]}')
    unknown = sorted(set(body) - {"prompt"})
    if unknown:
        raise InvalidRequest(f'unknown field(s) {", ".join(map(repr, unknown))}; the body takes only "prompt"')
    if "prompt" not in body:
        raise InvalidRequest('missing "prompt": send {"prompt": "text"} or {"prompt": ["text", ...]}')
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest('"prompt" must be a string or a list of strings')
    if len(prompts) > limits.max_prompts_per_request:
        raise PayloadTooLarge(f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request}")
    return prompts


def parse_upsample(body: object, limits: Limits) -> tuple[list[str], UpsampleArgs]:
    """The prompts and the rest of a decoded ``POST /upsample`` body (shape and types only).

    ``{"prompt": str | [str], "temperature"?: number, "seed"?: int, "images"?: [[base64, ...], ...]}``,
    the images one list per prompt, each a base64 PNG or JPEG file. The values are checked by the
    request policy's validation step, as gRPC's are.

    Raises:
        InvalidRequest: wrong shape or types, text that is not base64 (HTTP 400).
        PayloadTooLarge: more prompts than a request may hold (HTTP 413).
    """
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object {"prompt": str | list[str], ...}')
    unknown = sorted(set(body) - {"prompt", "temperature", "seed", "images"})
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; the body takes prompt, temperature, seed, images"
        )
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest('"prompt" must be a string or a list of strings')
    if len(prompts) > limits.max_prompts_per_request:
        raise PayloadTooLarge(f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request}")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise InvalidRequest('"temperature" must be a number')
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise InvalidRequest('"seed" must be an integer in [0, 2**64)')
    images = body.get("images")
    decoded = None
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(i, list) for i in images):
            raise InvalidRequest('"images" must be one list of base64 PNG/JPEG strings per prompt')
        try:
            decoded = [[base64.b64decode(b, validate=True) for b in entry] for entry in images]
        except (binascii.Error, TypeError, ValueError):
            raise InvalidRequest('"images" holds a value that is not base64 text') from None
    return prompts, UpsampleArgs(decoded, None if temperature is None else float(temperature), seed)


class AccessLogger(AbstractAccessLogger):
    """One line per request, without the query string: a key pasted into a URL must never reach a log."""

    def log(self, request, response, time):
        self.logger.info("%s %s %s %d %.3fs", request.remote, request.method, request.path, response.status, time)


class HTTPEndpoint:
    """aiohttp application serving ``POST /predict`` and ``GET /health`` on the server's event loop.

    Every request passes the server's one request policy (encoder_server/admission.py)
    in its order; between the rate limit and validation this endpoint reads the
    body, within ``Limits.body_timeout_s``, so a slow sender holds no slot.

    Args:
        engine: the engine gRPC uses.
        admission: the request policy gRPC uses.
        fingerprint: sent back in the ``X-Flux2-Fingerprint`` header.
        ssl_context: TLS (and mutual TLS) policy; ``None`` for plain HTTP.
    """

    def __init__(self, models: ModelRegistry, admission: Admission, *, ssl_context=None, upsampling=None):
        self._models = models
        self._upsampling = upsampling  # an encoder_server.upsampling.UpsampleService, or None
        self._admission = admission
        self._limits = admission.limits
        self._ssl_context = ssl_context
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

        # The larger of the two bodies; each route then holds its own to its limit (_read_json).
        self._upsample_body_bytes = max_upsample_body_bytes(self._limits, admission.upsampling)
        self.app = web.Application(client_max_size=max(max_body_bytes(self._limits), self._upsample_body_bytes))
        self.app.router.add_post("/predict", self._predict)
        self.app.router.add_route("*", "/predict", self._wrong_method)
        # Model names may be hub ids, with a '/'.
        self.app.router.add_post("/models/{name:.+}/predict", self._predict)
        self.app.router.add_route("*", "/models/{name:.+}/predict", self._wrong_method)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_post("/upsample", self._upsample)
        self.app.router.add_post("/models/{name:.+}/upsample", self._upsample)

    async def start(self, sock: socket.socket) -> int:
        """Serve on ``sock``, bound before the model loaded (encoder_server/ports.py); returns its port."""
        # handler_cancellation: a client that hangs up cancels its request, so
        # the engine can drop the work before it reaches the model.
        # shutdown_timeout: the server drains through the policy; cleanup need not wait again.
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=1.0, access_log_class=AccessLogger
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self._ssl_context).start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close the port. The server calls this once the policy has drained (new requests got 503 meanwhile)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers --------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self._admission.closing:
            return web.json_response({"status": "NOT_SERVING"}, status=503)
        return web.json_response({"status": "SERVING"})

    async def _wrong_method(self, request: web.Request) -> web.Response:
        return _error(
            405,
            f'{request.method} /predict is not served; send POST /predict with {{"prompt": "text"}}',
            grpc.StatusCode.INVALID_ARGUMENT.name,
            {"Allow": "POST"},
        )

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, HTTP_PREDICT, self._predict_admitted)

    async def _upsample(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, HTTP_UPSAMPLE, self._upsample_admitted)

    async def _answer(self, request: web.Request, method: Method, handle) -> web.StreamResponse:
        """Run ``handle`` for one request: counted until answered, every refusal a JSON error."""
        tracker = self._admission.track()
        # Reset per request: aiohttp may run several keep-alive requests in one context.
        user_token = current_user.set(ANONYMOUS)
        try:
            return await handle(request)
        except Flux2RemoteError as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                log.info("POST %s from %s (user %s): %s", request.path, request.remote, current_user.get(), exc)
            return _error_response(exc)
        except Exception:
            log.exception("%s failed", method.name)
            return _error(500, "internal error; see the server log", grpc.StatusCode.INTERNAL.name)
        finally:
            current_user.reset(user_token)
            tracker.done()

    async def _admit(self, request: web.Request, method: Method, parse, *, body_limit: int):
        """Steps 1-6 for one HTTP request of at most ``body_limit`` bytes; ``parse(body)`` gives
        ``(prompts, the transport's request object)``. Returns the ticket."""
        admission = self._admission
        # 1-2. Draining, then who is calling (before reading a body a stranger may have sent).
        if request.query_string:
            exc = InvalidRequest(
                f"POST {request.path} takes no query parameters; an API key goes in the 'Authorization: Bearer KEY' "
                "header, never in the URL (URLs end up in logs)"
            )
            admission.refused(method, ANONYMOUS, exc)
            raise exc
        user = admission.admit_call(method, request.headers.getall("Authorization", []))
        current_user.set(user)
        # 3. The rate, before the body costs anything.
        await admission.admit_rate(method, user)
        try:
            name = self._model_of(request)
            body = await self._read_json(request, body_limit)
            prompts, parsed = parse(body)
        except Flux2RemoteError as exc:
            admission.refused(method, user, exc)
            raise
        # 4-6. Validation, slots, quota.
        return await admission.admit_request(method, user, prompts, request=parsed, model=name, rate_checked=True)

    async def _upsample_admitted(self, request: web.Request) -> web.Response:
        """``POST /upsample``: ``{"prompt": str | [str], "temperature"?: float, "seed"?: int,
        "images"?: [[base64 PNG/JPEG, ...] per prompt]}`` -> ``{"upsampled": [str], "seed": int, ...}``."""
        ticket = await self._admit(
            request,
            HTTP_UPSAMPLE,
            lambda body: parse_upsample(body, self._limits),
            body_limit=self._upsample_body_bytes,
        )
        try:
            with ticket.charging():
                if self._upsampling is None:
                    raise UpsamplingUnavailable("the server was started without --upsampling")
                # No client deadline over HTTP: the service holds the call to --upsampling-timeout.
                outcome = await self._upsampling.upsample(
                    ticket.model, ticket.prompts, ticket.upsample or UpsampleArgs(), user=ticket.user, deadline=None
                )
            batch = outcome.batch
            return web.json_response(
                {
                    "upsampled": batch.texts,
                    "seed": batch.seed,
                    "temperature": outcome.temperature,
                    "generated_tokens": batch.generated_tokens,
                    "fingerprint": outcome.fingerprint,
                }
            )
        finally:
            ticket.release()

    async def _predict_admitted(self, request: web.Request) -> web.StreamResponse:
        ticket = await self._admit(
            request,
            HTTP_PREDICT,
            lambda body: (parse_prompts(body, self._limits), None),
            body_limit=max_body_bytes(self._limits),
        )
        user = ticket.user
        try:
            model = self._models.get(ticket.model)
            with ticket.charging():
                results = await model.engine.encode(ticket.prompts, user=user)
            # Serialise off the loop: torch.save of 15 MiB per prompt takes tens of ms.
            payload = await asyncio.to_thread(embeddings_to_torch_save, [r.embedding for r in results])
            return await self._send(request, payload, [r.cache_hit for r in results], user, model.backend.fingerprint)
        finally:
            ticket.release()

    def _model_of(self, request: web.Request) -> str:
        """The model a path names: ``/models/NAME/predict``, or [dev]'s for the hosted endpoint's ``/predict``."""
        name = request.match_info.get("name")
        if name is not None:
            if name not in self._models.names:
                raise ModelNotServed(
                    f"this server serves no model named {name!r}; it serves: {', '.join(self._models.names)}"
                )
            return name
        dev = self._models.first_of_family(DEV_FAMILY)
        if dev is None:
            others = ", ".join(f"/models/{n}/predict" for n in self._models.names)
            raise ModelNotServed(
                f"POST /predict is the FLUX.2-dev endpoint and this server serves no FLUX.2-dev model; use {others}"
            )
        return dev.name

    async def _read_json(self, request: web.Request, limit: int) -> object:
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"the body has {request.content_length} bytes; the limit is {limit}")
        try:
            raw = await asyncio.wait_for(request.read(), self._limits.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes") from None
        except ConnectionError:
            # The client hung up mid-body: nothing to answer, and no server error to log.
            raise Cancelled("the client closed the connection before sending the whole body") from None
        except TimeoutError:
            raise BodyTimeout(
                f"the request body did not arrive within {self._limits.body_timeout_s:.0f} s; send it at once"
            ) from None
        if len(raw) > limit:  # a chunked body, read up to the larger route's limit
            raise PayloadTooLarge(f"the body has {len(raw)} bytes; the limit is {limit}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequest(f'the body is not valid JSON ({exc}); send {{"prompt": "text"}}') from None

    async def _send(self, request: web.Request, payload: bytes, cache_hits: list[bool], user: str, fingerprint: str):
        """Write the answer while the request still holds its slot, each piece within the write timeout."""
        response = web.StreamResponse(
            headers={
                "X-Flux2-Fingerprint": fingerprint,
                "X-Flux2-Cache-Hits": ",".join("1" if hit else "0" for hit in cache_hits),
            }
        )
        response.content_type = "application/octet-stream"
        response.content_length = len(payload)
        self._admission.metrics.response_bytes.labels(transport="http").inc(len(payload))
        timeout = self._limits.write_timeout_s
        view = memoryview(payload)
        try:
            await asyncio.wait_for(response.prepare(request), timeout)
            for offset in range(0, len(payload), _WRITE_CHUNK_BYTES):
                await asyncio.wait_for(response.write(view[offset : offset + _WRITE_CHUNK_BYTES]), timeout)
            await asyncio.wait_for(response.write_eof(), timeout)
        except TimeoutError:
            self._admission.write_timed_out(HTTP_PREDICT, user)
            if request.transport is not None:
                request.transport.abort()  # drop what is buffered for a client that does not read
        return response
