"""Package extras: a workstation installs no server dependencies, a server no client ones.

Checked against the code itself: every import of an extra's package (at any
depth in a file) must sit in a layer that declares that extra.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# Distribution name -> the module it is imported as, where they differ.
IMPORT_NAME = {"pillow": "PIL", "prometheus-client": "prometheus_client", "grpcio-reflection": "grpc_reflection"}
# Code -> the extras it may use besides the core dependencies.
LAYERS = {
    "common": (),
    "encoder_server": ("server",),
    "dit_client": ("client",),
    "dit_client/training": ("client", "training"),
}


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _modules_of(extra: str) -> set[str]:
    return {IMPORT_NAME.get(d, d.replace("-", "_")) for d in map(_dist, EXTRAS[extra])}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    return max((layer for layer in LAYERS if rel.startswith(layer + "/")), key=len)


def test_the_extras_exist_and_the_core_holds_none_of_them():
    assert {"server", "client", "training", "test"} <= set(EXTRAS)
    core = set(map(_dist, PYPROJECT["project"]["dependencies"]))
    for extra in ("server", "client", "training"):
        assert not core & set(map(_dist, EXTRAS[extra])), extra
    assert {"aiohttp", "cryptography", "prometheus-client"} <= set(map(_dist, EXTRAS["server"]))
    assert "pillow" in set(map(_dist, EXTRAS["client"]))
    assert {"pyarrow", "datasets"} <= set(map(_dist, EXTRAS["training"]))


@pytest.mark.parametrize(
    "path",
    sorted(p for layer in ("common", "encoder_server", "dit_client") for p in (ROOT / layer).rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_code_imports_only_the_extras_of_its_layer(path):
    allowed = set().union(*(_modules_of(e) for e in LAYERS[_layer_of(path)])) if LAYERS[_layer_of(path)] else set()
    foreign = set().union(*(_modules_of(e) for e in ("server", "client", "training"))) - allowed
    assert not _imports(path) & foreign


def test_make_install_installs_every_extra():
    makefile = (ROOT / "Makefile").read_text()
    assert "-e '.[server,client,training,test]'" in makefile
    assert "$(STAMP): pyproject.toml Makefile" in makefile  # a changed extra reinstalls
