"""Replicas sharing one Redis: embeddings, compute-once and per-user limits span them all.

Real servers on loopback and a real redis-server (tests/redis_server.py); the
server falls back to local state, never to a failed request, when Redis is
killed or stops answering.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from common.config import AuthConfig, CacheConfig, ServerConfig
from common.errors import EncoderOverloaded, NotCached
from dit_client.remote import RemoteTextEncoder
from encoder_server.cache import cache_key, decode_entry
from encoder_server.cluster import RedisLink, SharedCache
from encoder_server.metrics import EncoderMetrics
from tests.helpers import GatedBackend, Serialized, ServerThread, wait_until

ALICE = "alice-key-0123456789abcdef"


def computed(*servers: ServerThread) -> float:
    return sum(s.running.metrics.sample("flux2_encoder_prompts_computed_total") for s in servers)


def waits_on_a_lease(server: ServerThread) -> threading.Event:
    """An event set once ``server`` starts waiting for another replica's lease on a prompt."""
    shared = server.running.engine.shared_cache
    waiting = threading.Event()
    real_wait_for = shared.wait_for

    async def wait_for(key, deadline):
        waiting.set()
        return await real_wait_for(key, deadline)

    shared.wait_for = wait_for
    return waiting


def replica_config(url: str, **auth) -> ServerConfig:
    return ServerConfig(cache=CacheConfig(shared_url=url, memory_mb=64), auth=AuthConfig(**auth))


@pytest.fixture()
def two_replicas(tiny_backend, redis_server):
    config = replica_config(redis_server.url)
    with ServerThread(Serialized(tiny_backend), config) as a, ServerThread(Serialized(tiny_backend), config) as b:
        yield a, b


def test_a_prompt_computed_on_one_replica_is_a_hit_on_another(two_replicas):
    a, b = two_replicas
    with RemoteTextEncoder(a.target) as on_a, RemoteTextEncoder(b.target) as on_b:
        first, meta_a = on_a.encode_with_metadata(["a red fox"])
        second, meta_b = on_b.encode_with_metadata(["a red fox"])
        assert not meta_a[0].cache_hit and meta_b[0].cache_hit
        assert torch.equal(first, second)
        # cache_only on a third look: B's memory now, and the shared entry for anyone.
        assert torch.equal(on_b.encode(["a red fox"], cache_only=True), first)
        with pytest.raises(NotCached):
            on_b.encode(["never sent"], cache_only=True)
    assert computed(a, b) == 1
    assert b.running.metrics.sample("flux2_encoder_cache_hits_total", {"tier": "shared"}) == 1


def test_concurrent_identical_prompts_on_two_replicas_are_computed_once(tiny_backend, redis_server):
    gated = GatedBackend(tiny_backend)
    config = replica_config(redis_server.url)
    with ServerThread(gated, config) as a, ServerThread(Serialized(tiny_backend), config) as b:
        results = {}

        def encode(name, server):
            with RemoteTextEncoder(server.target, timeout=60) as enc:
                results[name] = enc.encode(["the same prompt"])

        b_waits = waits_on_a_lease(b)
        on_a = threading.Thread(target=encode, args=("a", a))
        on_a.start()
        wait_until(lambda: gated.seen, what="A to take the lease and compute (held at the gate)")
        on_b = threading.Thread(target=encode, args=("b", b))
        on_b.start()
        assert b_waits.wait(30), "B never waited on A's lease"  # and does not compute (the counts below)
        gated.gate.set()
        on_a.join(60)
        on_b.join(60)
        assert torch.equal(results["a"], results["b"])
        assert computed(a, b) == 1


def test_a_dead_replicas_lease_expires_and_another_computes(two_replicas, redis_server):
    a, _ = two_replicas
    fingerprint = a.running.engine.backend.fingerprint
    key = cache_key(fingerprint, "orphaned prompt")
    # A replica that took the lease and died: nobody will ever write the entry.
    redis_server.client().set(f"flux2:lease:{key}", "dead-replica", px=600)
    t0 = time.monotonic()
    with RemoteTextEncoder(a.target, timeout=60) as enc:
        assert enc.encode(["orphaned prompt"]).shape[:2] == (1, 512)
    assert time.monotonic() - t0 >= 0.5  # it waited for the lease, then computed
    assert computed(a) == 1


def test_a_damaged_shared_entry_is_never_served(two_replicas, redis_server):
    a, b = two_replicas
    with RemoteTextEncoder(a.target) as on_a:
        good = on_a.encode(["checked on read"])
    key = cache_key(a.running.engine.backend.fingerprint, "checked on read")
    client = redis_server.client()
    data = bytearray(client.get(f"flux2:emb:{key}"))
    data[-5] ^= 0x01  # one flipped bit in the tensor bytes
    client.set(f"flux2:emb:{key}", bytes(data))
    with RemoteTextEncoder(b.target) as on_b:
        again, meta = on_b.encode_with_metadata(["checked on read"])
    assert torch.equal(again, good) and not meta[0].cache_hit
    assert b.running.metrics.sample("flux2_encoder_cache_corrupt_total") == 1
    assert computed(a, b) == 2


