"""The GPU benchmark scripts run end to end in their --dry-run mode (tiny configs, on the CPU).

A GPU is lent for minutes at a time; a script that breaks on the first line
would waste the loan. These runs check the logic, not the figures. The soak
benchmark's dry run (a real server for a few seconds, memory cache on and off)
is here for the same reason: its real runs take minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each runs a benchmark script in a process: `make test-slow` (CI runs both).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_encoder_dry_run_is_bit_exact_in_bf16_and_nf4():
    out = run_script("benchmarks/gpu_encoder.py", "--dry-run", "--batches", "1", "--repeats", "1", "--models", "dev")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "truncated (30 layers)" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["bf16", "nf4"]
    assert all(row.rstrip(" |").endswith("yes") for row in rows), rows


def test_gpu_encoder_dry_run_klein_is_bit_exact_in_bf16_and_nf4():
    # FLUX.2 [klein]'s Qwen3 encoder, against Flux2KleinPipeline._get_qwen3_prompt_embeds, the same way.
    out = run_script(
        "benchmarks/gpu_encoder.py", "--dry-run", "--batches", "1", "--repeats", "1", "--models", "klein-4b"
    )
    klein = [line for line in out.splitlines() if line.startswith("| ") and "klein-4b truncated (27 layers)" in line]
    assert [row.split("|")[1].strip() for row in klein] == ["bf16", "nf4"]
    assert all(row.rstrip(" |").endswith("yes") for row in klein), klein


def test_gpu_encoder_upsampling_dry_run_equals_upsample_prompt():
    out = run_script("benchmarks/gpu_encoder.py", "--upsampling", "--dry-run", "--batches", "1", "2")
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2"]
    assert all(row.rstrip(" |").endswith("yes") for row in rows), rows
    assert all(int(row.split("|")[3]) > 0 for row in rows)  # tokens were generated and counted


def test_gpu_client_dry_run_times_the_steps():
    out = run_script("benchmarks/gpu_client.py", "--dry-run")
    assert "s_per_step" in out and "nf4_linear_layers" in out


def test_soak_dry_run_serves_with_the_memory_cache_on_and_off():
    out = run_script("benchmarks/soak.py", "--dry-run")
    assert "| | 1 MiB | off |" in out, out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["errors"].split("|")[2:4] == [" 0 ", " 0 "], rows["errors"]
    assert int(rows["requests"].split("|")[2]) > 0 and int(rows["requests"].split("|")[3]) > 0
    assert "RSS over time, memory cache off" in out


def test_replicas_dry_run_balances_recovers_and_times_both_hit_tiers():
    out = run_script("benchmarks/replicas.py", "--dry-run")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    throughput = [r for r in rows if r[0].strip() in ("1", "2") and r[-1].strip().isdigit()]
    assert [r[0].strip() for r in throughput] == ["1", "2"] and all(r[-1].strip() == "0" for r in throughput)
    hits = {r[0].strip(): r for r in rows if "cache" in r[0]}
    assert set(hits) == {"shared cache (Redis)", "local memory cache"}
    assert all(int(r[3]) > 0 for r in hits.values()), hits  # each tier really answered
    (recovery,) = [r for r in rows if r[-1].strip().endswith("ms") and r[-2].strip().endswith(" s")]
    assert recovery[1].strip() == "0", recovery  # no request failed across the kill


def test_multi_model_dry_run_compares_one_server_with_two():
    out = run_script("benchmarks/multi_model.py", "--dry-run")
    assert "one: flux2-encoder serve --model dev=demo --model klein=demo-klein" in out
    assert "two: flux2-encoder serve --model demo " in out and "; flux2-encoder serve --model demo-klein " in out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    for setup, processes in (("one", "1"), ("two", "2")):
        cells = [c.strip() for c in rows[setup]]
        assert cells[2] == processes and float(cells[3]) > 0  # RSS ready
        assert float(cells[5]) > 0 and float(cells[6]) > 0 and cells[10] == "0"  # both models answered, no errors


def test_wire_elision_dry_run_rebuilds_bit_exact_and_sends_only_real_rows():
    out = run_script("benchmarks/wire.py", "--elision", "--dry-run")
    assert "Every rebuilt embedding bit-identical to the server's: yes." in out, out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert {"short", "model_card", "structured", "captions", "all"} <= set(rows)
    whole, elided = rows["`elide=False` (whole)"], rows["default (elided)"]
    assert float(elided[4]) < float(whole[4])  # total bytes received, all prompts
    timed = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith(("| full |", "| elided |"))]
    assert timed == ["full", "elided", "full", "elided"]  # at the median and the p90 prompt


def test_cache_size_measures_compact_entries_smaller_and_rebuilds_them():
    out = run_script("benchmarks/cache_size.py", "--dim", "48", "--repeats", "1")
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    for name in ("median", "p90"):
        whole, compact = (int(rows[name][i].strip(" B").replace(",", "")) for i in (3, 4))
        assert compact < whole, rows[name]
