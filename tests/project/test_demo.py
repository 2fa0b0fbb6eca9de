"""``make demo`` end to end, as a fresh machine runs it: empty cache, real subprocess server, a PNG out."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit_client.demo import DEMO_SIZE

# `make demo` and `make demo-klein` in processes: `make test-slow` (CI runs both).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_writes_a_picture_and_stops_the_encoder(tmp_path):
    out = tmp_path / "demo.png"
    env = {**os.environ, "FLUX2_REMOTE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dit_client.demo", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    stdout = proc.stdout
    assert "Traceback" not in proc.stderr
    # No alarming third-party noise for a newcomer (bitsandbytes' optional-kernel warning, seen on AVX512 CPUs).
    assert "Failed to load" not in proc.stderr + proc.stdout

    image = Image.open(out)
    assert image.format == "PNG" and image.size == (DEMO_SIZE, DEMO_SIZE)
    assert np.asarray(image).std() > 0
    assert f"picture: {out.resolve()}" in stdout
    assert "RANDOM" in stdout  # the demo says plainly that its weights are random
    assert (tmp_path / "cache").is_dir()  # built from nothing, in the cache it was pointed at

    # The background encoder was stopped: its port no longer accepts connections.
    port = int(re.search(r"encoder at 127\.0\.0\.1:(\d+)", stdout).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert "encoder stopped" in stdout


def test_make_demo_klein_serves_two_models_from_one_server(tmp_path):
    out = tmp_path / "demo-klein.png"
    env = {**os.environ, "FLUX2_REMOTE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dit_client.demo", "--klein", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    stdout = proc.stdout
    assert "Traceback" not in proc.stderr and "RANDOM" in stdout
    image = Image.open(out)
    assert image.size == (DEMO_SIZE, DEMO_SIZE) and np.asarray(image).std() > 0
    # One server, both models; the client chose 'klein' from the DiT's pipeline class by itself.
    assert "--model dev=demo --model klein=demo-klein) serves 2 models" in stdout
    assert re.search(r"^  dev +flux2-dev .* layers 10,20,30 of 40", stdout, re.M)
    assert re.search(r"^  klein +flux2-klein .* layers 9,18,27 of 36", stdout, re.M)
    assert "(Flux2KleinPipeline) used server model 'klein'" in stdout and "'dev' model answered too" in stdout
    port = int(re.search(r"encoder at 127\.0\.0\.1:(\d+)", stdout).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