def test_daily_quota_and_rate_hold_across_replicas(tiny_backend, redis_server, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{ALICE}\n")
    keys.chmod(0o600)
    config = replica_config(redis_server.url, api_key_file=str(keys), quota_prompts_per_day=3, rate_limit_rpm=4)
    with ServerThread(Serialized(tiny_backend), config) as a, ServerThread(Serialized(tiny_backend), config) as b:
        with RemoteTextEncoder(a.target, api_key=ALICE) as on_a, RemoteTextEncoder(b.target, api_key=ALICE) as on_b:
            on_a.encode(["one", "two"])
            with pytest.raises(EncoderOverloaded, match="used 2 of 3 prompts today"):
                on_b.encode(["three", "four"])  # B knows what A counted
            with pytest.raises(NotCached):
                on_b.encode(["never sent"], cache_only=True)  # refused: gives its prompt back
            on_b.encode(["three"])
            # Four requests so far (refused ones count for the rate), against 4 per minute on both replicas.
            with pytest.raises(EncoderOverloaded, match="4 requests per minute"):
                on_a.encode(["five"])


def test_with_redis_killed_every_replica_keeps_serving(two_replicas, redis_server, caplog):
    a, b = two_replicas
    redis_server.kill()
    with RemoteTextEncoder(a.target, timeout=30) as on_a, RemoteTextEncoder(b.target, timeout=30) as on_b:
        for i in range(3):
            assert on_a.encode([f"no redis {i}"]).shape[0] == 1
            assert on_b.encode([f"no redis {i}"]).shape[0] == 1
    assert a.running.metrics.sample("flux2_encoder_shared_cache_errors_total") >= 1
    assert a.running.metrics.sample("flux2_encoder_shared_cache_up") == 0
    assert "shared state at" in caplog.text and "unavailable" in caplog.text


def test_a_redis_that_stops_answering_costs_a_timeout_once_not_every_request(two_replicas, redis_server):
    a, _ = two_replicas
    with redis_server.paused(), RemoteTextEncoder(a.target, timeout=30) as enc:
        t0 = time.monotonic()
        enc.encode(["stalled redis"])
        first = time.monotonic() - t0
        t0 = time.monotonic()
        for i in range(3):
            enc.encode([f"stalled redis {i}"])
        later = (time.monotonic() - t0) / 3
    assert a.running.metrics.sample("flux2_encoder_shared_cache_errors_total") >= 1
    # The link is marked down after the first timeout, so the next requests do not wait for Redis.
    assert later < max(first, 0.25)


def test_a_live_holder_renews_its_lease_so_a_long_computation_is_not_done_twice(tiny_backend, redis_server):
    gated = GatedBackend(tiny_backend)
    config = replica_config(redis_server.url)
    with ServerThread(gated, config) as a, ServerThread(Serialized(tiny_backend), config) as b:
        for server in (a, b):
            server.running.engine.shared_cache.lease_ms = 300  # expires three times over while A computes
        results = {}

        def encode(name, server):
            with RemoteTextEncoder(server.target, timeout=60) as enc:
                results[name] = enc.encode(["a long computation"])

        b_waits = waits_on_a_lease(b)
        on_a = threading.Thread(target=encode, args=("a", a))
        on_a.start()
        wait_until(lambda: gated.seen, what="A to take the lease and compute (held at the gate)")
        on_b = threading.Thread(target=encode, args=("b", b))
        on_b.start()
        assert b_waits.wait(30), "B never waited on A's lease"
        # Time passing is the behaviour under test: four lease lengths, after which B would have
        # taken the lease and computed had A not renewed it.
        time.sleep(1.2)
        gated.gate.set()
        on_a.join(60)
        on_b.join(60)
        assert torch.equal(results["a"], results["b"])
        assert computed(a, b) == 1


def test_shared_entries_keep_only_real_rows_and_are_rebuilt_bit_for_bit(tiny_backend, redis_server):
    """With a pad table, what one replica puts in Redis is the real rows (pad count and table id
    in its metadata, a CRC-32C over it all); another replica serves it bit for bit, whole to an
    old client and elided to one that holds the table; damaged, it is dropped and counted."""
    config = replica_config(redis_server.url)
    prompt = "a compact fox shared by replicas"
    expected = tiny_backend.encode([prompt])
    n = expected.token_counts[0]
    with (
        ServerThread(Serialized(tiny_backend), config, pad_table=True) as a,
        ServerThread(Serialized(tiny_backend), config, pad_table=True) as b,
    ):
        with RemoteTextEncoder(a.target, elide=False) as on_a, RemoteTextEncoder(b.target, elide=False) as on_b:
            first = on_a.encode([prompt])
            second, meta = on_b.encode_with_metadata([prompt])
        assert meta[0].cache_hit and torch.equal(first, expected.embeddings) and torch.equal(second, first)
        assert b.running.metrics.sample("flux2_encoder_cache_hits_total", {"tier": "shared"}) == 1
        with RemoteTextEncoder(b.target) as elided:
            again, meta = elided.encode_with_metadata([prompt])
        assert torch.equal(again, expected.embeddings) and meta[0].pad_rows_elided == 512 - n

        key = cache_key(tiny_backend.fingerprint, prompt)
        client = redis_server.client()
        data = client.get(f"flux2:emb:{key}")
        entry = decode_entry(data, key)
        assert entry.pad_count == 512 - n and entry.embedding.shape == (n, expected.embeddings.shape[-1])
        assert entry.pad_table == a.running.engine.pad_table_id != ""
        assert len(data) < (n * expected.embeddings.shape[-1] * 2) + 4096  # the rows and a small header

        damaged = bytearray(data)
        damaged[-5] ^= 0x01
        client.set(f"flux2:emb:{key}", bytes(damaged))

        async def read_back():
            metrics = EncoderMetrics()
            link = RedisLink(redis_server.url, metrics=metrics)
            try:
                return await SharedCache(link).get(key), metrics
            finally:
                await link.close()

        got, metrics = asyncio.run(read_back())
        assert got is None and metrics.sample("flux2_encoder_cache_corrupt_total") == 1
        assert client.get(f"flux2:emb:{key}") is None
