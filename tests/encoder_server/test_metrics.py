"""Prometheus metrics: the /metrics endpoint, the series the issue names, one registry per server."""

from __future__ import annotations

import threading
import urllib.request
from dataclasses import replace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import CacheConfig, ServerConfig
from common.errors import InvalidRequest, NotCached
from common.protocol import pb2, pb2_grpc
from dit_client.remote import RemoteTextEncoder
from encoder_server.cache import ENTRY_OVERHEAD_BYTES
from tests.encoder_server.test_engine import FakeBackend
from tests.helpers import ServerThread, run_async, running_engine


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` read over HTTP, as Prometheus would."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_reports_what_happened(tiny_backend):
    config = replace(ServerConfig(metrics_port=0), cache=CacheConfig(memory_mb=16))
    prompts = ["metrics fox", "metrics owl"]
    with ServerThread(tiny_backend, config) as server, RemoteTextEncoder(server.target) as enc:
        endpoint = server.running.metrics_endpoint
        assert endpoint is not None and endpoint.port > 0
        assert endpoint.host == "127.0.0.1"  # loopback unless --metrics-host says otherwise
        enc.encode(prompts)
        enc.encode(prompts)  # both from the memory cache
        with pytest.raises(NotCached):
            enc.encode(["never seen"], cache_only=True)
        with pytest.raises(InvalidRequest):
            enc.encode(["bad\x00prompt"])
        samples = scrape(endpoint.port)

    assert value(samples, "flux2_encoder_prompts_computed_total") == 2
    assert value(samples, "flux2_encoder_requests_total", method="Encode", status="OK", user="anonymous") == 2
    assert value(samples, "flux2_encoder_requests_total", method="Encode", status="NOT_FOUND", user="anonymous") == 1
    assert (
        value(samples, "flux2_encoder_requests_total", method="Encode", status="INVALID_ARGUMENT", user="anonymous")
        == 1
    )
    assert value(samples, "flux2_encoder_prompts_served_total", user="anonymous", source="computed") == 2
    assert value(samples, "flux2_encoder_prompts_served_total", user="anonymous", source="cache_memory") == 2
    assert value(samples, "flux2_encoder_cache_hits_total", tier="memory") == 2
    assert value(samples, "flux2_encoder_cache_misses_total") == 3  # two computed, one cache_only miss
    # Two bf16 [512, 48] entries, each counted with the objects around it (encoder_server/cache.py).
    assert value(samples, "flux2_encoder_cache_bytes", tier="memory") == 2 * (512 * 48 * 2 + ENTRY_OVERHEAD_BYTES)
    assert value(samples, "flux2_encoder_cache_entries", tier="memory") == 2
    assert value(samples, "flux2_encoder_queue_size") == 0
    assert value(samples, "flux2_encoder_batch_size_sum") == 2
    assert value(samples, "flux2_encoder_batch_tokens_sum") == 2 * 512
    batches = value(samples, "flux2_encoder_batch_size_count")
    assert batches >= 1
    for stage in ("tokenize", "inference"):
        assert value(samples, f"flux2_encoder_{stage}_duration_seconds_count") == batches
        assert value(samples, f"flux2_encoder_{stage}_duration_seconds_sum") > 0
    assert value(samples, "flux2_encoder_queue_duration_seconds_count") == 2


def test_identical_concurrent_prompts_count_one_computation():
    backend = FakeBackend()
    config = replace(ServerConfig(metrics_port=0), cache=CacheConfig(memory_mb=0))
    with ServerThread(backend, config) as server:
        backend.hold()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb2_grpc.TextEncoderStub(channel)
            blocker = stub.Encode(pb2.EncodeRequest(prompts=["blocker"]), timeout=30)  # starts the call
            assert backend.started.wait(10)
            replies: list[list] = []
            threads = [
                threading.Thread(
                    target=lambda: replies.append(list(stub.Encode(pb2.EncodeRequest(prompts=["same"]), timeout=30)))
                )
                for _ in range(8)
            ]
            for t in threads:
                t.start()
            metrics = server.running.metrics
            for _ in range(500):  # until all 8 calls reached the engine (each counts a miss, then joins at once)
                if metrics.sample("flux2_encoder_cache_misses_total") == 9:
                    break
                threading.Event().wait(0.02)
            assert server.running.engine.queued == 1  # one queued prompt for eight calls
            backend.release()
            list(blocker)
            for t in threads:
                t.join(30)
        samples = scrape(server.running.metrics_endpoint.port)
    assert len(replies) == 8
    assert backend.computed == ["blocker", "same"]
    assert value(samples, "flux2_encoder_prompts_computed_total") == 2
    assert value(samples, "flux2_encoder_prompts_served_total", user="anonymous", source="shared") == 7


def test_each_server_has_its_own_registry(tiny_backend):
    config = ServerConfig(metrics_port=0)
    with ServerThread(tiny_backend, config) as busy, ServerThread(tiny_backend, config) as idle:
        with RemoteTextEncoder(busy.target) as enc:
            enc.encode(["only on the busy server"])
        busy_samples = scrape(busy.running.metrics_endpoint.port)
        idle_samples = scrape(idle.running.metrics_endpoint.port)
    assert value(busy_samples, "flux2_encoder_prompts_computed_total") == 1
    assert value(idle_samples, "flux2_encoder_prompts_computed_total") == 0


def test_no_metrics_port_serves_no_metrics(tiny_backend):
    with ServerThread(tiny_backend) as server:
        assert server.running.metrics_endpoint is None


def test_users_label_the_prompt_counters():
    backend = FakeBackend()

    async def main():
        async with running_engine(backend) as engine:
            await engine.encode(["x"], user="alice")
            await engine.encode(["y", "z"], user="bob")
            return engine.metrics

    metrics = run_async(main())
    assert metrics.sample("flux2_encoder_prompts_served_total", {"user": "alice", "source": "computed"}) == 1
    assert metrics.sample("flux2_encoder_prompts_served_total", {"user": "bob", "source": "computed"}) == 2
    text = metrics.exposition().decode()
    assert 'flux2_encoder_prompts_served_total{source="computed",user="bob"} 2.0' in text
    assert "flux2_encoder_prompts_computed_total 3.0" in text
