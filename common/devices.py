"""``resolve_device``: the one reading of a ``--device`` value, for both sides."""

from __future__ import annotations

import torch


class DeviceUnavailable(ValueError):
    """A device name torch does not know, or a CUDA device on a machine without CUDA."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when torch sees one, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device.

    Raises:
        DeviceUnavailable: an unknown name, CUDA asked for without CUDA, or
            ``cuda:N`` past the number of GPUs torch sees.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceUnavailable(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"--device {device} was asked for, but torch sees no CUDA device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailable(f"--device {device}: torch sees {count} CUDA device(s), numbered 0..{count - 1}")
    return dev
