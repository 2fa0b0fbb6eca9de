"""Shared fixtures: tiny random FLUX.2 models built once per session, nothing downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common.demo import TinyFlux2Spec, build_tiny_flux2
from common.model_source import resolve_model
from tests.redis_server import redis_server  # noqa: F401 - a fixture: a real redis-server on a free port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete tiny FLUX.2 folder (left padding, like FLUX.2-dev's tokenizer)."""
    return build_tiny_flux2(tmp_path_factory.mktemp("tiny-flux2"), TinyFlux2Spec())


@pytest.fixture(scope="session")
def tiny_model_dir_right(tmp_path_factory):
    """Text encoder and tokenizer only, padding on the right."""
    return build_tiny_flux2(
        tmp_path_factory.mktemp("tiny-flux2-right"), TinyFlux2Spec(padding_side="right", seed=1, with_dit=False)
    )


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    """The truncated encoder on the tiny model, CPU, bfloat16 (FLUX.2-dev's dtype)."""
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


@pytest.fixture()
def server(tiny_backend):
    """An in-process server on a free loopback port; ``server.target`` is its address."""
    from tests.helpers import ServerThread

    with ServerThread(tiny_backend, model_id="tiny-test") as s:
        yield s


@pytest.fixture(scope="session", autouse=True)
def _pad_tables_in_a_temp_folder(tmp_path_factory):
    """Clients the tests start keep pad tables in a session folder, never in the user's cache."""
    root = tmp_path_factory.mktemp("pad-tables")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dit_client.pad_table.default_root", lambda: root)
        yield root
