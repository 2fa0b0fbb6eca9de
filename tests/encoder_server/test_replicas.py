"""Replicas as one service, through one client target: kill -9, restart, Redis gone, quotas, precompute.

Replicas here are processes (tests/replica_procs.py), because only a process can
be killed with SIGKILL; Redis is a real redis-server (tests/redis_server.py).
The client names every replica in one target and uses gRPC's round_robin,
health checks and retry policy plus its own resend of answers broken part-way
(dit_client.connection.service_config, RemoteTextEncoder._encode_part).
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from common.errors import EncoderOverloaded
from common.model_source import resolve_model
from dit_client.remote import RemoteTextEncoder
from dit_client.training.precompute import precompute
from dit_client.training.store import EmbeddingStore
from tests.helpers import ServerThread, wait_until
from tests.replica_procs import ReplicaProcess

# Replica processes killed and restarted: `make test-slow` (CI runs both).
pytestmark = pytest.mark.slow

COMPUTED = "flux2_encoder_prompts_computed_total"
THREADS = 6
MAX_PROMPTS_PER_REQUEST = 2


@pytest.fixture(scope="module")
def demo_backend():
    """The model every replica serves (``--model demo``), in this process: the reference."""
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model("demo", components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


def reference(demo_backend, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each prompt's embedding from a server of our own, over the same wire, before any replica is asked."""
    with ServerThread(demo_backend) as server, RemoteTextEncoder(server.target) as enc:
        return {p: enc.encode([p])[0] for p in prompts}


def start_all(replicas: list[ReplicaProcess]) -> None:
    for replica in replicas:  # the models load in parallel
        replica.spawn()
    for replica in replicas:
        replica.wait()


