"""Checks on what clients send, with messages a person can act on."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from common.config import Limits
from common.errors import InvalidRequest


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request protobuf could not parse (for example a prompt that is not UTF-8)."""

    reason: str


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


def validate_prompts(prompts: list[str], limits: Limits) -> list[str]:
    """Return ``prompts`` if they respect ``limits``; raise InvalidRequest naming the first problem."""
    if not prompts:
        raise InvalidRequest("no prompts in the request; send at least one (the empty string is a valid prompt)")
    if len(prompts) > limits.max_prompts_per_request:
        raise InvalidRequest(
            f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts_per_request} "
            "(split the list, or use EncodeStream for bulk work)"
        )
    for i, p in enumerate(prompts):
        if len(p) > limits.max_prompt_chars:
            raise InvalidRequest(
                f"prompt {i} has {len(p)} characters; the limit is {limits.max_prompt_chars} "
                "(only the first 512 tokens are used anyway)"
            )
        if "\x00" in p:
            raise InvalidRequest(f"prompt {i} contains a NUL character")
    return prompts
