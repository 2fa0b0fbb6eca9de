"""``make demo`` end to end, as a fresh machine runs it: empty cache, real subprocess server, a PNG out."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dit_client.demo import DEMO_SIZE

REPO = Path(__file__).resolve().parent.parent


def test_make_demo_writes_a_picture_and_stops_the_encoder(tmp_path):
    out = tmp_path / "demo.png"
    env = {**os.environ, "FLUX2_REMOTE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dit_client.demo", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
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
