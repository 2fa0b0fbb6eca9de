"""The habits `make lint` and `make types` cannot check alone: each silenced finding says why, and the
pre-commit hooks run what `make test` runs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TREES = ("common", "encoder_server", "dit_client", "benchmarks", "tests")
# A silencer names what it silences, then gives a reason: "# noqa: F401 - re-exported",
# "# type: ignore[attr-defined]  # hidden by lazy imports".
SILENCER = re.compile(
    r"#\s*(noqa|type:\s*ignore)(?P<codes>:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*|\[[a-z\-, ]+\])?(?P<rest>.*)$"
)


def silencers_without_reason(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each ``noqa`` / ``type: ignore`` that names no code or gives no reason."""
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        found = SILENCER.search(line)
        if found is None:
            continue
        reason = found["rest"].strip(" -#():—")
        if not found["codes"] or len(reason) < 8:
            bad.append((number, line.strip()))
    return bad


def test_every_noqa_and_type_ignore_names_its_code_and_its_reason():
    bad = [
        f"{path.relative_to(ROOT)}:{number}: {line}"
        for tree in TREES
        for path in sorted((ROOT / tree).rglob("*.py"))
        for number, line in silencers_without_reason(path.read_text())
    ]
    assert not bad, "give each silenced finding its code and a reason on the same line:\n" + "\n".join(bad)


def test_the_reason_check_can_fail():
    noqa, ignore = "# " + "noqa", "# " + "type: ignore"  # split, so this file's own check passes
    bare = [f"import x  {noqa}", f"import y  {noqa}: F401", f"z = 1  {ignore}", f"z = 1  {ignore}[misc]  # ok"]
    assert silencers_without_reason("\n".join(bare)) == [(1, bare[0]), (2, bare[1]), (3, bare[2]), (4, bare[3])]
    assert silencers_without_reason(f"import y  {noqa}: F401 - re-exported for callers\n") == []


def test_pre_commit_runs_what_make_lint_and_make_types_run():
    hooks = [
        hook
        for repo in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
        for hook in repo["hooks"]
    ]
    entries = {hook["entry"].removeprefix(".venv/bin/").replace(" --force-exclude", "") for hook in hooks}
    makefile = (ROOT / "Makefile").read_text()
    make_commands = set(re.findall(r"^\t\$\(BIN\)/((?:ruff|mypy)\b.*)$", makefile, re.M))
    checks = {c for c in make_commands if "--fix" not in c and c != "ruff format ."}
    assert entries == {c.removesuffix(" .") for c in checks}
    assert re.search(r"^test: install lint types$", makefile, re.M), "make test must run lint and types"
