"""Figures and code the docs give a newcomer agree with each other and with the installed diffusers."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def test_code_examples_use_dtype_not_the_deprecated_torch_dtype():
    import inspect

    from diffusers.utils import deprecation_utils

    # The premise: diffusers deprecates torch_dtype in favour of dtype.
    assert "torch_dtype" in inspect.getsource(deprecation_utils._resolve_dtype)
    for doc in DOCS:
        for block in _code_blocks(doc.read_text()):
            assert "torch_dtype=" not in block, f"{doc.name} still passes torch_dtype= in a code example"


def _bf16_gb(text: str, pattern: str) -> float:
    match = re.search(pattern, text, flags=re.S)
    assert match, pattern
    return float(match.group(1))


def test_encoder_gpu_memory_agrees_between_readme_dockerfile_and_memory_doc():
    memory = (ROOT / "docs/memory.md").read_text()
    weights = _bf16_gb(memory, r"\| truncated \(30 layers\), bf16 \| [\d.]+B \| ([\d.]+) \|")
    readme = _bf16_gb((ROOT / "README.md").read_text(), r"~(\d+) GB free for bf16")
    dockerfile = _bf16_gb((ROOT / "docker/Dockerfile.encoder").read_text(), r"~(\d+) GB free in bf16")
    assert readme == dockerfile
    # weights of layers 1-30 plus activations and the CUDA context: a little above the weights
    assert weights < readme < weights + 4


def test_compose_does_not_promise_a_full_48_gb_download():
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "download (~48 GB)" not in compose
    assert "layers 1-30" in compose
