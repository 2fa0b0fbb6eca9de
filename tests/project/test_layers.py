"""The packages import downward only: common below both sides, and the two sides never import each other.

What each side may import inside itself is checked closer to it (the client's
layers: tests/dit_client/test_client_layers.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Package -> the project packages it may import (besides itself).
ALLOWED = {
    "common": {"proto"},
    "encoder_server": {"common", "proto"},
    "dit_client": {"common", "proto"},
}
PROJECT = {*ALLOWED, "proto"}


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level project packages ``path`` imports (function-level imports too) -> first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT:
                found.setdefault(top, node.lineno)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for top, line in imported_packages(path).items()
        if top != package and top not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from encoder_server.engine import EncoderEngine\n")
    assert imported_packages(bad) == {"encoder_server": 2}
