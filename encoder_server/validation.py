"""Cheap checks on what clients send, with messages a person can act on.

These are step 4 of the request policy (encoder_server/admission.py): they run
for every transport before a request may take a slot or spend quota, and they
look only at the request itself (no model, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from common.config import Limits, UpsamplingConfig
from common.errors import DeadlineExceeded, InvalidRequest, PayloadTooLarge


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request protobuf could not parse (for example a prompt that is not UTF-8)."""

    reason: str
    request_id: str = ""


def tolerant_deserializer(deserialize):
    """Wrap a protobuf ``FromString`` so a bad message becomes an UndecodableRequest.

    gRPC would otherwise answer INTERNAL ("Exception deserializing request"),
    which blames the server for the client's bytes.
    """

    def wrapped(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as exc:
            return UndecodableRequest(
                f"request is not a valid protobuf message ({exc}); prompts must be valid UTF-8 strings"
            )

    return wrapped


def _not_unicode(text: str) -> int | None:
    """Index of the first character that cannot be encoded as UTF-8 (a lone surrogate), or ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def validate_request(
    prompts: list[str], limits: Limits, *, request_id: str = "", time_remaining_s: float | None = None
) -> list[str]:
    """Return ``prompts`` if the request respects ``limits``; raise naming the first problem.

    Args:
        prompts: the prompt texts as decoded by the transport.
        limits: the server's bounds.
        request_id: the id the client wants echoed (EncodeStream); bounded so an answer fits a message.
        time_remaining_s: the call's deadline in seconds from now, ``None`` when it has none.

    Raises:
        PayloadTooLarge: too many prompts, or a prompt too long (INVALID_ARGUMENT; HTTP 413).
        InvalidRequest: no prompt, a NUL or a lone surrogate in a prompt, a request_id too long.
        DeadlineExceeded: the deadline is too short for any forward pass to meet.
    """
    if len(request_id) > limits.max_request_id_chars:
        raise InvalidRequest(
            f"request_id has {len(request_id)} characters; the limit is {limits.max_request_id_chars} "
            "(it is echoed in every answer, so keep it short: a counter or a UUID)"
        )
    if time_remaining_s is not None and time_remaining_s * 1000 < limits.min_deadline_ms:
        raise DeadlineExceeded(
            f"deadline of {time_remaining_s * 1000:.1f} ms is too short: the server needs at least "
            f"{limits.min_deadline_ms} ms to start encoding"
        )
    if not prompts:
        raise InvalidRequest("no prompts in the request; send at least one (the empty string is a valid prompt)")
    if len(prompts) > limits.max_prompts_per_request:
        raise PayloadTooLarge(
            f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request} "
            "(split the list, or use EncodeStream for bulk work)"
        )
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            raise PayloadTooLarge(
                f"prompt {i} has {len(p)} characters; the limit is {limits.max_prompt_chars} "
                "(only the first 512 tokens are used anyway)"
            )
        if "\x00" in p:
            raise InvalidRequest(f"prompt {i} contains a NUL character")
        if (at := _not_unicode(p)) is not None:
            raise InvalidRequest(
                f"prompt {i} is not valid Unicode text: a lone surrogate (U+{ord(p[at]):04X}) at character {at}"
            )
    return prompts


DEFAULT_UPSAMPLE_TEMPERATURE = 0.15
"""``upsample_prompt``'s default temperature (and ``caption_upsample_temperature``'s recommended value)."""


@dataclass(frozen=True)
class UpsampleArgs:
    """What an ``Upsample`` request asks besides its prompts, as every transport hands it over.

    Attributes:
        images: ``None`` (or empty) for text-to-image, else one list of encoded PNG/JPEG files per prompt.
        temperature: the sampling temperature; ``None`` for the reference's default.
        seed: the seed of ``torch.manual_seed``; ``None`` draws one.
    """

    images: list[list[bytes]] | None = None
    temperature: float | None = None
    seed: int | None = None

    @classmethod
    def of(cls, request: Any) -> UpsampleArgs:
        """From a ``pb2.UpsampleRequest`` (gRPC), or ``request`` itself when it is one already (HTTP)."""
        if isinstance(request, cls):
            return request
        if request is None:
            return cls()
        return cls(
            images=[list(entry.images) for entry in request.images] or None,
            temperature=request.temperature if request.HasField("temperature") else None,
            seed=request.seed if request.HasField("seed") else None,
        )


def validate_upsample(
    prompts: list[str], args: UpsampleArgs, config: UpsamplingConfig, *, time_remaining_s: float | None = None
) -> UpsampleArgs:
    """The cheap checks of an ``Upsample`` request; returns ``args`` with the temperature to sample with.

    Only counts, sizes and numbers: the image headers are read later, by the upsampling service.

    Raises:
        PayloadTooLarge: too many prompts, images, or image bytes (INVALID_ARGUMENT; HTTP 413).
        InvalidRequest: a temperature outside ``(0, max_temperature]``, images for some prompts only, an empty image.
        DeadlineExceeded: a deadline under ``config.min_deadline_ms``.
    """
    c = config
    if len(prompts) > c.max_prompts_per_request:
        raise PayloadTooLarge(
            f"{len(prompts)} prompts in one Upsample call; the limit is {c.max_prompts_per_request} "
            "(they are generated as one batch)"
        )
    temperature = args.temperature
    if temperature is None:
        temperature = DEFAULT_UPSAMPLE_TEMPERATURE
    elif not (0 < temperature <= c.max_temperature):  # also refuses NaN
        raise InvalidRequest(
            f"temperature {temperature} is outside (0, {c.max_temperature}]; "
            f"{DEFAULT_UPSAMPLE_TEMPERATURE} is the reference's (low: close to the prompt, high: inventive)"
        )
    if time_remaining_s is not None and time_remaining_s * 1000 < c.min_deadline_ms:
        raise DeadlineExceeded(
            f"a deadline of {time_remaining_s * 1000:.0f} ms cannot see a generation through; upsampling takes "
            f"seconds, give it at least {c.min_deadline_ms} ms"
        )
    images = args.images or None
    if images is not None:
        if len(images) != len(prompts) or not all(images):
            raise InvalidRequest(
                f"{len(prompts)} prompts but {sum(1 for i in images if i)} with images: give every prompt at "
                "least one image (image-to-image), or none (text-to-image), in one call"
            )
        total = 0
        for i, blobs in enumerate(images):
            if len(blobs) > c.max_images_per_prompt:
                raise PayloadTooLarge(f"prompt {i} has {len(blobs)} images; the limit is {c.max_images_per_prompt}")
            for j, blob in enumerate(blobs):
                if not blob:
                    raise InvalidRequest(f"image {j} of prompt {i} is empty; send PNG or JPEG bytes")
                if len(blob) > c.max_image_bytes:
                    raise PayloadTooLarge(
                        f"image {j} of prompt {i} is {len(blob)} bytes; the limit is {c.max_image_bytes}"
                    )
                total += len(blob)
        if total > c.max_request_image_bytes:
            raise PayloadTooLarge(
                f"the images of this request are {total} bytes together; the limit is {c.max_request_image_bytes} "
                "(send fewer or smaller images: the model sees at most 768x768 pixels of each prompt's images)"
            )
    return UpsampleArgs(images, temperature, args.seed)