def request_plan(seed: int = 12) -> list[list[str]]:
    """300 requests over 100 distinct prompts.

    The first 150 come in threes of one prompt, sent at once by neighbouring threads, so
    round_robin puts identical prompts on different replicas at the same moment (compute-once
    across replicas); the rest mix new prompts, repeats and two-prompt requests.
    """
    rng = random.Random(seed)
    distinct = [f"replica test prompt {i}: a {rng.choice(['red', 'blue', 'green'])} fox, take {i}" for i in range(100)]
    plan = [[distinct[i // 3]] for i in range(150)]
    fresh = iter(distinct[50:])
    for _ in range(150):
        pick = next(fresh, None) if rng.random() < 0.4 else None
        request = [pick or rng.choice(distinct[:50])]
        if rng.random() < 0.3:
            request.append(rng.choice(distinct[:50]))
        plan.append(request)
    plan.extend([p] for p in fresh)  # any distinct prompt not drawn yet (none with this seed: checked below)
    return plan


def test_three_replicas_a_kill_and_a_restart_lose_nothing(tmp_path, redis_server, demo_backend):
    plan = request_plan()[:300]
    distinct = sorted({p for request in plan for p in request})
    assert len(plan) == 300 and len(distinct) == 100
    expected = reference(demo_backend, distinct)
    replicas = [ReplicaProcess(tmp_path, shared_cache=redis_server.url) for _ in range(3)]
    victim = replicas[1]
    try:
        start_all(replicas)
        done = 0
        progress = threading.Condition()
        failures: list[tuple[int, str]] = []
        wrong: list[int] = []
        next_request = iter(range(len(plan)))
        take = threading.Lock()

        # gRPC retries a dead address with growing waits (up to 120 s by default): capped at 2 s here
        # so that the restarted replica is found again within the test's deadlines.
        with RemoteTextEncoder(
            ",".join(r.target for r in replicas), timeout=120, channel_options=[("grpc.max_reconnect_backoff_ms", 2000)]
        ) as enc:
            assert enc.connection.lb_policy == "round_robin"

            def worker():
                nonlocal done
                while True:
                    with take:
                        i = next(next_request, None)
                    if i is None:
                        return
                    try:
                        out = enc.encode(plan[i])
                        if not all(torch.equal(out[k], expected[p]) for k, p in enumerate(plan[i])):
                            wrong.append(i)
                    except Exception as exc:  # any failure at all is what this test is about
                        failures.append((i, repr(exc)))
                    with progress:
                        done += 1
                        progress.notify_all()

            def wait_done(n: int) -> None:
                with progress:
                    assert progress.wait_for(lambda: done >= n, timeout=120), f"only {done} of {n} requests done"

            workers = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
            for w in workers:
                w.start()

            # 1. A third of the way in: kill -9 one replica, with requests in flight on it.
            wait_done(100)
            # The victim is in use when it dies (it may have computed nothing itself: with the shared
            # cache, another replica can win every lease, and the victim then answers from Redis).
            served = [r.metric("flux2_encoder_requests_total", method="Encode") for r in replicas]
            assert served[1] > 0, f"the victim got no call before the kill; Encode calls per replica: {served}"
            computed_by_victim = victim.metric(COMPUTED)  # its counts die with it: read them last thing
            victim.kill()
            # 2. Two thirds in: start it again on the same port (the clients' channel reconnects by itself).
            wait_done(200)
            victim.start()
            for w in workers:
                w.join(120)
            assert done == len(plan)

            # 3. The restarted replica gets calls again, without a new client.
            for p in distinct:
                enc.encode([p])
                if victim.metric("flux2_encoder_requests_total", method="Encode"):
                    break
            else:
                wait_until(
                    lambda: (
                        enc.encode([distinct[0]]) is not None
                        and victim.metric("flux2_encoder_requests_total", method="Encode") > 0
                    ),
                    timeout=30,
                    what="the restarted replica to get a call",
                )

        assert failures == [], failures[:5]
        assert wrong == []
        # 4. Each distinct prompt computed once, cluster-wide. The shared cache holds one entry per
        # distinct prompt. The counters: the survivors' plus the restarted victim's plus what the
        # victim had counted when last scraped, just before its kill. That sum can differ from 100
        # only by prompts the victim was computing when it died (lost before reaching Redis, so
        # computed again elsewhere once its lease expired) or computed between the scrape and the
        # kill: at most the requests in flight then, THREADS requests of up to 2 prompts.
        assert len(redis_server.client().keys("flux2:emb:*")) == len(distinct)
        counted = sum(r.metric(COMPUTED) for r in replicas) + computed_by_victim
        slack = THREADS * MAX_PROMPTS_PER_REQUEST
        assert len(distinct) - slack <= counted <= len(distinct) + slack, (counted, computed_by_victim)
        survivors = sum(r.metric(COMPUTED) for r in replicas if r is not victim)
        assert survivors + computed_by_victim <= len(distinct) + slack
    finally:
        for r in replicas:
            r.close()


def test_with_redis_killed_the_balanced_service_still_answers(tmp_path, redis_server, demo_backend):
    prompts = [f"no redis {i}" for i in range(12)]
    expected = reference(demo_backend, prompts)
    replicas = [ReplicaProcess(tmp_path, shared_cache=redis_server.url) for _ in range(2)]
    try:
        start_all(replicas)
        with RemoteTextEncoder(",".join(r.target for r in replicas), timeout=60) as enc:
            for p in prompts[:4]:
                assert torch.equal(enc.encode([p])[0], expected[p])
            redis_server.kill()
            for p in prompts:  # hits from local memory, misses computed locally: none fails
                assert torch.equal(enc.encode([p])[0], expected[p])
        assert all(
            r.metric("flux2_encoder_shared_cache_errors_total") > 0
            for r in replicas
            if r.metric("flux2_encoder_requests_total", method="Encode") > 0
        )
    finally:
        for r in replicas:
            r.close()


def test_a_quota_holds_across_replicas_through_the_balanced_client(tmp_path, redis_server):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:alice-key-0123456789abcdef\n")
    keys.chmod(0o600)
    args = ("--api-key-file", str(keys), "--quota-prompts-per-day", "6", "--max-concurrent-calls-per-user", "64")
    replicas = [ReplicaProcess(tmp_path, shared_cache=redis_server.url, extra_args=args) for _ in range(2)]
    try:
        start_all(replicas)
        with RemoteTextEncoder(",".join(r.target for r in replicas), api_key="alice-key-0123456789abcdef") as enc:
            for i in range(6):  # round_robin: three on each replica
                enc.encode([f"quota prompt {i}"])
            with pytest.raises(EncoderOverloaded, match="quota"):
                enc.encode(["one too many"])
        served = [r.metric("flux2_encoder_requests_total", method="Encode", status="OK") for r in replicas]
        assert sum(served) == 6 and sum(1 for s in served if s) >= 2, served  # spread, yet one quota of 6
    finally:
        for r in replicas:
            r.close()


def test_precompute_with_a_replica_killed_mid_run_ends_complete_and_exact(tmp_path, demo_backend):
    captions = [f"caption {i}: a small house by the lake, variant {i}" for i in range(120)]
    expected = reference(demo_backend, captions)
    replicas = [ReplicaProcess(tmp_path) for _ in range(2)]
    try:
        start_all(replicas)

        def streamed(r: ReplicaProcess) -> float:
            return r.metric("flux2_encoder_requests_total", method="EncodeStream")

        with RemoteTextEncoder(",".join(r.target for r in replicas), timeout=60) as enc:
            result = {}
            run = threading.Thread(
                target=lambda: result.update(
                    report=precompute(
                        enc,
                        captions,
                        tmp_path / "store",
                        batch_size=2,
                        concurrency=2,
                        progress=False,
                        shard_bytes=64 * 1024,
                    )
                ),
                daemon=True,
            )
            run.start()
            # The stream's replica is the one answering EncodeStream messages; kill it a few requests in.
            wait_until(lambda: any(streamed(r) >= 10 for r in replicas), what="the precompute stream to start")
            victim = max(replicas, key=streamed)
            victim.kill()
            run.join(120)
            assert not run.is_alive()
        survivor = next(r for r in replicas if r is not victim)
        assert streamed(survivor) > 0, "the kill came after the run had finished"
        report = result["report"]
        assert report.encoded == len(captions)
        store = EmbeddingStore(tmp_path / "store")
        assert sorted(store) == sorted(captions)  # complete, each caption once (the store refuses duplicates)
        for caption in captions:
            assert torch.equal(store[caption], expected[caption])
    finally:
        for r in replicas:
            r.close()
