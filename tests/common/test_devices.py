"""``common.devices.resolve_device``: the one reading of --device for both sides."""

from __future__ import annotations

import pytest
import torch

from common.devices import DeviceUnavailable, resolve_device


def test_auto_follows_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize(
    "name,says",
    [
        ("warp", "unknown device 'warp'"),
        ("meta", "not supported"),
        ("cuda", "torch sees no CUDA device"),
        ("cuda:1", "torch sees no CUDA device"),
    ],
)
def test_refusals_without_cuda(name, says, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match=says):
        resolve_device(name)


def test_a_gpu_index_past_the_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceUnavailable, match="numbered 0..1"):
        resolve_device("cuda:2")
