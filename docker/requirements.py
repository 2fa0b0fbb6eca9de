"""Print the requirements of flux2-remote's core and the given extras, one per line, from pyproject.toml.

The Dockerfiles install these before copying the code, so a code change
rebuilds only the last layers, not every dependency:

    python docker/requirements.py server > /tmp/requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    known = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in known]
    if unknown:
        raise SystemExit(f"requirements.py: no extra {', '.join(unknown)} in {pyproject}; known: {', '.join(known)}")
    return list(project["dependencies"]) + [r for e in extras for r in known[e]]


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(requirements(root / "pyproject.toml", sys.argv[1:])))
