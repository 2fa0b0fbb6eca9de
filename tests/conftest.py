"""Shared fixtures: tiny random FLUX.2 models built once per session, nothing downloaded."""

from __future__ import annotations

import itertools
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


@pytest.fixture()
def pixtral_processor_class():
    """transformers' PixtralProcessor class, importable without torchvision.

    The processor module imports torchvision at the top, for image work only;
    torchvision cannot be installed beside the CPU torch build here. Where it is
    missing, a stand-in module is present just while the class is imported and
    used for text; the class itself is transformers' own.
    """
    import importlib.util
    import sys
    import types

    pixtral_modules = (
        "transformers.models.pixtral.processing_pixtral",
        "transformers.models.pixtral.image_processing_pixtral",
    )
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        names = (
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.v2",
            "torchvision.transforms.v2.functional",
        )
        stubs = {name: types.ModuleType(name) for name in names}
        for parent, child in itertools.pairwise(names):
            setattr(stubs[parent], child.rsplit(".", 1)[1], stubs[child])
    saved = {name: sys.modules.pop(name) for name in (*stubs, *pixtral_modules) if name in sys.modules}
    sys.modules.update(stubs)
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor

        yield PixtralProcessor
    finally:
        for name in (*stubs, *pixtral_modules):
            sys.modules.pop(name, None)
        sys.modules.update(saved)
