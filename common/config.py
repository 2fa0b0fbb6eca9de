"""The one typed configuration of the encoder server.

Built once (by the CLI from flags, or by tests directly) and passed down
explicitly; nothing reads settings from the environment at import time.
"""

from __future__ import annotations

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
    # A deadline shorter than this cannot be met by any forward pass; refuse
    # it at once instead of queueing work nobody will read.
    min_deadline_ms: int = 5
    max_receive_message_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``flux2-encoder serve`` needs.

    Attributes:
        model: hub id, local folder in the FLUX.2 layout, or ``"demo"``.
        revision: hub revision (branch, tag or commit) for hub ids.
        host: address to bind; loopback unless the operator opens it on purpose.
        port: TCP port; 0 picks a free one (tests).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: compute dtype name: ``bfloat16``, ``float16`` or ``float32``.
        quantization: ``none``, ``fp8`` or ``nf4`` (the latter two need CUDA).
        grace_period_s: how long SIGTERM waits for in-flight work before exiting.
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    dtype: str = "bfloat16"
    quantization: str = "none"
    grace_period_s: float = 30.0
    limits: Limits = field(default_factory=Limits)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
