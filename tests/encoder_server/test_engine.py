"""EncodeEngine: batching, compute-once, admission control, drops, deadlines, fair scheduling."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import grpc
import pytest
import torch

from common.config import BatchingConfig, CacheConfig, Limits, ServerConfig
from common.encoder_spec import EncoderSpec
from common.errors import DeadlineExceeded, EncoderOverloaded, NotCached, ServerError
from common.protocol import pb2, pb2_grpc
from encoder_server.batcher import QueueFull
from encoder_server.cache import MemoryCache
from encoder_server.engine import EncodeEngine
from encoder_server.text_encoder import EncodedBatch
from tests.helpers import ServerThread, run_async, running_engine, wait_until, wait_until_async

# Named as a [dev] recipe so /predict (FLUX.2-dev's endpoint) serves it.
FAKE_SPEC = EncoderSpec(
    name="flux2-dev/fake-recipe", hidden_states_layers=(1,), max_sequence_length=8, system_message=""
)


class FakeBackend:
    """A backend whose embedding of a prompt is a pure function of its text.

    Records every forward pass (``batches``). With ``hold()`` the next forward
    pass blocks until ``release()``, so a test can fill the queue behind it.
    """

    spec = FAKE_SPEC
    fingerprint = "fake:0000000000000000"
    hidden_size = 4
    num_hidden_layers = 1
    dtype = torch.float32
    quantization = "none"
    compute = "exact"
    device = "cpu"
    padding_side = "left"

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self.fail_on = fail_on

    def hold(self) -> None:
        self._gate.clear()
        self.started.clear()

    def release(self) -> None:
        self._gate.set()

    @property
    def computed(self) -> list[str]:
        return [p for b in self.batches for p in b]

    def encode(self, prompts: list[str]) -> EncodedBatch:
        self.batches.append(list(prompts))
        self.started.set()
        self._gate.wait(30)
        if self.fail_on is not None and self.fail_on in prompts:
            raise RuntimeError("simulated kernel failure")
        rows = [embedding_of(p) for p in prompts]
        return EncodedBatch(
            embeddings=torch.stack(rows),
            token_counts=[len(p) for p in prompts],
            truncated=[False] * len(prompts),
            tokenization_ns=1000,
            inference_ns=2000,
        )


def embedding_of(prompt: str) -> torch.Tensor:
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(prompt))
    return torch.arange(32, dtype=torch.float32).reshape(8, 4) + seed


async def wait_started(backend: FakeBackend) -> None:
    """Until the held forward pass has begun (it runs on the model thread)."""
    await wait_until_async(backend.started.is_set, what="the held forward pass to start")


async def wait_queued(engine: EncodeEngine, n: int) -> None:
    """Until ``n`` prompts wait in the engine's queue."""
    await wait_until_async(lambda: engine.queued == n, what=f"{n} queued prompts")


def waiting_prompts(engine: EncodeEngine) -> int:
    """Requests waiting on queued or running work, each distinct prompt of a request counted once."""
    return sum(item.waiters for item in engine._inflight.values())  # noqa: SLF001 - no public count of joiners


def engine_for(backend, memory_mb: int | None = None, **batching):
    """``async with engine_for(...) as engine``: an engine with these batching limits and an optional memory cache."""
    memory = MemoryCache(memory_mb * 2**20) if memory_mb else None
    return running_engine(backend, batching=BatchingConfig(**batching), memory_cache=memory)


# -- batching ------------------------------------------------------------


def test_batching_does_not_change_a_prompt_bits(tiny_backend):
    """On CPU a prompt's embedding is bit-identical whatever batch it rides in, at any position."""
    target = "a lighthouse at dusk, oil painting"
    others = ["", "short", "東京の夜景 🦊", "a much longer prompt " * 20, "x", "two words"]
    alone = tiny_backend.encode([target]).embeddings[0]

    async def main():
        async with engine_for(tiny_backend, max_batch_prompts=8, max_queue_delay_ms=200) as engine:
            seen = []
            for companions in (others[:1], others[:3], others):
                # Separate concurrent requests; the caches are off, so each round recomputes.
                reqs = [engine.encode([p]) for p in companions[: len(companions) // 2]]
                reqs.append(engine.encode([target]))
                reqs += [engine.encode([p]) for p in companions[len(companions) // 2 :]]
                results = await asyncio.gather(*reqs)
                mine = results[len(companions) // 2][0]
                seen.append((mine.batch_size, mine.embedding))
            return seen

    seen = run_async(main())
    assert [size for size, _ in seen] == [2, 4, 7]  # the prompts really shared forward passes
    for _, emb in seen:
        assert emb.dtype is torch.bfloat16
        assert torch.equal(emb, alone)


def test_prompts_from_different_requests_share_a_forward_pass():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, max_batch_prompts=8, max_queue_delay_ms=1) as engine:
            backend.hold()
            first = asyncio.create_task(engine.encode(["first"]))
            await wait_started(backend)
            rest = [
                asyncio.create_task(engine.encode([p], user=u)) for p, u in (("a", "ann"), ("b", "bob"), ("c", "ann"))
            ]
            await wait_queued(engine, 3)
            backend.release()
            await first
            return [r[0] for r in await asyncio.gather(*rest)]

    results = run_async(main())
    assert backend.batches == [["first"], ["a", "b", "c"]]
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert all(r.queue_ns > 0 and r.inference_ns == 2000 for r in results)
    assert torch.equal(results[1].embedding, embedding_of("b"))


def test_batches_respect_the_prompt_and_token_limits():
    backend = FakeBackend()

    async def main(**limits):
        backend.batches.clear()
        async with engine_for(backend, max_queue_delay_ms=1, **limits) as engine:
            backend.hold()
            first = asyncio.create_task(engine.encode(["first"]))
            await wait_started(backend)
            rest = asyncio.create_task(engine.encode([f"p{i}" for i in range(10)]))
            await wait_queued(engine, 10)
            backend.release()
            await first
            await rest

    run_async(main(max_batch_prompts=4))
    assert [len(b) for b in backend.batches] == [1, 4, 4, 2]
    # FAKE_SPEC pads to 8 tokens: a 24-token budget holds 3 prompts.
    run_async(main(max_batch_prompts=100, max_batch_tokens=24))
    assert [len(b) for b in backend.batches] == [1, 3, 3, 3, 1]


class PackedFakeBackend(FakeBackend):
    """FakeBackend in ``compute="packed"``: a prompt costs its real tokens (``len(prompt)``, at most 8)."""

    compute = "packed"

    def __init__(self):
        super().__init__()
        self.counted: list[list[str]] = []

    def count_tokens(self, prompts):
        self.counted.append(list(prompts))
        return [min(len(p), FAKE_SPEC.max_sequence_length) for p in prompts]


def test_packed_refuses_a_full_queue_before_counting_tokens():
    """Counting takes the model's tokenizer lock: a request that cannot be queued is refused first,
    so a flood of refused requests never delays the counting of the ones that fit."""
    backend = PackedFakeBackend()

    async def main():
        async with engine_for(backend, max_queue_prompts=2, max_queue_delay_ms=1) as engine:
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"]))
            await wait_started(backend)
            queued = asyncio.create_task(engine.encode(["q1", "q2"]))
            await wait_queued(engine, 2)
            counted_before = len(backend.counted)
            with pytest.raises(QueueFull):
                await engine.encode(["one too many"])
            counted_after = len(backend.counted)
            backend.release()
            await asyncio.gather(blocker, queued)
            return counted_before, counted_after

    before, after = run_async(main())
    assert after == before  # refused without tokenizing
    assert ["one too many"] not in backend.counted


def _batches_under_a_token_budget(backend, prompts, max_batch_tokens):
    async def main():
        async with engine_for(
            backend, max_queue_delay_ms=1, max_batch_prompts=100, max_batch_tokens=max_batch_tokens
        ) as engine:
            backend.hold()
            first = asyncio.create_task(engine.encode(["first"]))
            await wait_started(backend)
            rest = asyncio.create_task(engine.encode(prompts))
            await wait_queued(engine, len(prompts))  # counted (on a thread) and queued
            backend.release()
            await first
            await rest
            return engine.metrics

    return run_async(main())


def test_packed_batches_fill_by_real_tokens_and_exact_ones_by_padded_tokens():
    """--max-batch-tokens 24: exact counts every prompt at its padded 8 tokens (3 a batch);
    packed at its real tokens, so 2-token prompts go 12 a batch and 8-token ones 3."""
    prompts = [f"p{i}" for i in range(10)] + ["abcdefg" + str(i) for i in range(4)]  # 2 tokens x10, 8 tokens x4
    exact = FakeBackend()
    _batches_under_a_token_budget(exact, prompts, 24)
    assert [len(b) for b in exact.batches] == [1, 3, 3, 3, 3, 2]
    packed = PackedFakeBackend()
    metrics = _batches_under_a_token_budget(packed, prompts, 24)
    # 10 x 2 = 20 tokens, and one more 8-token prompt would make 28 > 24: the batch closes.
    assert packed.batches[1:] == [prompts[:10], prompts[10:13], prompts[13:]]
    assert packed.counted == [["first"], prompts]  # counted once, before queueing
    # The histogram observes what ran: real tokens for packed.
    assert metrics.sample("flux2_encoder_batch_tokens_sum") == 5 + 20 + 24 + 8


def test_prompts_that_cannot_be_counted_cost_their_padded_length():
    """count_tokens raising (a tokenizer error) does not fail the request: the prompts cost their
    padded length, and the forward pass (which tokenizes again) reports any real error per prompt."""

    class Uncountable(PackedFakeBackend):
        def count_tokens(self, prompts):
            raise RuntimeError("tokenizer broke")

    backend = Uncountable()
    results = run_async(_encode_on(backend, ["ab", "cd"]))
    assert [r.token_count for r in results] == [2, 2] and backend.batches == [["ab", "cd"]]


async def _encode_on(backend, prompts):
    async with engine_for(backend) as engine:
        return await engine.encode(prompts)


def test_a_lone_prompt_waits_at_most_the_queue_delay():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, max_batch_prompts=64, max_queue_delay_ms=50) as engine:
            t0 = time.perf_counter()
            await engine.encode(["alone"])
            return time.perf_counter() - t0

    elapsed = run_async(main())
    assert 0.04 <= elapsed < 1.0


# -- compute once --------------------------------------------------------


def test_identical_concurrent_prompts_are_computed_once():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend) as engine:  # no cache: sharing must come from the in-flight table
            backend.hold()
            tasks = [asyncio.create_task(engine.encode(["same prompt"], user=f"u{i % 3}")) for i in range(10)]
            tasks.append(asyncio.create_task(engine.encode(["same prompt", "other", "same prompt"])))
            await wait_started(backend)
            # 10 requests on "same prompt", and the last one's two distinct prompts.
            await wait_until_async(lambda: waiting_prompts(engine) == 12, what="every request to join or queue")
            backend.release()
            return await asyncio.gather(*tasks), engine.metrics

    results, metrics = run_async(main())
    assert sorted(backend.computed) == ["other", "same prompt"]
    assert metrics.sample("flux2_encoder_prompts_computed_total") == 2
    assert (
        sum(
            metrics.sample("flux2_encoder_prompts_served_total", {"user": f"u{i}", "source": "shared"})
            for i in range(3)
        )
        == 9
    )
    for res in results:
        assert all(torch.equal(r.embedding, embedding_of("same prompt")) for r in res if r.token_count == 11)
    assert torch.equal(results[-1][1].embedding, embedding_of("other"))
    assert torch.equal(results[-1][0].embedding, results[-1][2].embedding)


def test_a_shared_prompt_survives_one_waiter_leaving():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend) as engine:
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"]))
            await wait_started(backend)
            quitter = asyncio.create_task(engine.encode(["shared"]))
            stayer = asyncio.create_task(engine.encode(["shared"]))
            await wait_until_async(lambda: waiting_prompts(engine) == 3, what="both waiters on the shared prompt")
            quitter.cancel()
            await asyncio.gather(quitter, return_exceptions=True)  # it has left (its finally ran)
            backend.release()
            await blocker
            return await stayer

    result = run_async(main())
    assert torch.equal(result[0].embedding, embedding_of("shared"))
    assert backend.computed == ["blocker", "shared"]


# -- admission control, drops and deadlines ------------------------------


def test_full_queue_refuses_unary_work_at_once_with_a_retry_hint():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, max_queue_prompts=2, max_queue_delay_ms=1) as engine:
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"]))
            await wait_started(backend)
            queued = asyncio.create_task(engine.encode(["q1", "q2"]))
            await wait_queued(engine, 2)
            t0 = time.perf_counter()
            with pytest.raises(QueueFull) as info:
                await engine.encode(["one too many"])
            refused_in = time.perf_counter() - t0
            # A prompt already queued is shared, not refused: it needs no room.
            shared = asyncio.create_task(engine.encode(["q1"]))
            await wait_until_async(lambda: waiting_prompts(engine) == 4, what="the q1 request to join")
            backend.release()
            await asyncio.gather(blocker, queued, shared)
            return info.value, refused_in, engine.metrics

    exc, refused_in, metrics = run_async(main())
    assert isinstance(exc, EncoderOverloaded)
    assert refused_in < 0.5
    assert 0.01 <= exc.retry_after_s <= 60
    assert "queue is full" in str(exc) and "retry" in str(exc)
    assert "one too many" not in backend.computed
    assert metrics.sample("flux2_encoder_prompts_computed_total") == 3


def test_waiting_for_capacity_gives_backpressure_instead_of_an_error():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, max_queue_prompts=2, max_batch_prompts=2, max_queue_delay_ms=1) as engine:
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"]))
            await wait_started(backend)
            first = asyncio.create_task(engine.encode(["a", "b"]))
            waiting = asyncio.create_task(engine.encode(["c", "d"], wait_for_capacity=True))
            # Its two misses are counted just before it looks for room (no await in between here).
            await wait_until_async(
                lambda: engine.metrics.sample("flux2_encoder_cache_misses_total") == 5, what="c and d to be looked up"
            )
            assert not waiting.done() and engine.queued == 2  # waits, does not fail
            backend.release()
            await asyncio.gather(blocker, first)
            return await waiting

    result = run_async(main())
    assert [r.token_count for r in result] == [1, 1]
    assert backend.batches == [["blocker"], ["a", "b"], ["c", "d"]]


def test_cancelled_requests_never_reach_the_model():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, max_queue_delay_ms=1) as engine:
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"]))
            await wait_started(backend)
            doomed = asyncio.create_task(engine.encode(["cancel me", "me too"]))
            await wait_queued(engine, 2)
            doomed.cancel()
            await asyncio.gather(doomed, return_exceptions=True)
            assert engine.queued == 0  # left the queue at once, freeing its room
            backend.release()
            await blocker
            after = await engine.encode(["after"])
            return after, engine.metrics

    after, metrics = run_async(main())
    assert backend.computed == ["blocker", "after"]
    assert metrics.sample("flux2_encoder_prompts_dropped_total", {"reason": "cancelled"}) == 2
    assert torch.equal(after[0].embedding, embedding_of("after"))


def test_expired_requests_are_dropped_before_the_model():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, max_queue_delay_ms=1) as engine:
            with pytest.raises(DeadlineExceeded):
                await engine.encode(["already late"], deadline=time.monotonic() - 1)
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"]))
            await wait_started(backend)
            t0 = time.perf_counter()
            with pytest.raises(DeadlineExceeded):
                await engine.encode(["too slow"], deadline=time.monotonic() + 0.2)
            waited = time.perf_counter() - t0
            backend.release()
            await blocker
            await engine.encode(["after"])
            return waited, engine.metrics

    waited, metrics = run_async(main())
    assert 0.15 <= waited < 2.0  # honoured the deadline, did not wait for the model
    assert backend.computed == ["blocker", "after"]
    assert metrics.sample("flux2_encoder_prompts_dropped_total", {"reason": "deadline"}) == 1


def test_a_failing_prompt_fails_alone():
    backend = FakeBackend(fail_on="boom")

    async def main():
        async with engine_for(backend, max_queue_delay_ms=1) as engine:
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"]))
            await wait_started(backend)
            good = asyncio.create_task(engine.encode(["good"]))
            bad = asyncio.create_task(engine.encode(["boom"]))
            await wait_queued(engine, 2)
            backend.release()
            await blocker
            return await good, await asyncio.gather(bad, return_exceptions=True)

    good, (bad,) = run_async(main())
    assert torch.equal(good[0].embedding, embedding_of("good"))
    assert isinstance(bad, ServerError) and "RuntimeError" in str(bad)
    assert backend.batches[1] == ["good", "boom"] and ["good"] in backend.batches[2:]


# -- fair scheduling -----------------------------------------------------


def _interactive_batch_index(fair: bool) -> int:
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, fair=fair, max_batch_prompts=4, max_queue_delay_ms=1) as engine:
            backend.hold()
            blocker = asyncio.create_task(engine.encode(["blocker"], user="bulk"))
            await wait_started(backend)
            bulk = [asyncio.create_task(engine.encode([f"caption {i}"], user="bulk")) for i in range(40)]
            await wait_queued(engine, 40)
            interactive = asyncio.create_task(engine.encode(["my one prompt"], user="artist"))
            await wait_queued(engine, 41)
            backend.release()
            await asyncio.gather(blocker, interactive, *bulk)

    run_async(main())
    return next(i for i, b in enumerate(backend.batches) if "my one prompt" in b)


def test_fair_scheduling_serves_another_user_within_one_batch():
    # Batch 0 was already running; the very next batch takes the interactive prompt.
    assert _interactive_batch_index(fair=True) == 1
    # First-come-first-served makes it wait behind all 40 bulk prompts (10 batches of 4).
    assert _interactive_batch_index(fair=False) == 11


# -- caches through the engine -------------------------------------------


def test_cache_only_answers_hits_and_refuses_misses():
    backend = FakeBackend()

    async def main():
        async with engine_for(backend, memory_mb=1) as engine:
            with pytest.raises(NotCached, match="1 of 1"):
                await engine.encode(["new"], cache_only=True)
            computed = await engine.encode(["new"])
            hit = await engine.encode(["new"], cache_only=True)
            with pytest.raises(NotCached, match=r"indices \[1\]"):
                await engine.encode(["new", "still new"], cache_only=True)
            return computed[0], hit[0]

    computed, hit = run_async(main())
    assert not computed.cache_hit and computed.batch_size == 1
    assert hit.cache_hit and hit.batch_size == 0 and hit.inference_ns == 0
    assert torch.equal(hit.embedding, computed.embedding)
    assert backend.computed == ["new"]


# -- through gRPC ----------------------------------------------------------


def _config(**batching) -> ServerConfig:
    return ServerConfig(batching=BatchingConfig(**batching), cache=CacheConfig(memory_mb=0))


def test_grpc_unary_gets_resource_exhausted_with_retry_after_metadata():
    backend = FakeBackend()
    with ServerThread(backend, _config(max_queue_prompts=1, max_queue_delay_ms=1)) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb2_grpc.TextEncoderStub(channel)
            backend.hold()
            running = stub.Encode(pb2.EncodeRequest(prompts=["blocker"]), timeout=30)  # starts the call
            assert backend.started.wait(10)
            queued = stub.Encode(pb2.EncodeRequest(prompts=["queued"]), timeout=30)
            wait_until(lambda: server.running.engine.queued == 1, what="the queued call to reach the engine")
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Encode(pb2.EncodeRequest(prompts=["refused"]), timeout=30))
            backend.release()
            list(running)
            list(queued)
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.details()
    trailers = dict(err.trailing_metadata())
    assert int(trailers["retry-after-ms"]) >= 10
    assert "refused" not in backend.computed


def test_grpc_stream_waits_when_the_queue_is_full():
    backend = FakeBackend()
    with ServerThread(backend, _config(max_queue_prompts=1, max_batch_prompts=1, max_queue_delay_ms=1)) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb2_grpc.TextEncoderStub(channel)
            requests = [pb2.EncodeRequest(prompts=[f"p{i}"], request_id=str(i)) for i in range(12)]
            responses = list(stub.EncodeStream(iter(requests), timeout=60))
    assert not [r for r in responses if r.HasField("error")]
    done = {r.request_id for r in responses if r.request_done}
    assert done == {str(i) for i in range(12)}
    assert sorted(backend.computed) == sorted(f"p{i}" for i in range(12))


class WideFakeBackend(FakeBackend):
    """FakeBackend with 4 MiB embeddings ([512, 4096] bf16), large enough for gRPC flow control to bite."""

    spec = EncoderSpec(name="fake/wide", hidden_states_layers=(1,), max_sequence_length=512, system_message="")
    hidden_size = 4096
    dtype = torch.bfloat16

    def encode(self, prompts: list[str]) -> EncodedBatch:
        self.batches.append(list(prompts))
        return EncodedBatch(
            embeddings=torch.zeros(len(prompts), 512, 4096, dtype=torch.bfloat16),
            token_counts=[1] * len(prompts),
            truncated=[False] * len(prompts),
            tokenization_ns=1,
            inference_ns=1,
        )


def test_a_stream_that_is_not_read_does_not_pile_up_answers():
    """A client may send without reading; the server must stop computing, not hold every answer in RAM."""
    backend = WideFakeBackend()
    config = replace(_config(), limits=Limits(max_in_flight_per_stream=2))
    requests = [pb2.EncodeRequest(prompts=[f"p{i}"], request_id=str(i)) for i in range(40)]
    with ServerThread(backend, config) as server, grpc.insecure_channel(server.target) as channel:
        call = pb2_grpc.TextEncoderStub(channel).EncodeStream(iter(requests), timeout=60)
        wait_until(lambda: len(backend.computed) >= 2, what="the first answers to be computed")
        # The behaviour under test is that nothing happens: no event marks "would have computed
        # more", so give it time enough to compute all 40 if nothing held the stream back.
        time.sleep(1.5)
        computed_unread = len(backend.computed)
        received = sum(1 for r in call if r.request_done)  # now read everything
    assert 2 <= computed_unread <= 12, computed_unread  # 2 in flight + what the socket buffers hold
    assert received == 40


def test_calls_past_max_concurrent_calls_are_refused_at_once_over_grpc_and_http():
    """One pool of slots for both transports: a gRPC call in flight leaves no room for an HTTP request."""
    import requests

    from common.config import HTTPConfig

    backend = FakeBackend()
    config = replace(_config(), limits=Limits(max_concurrent_calls=1), http=HTTPConfig(port=0))
    with ServerThread(backend, config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        url = f"http://127.0.0.1:{server.running.http.port}/predict"
        backend.hold()
        running = stub.Encode(pb2.EncodeRequest(prompts=["blocker"]), timeout=30)
        assert backend.started.wait(10)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Encode(pb2.EncodeRequest(prompts=["second"]), timeout=10))
        stub.GetInfo(pb2.GetInfoRequest(), timeout=10)  # not bounded: cheap, holds nothing
        refused = requests.post(url, json={"prompt": "http second"}, timeout=10)
        backend.release()
        assert list(running)
        assert len(list(stub.Encode(pb2.EncodeRequest(prompts=["after"]), timeout=10))) > 0  # room again
        assert requests.post(url, json={"prompt": "http after"}, timeout=10).status_code == 200
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 calls at once" in info.value.details() and "--max-concurrent-calls" in info.value.details()
    assert dict(info.value.trailing_metadata())["retry-after-ms"] == "1000"
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "--max-concurrent-calls" in refused.json()["error"]
    assert "second" not in backend.computed and "http second" not in backend.computed


def test_grpc_deadline_reaches_the_engine():
    backend = FakeBackend()
    with ServerThread(backend, _config(max_queue_delay_ms=1)) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb2_grpc.TextEncoderStub(channel)
            backend.hold()
            running = stub.Encode(pb2.EncodeRequest(prompts=["blocker"]), timeout=30)  # starts the call
            assert backend.started.wait(10)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Encode(pb2.EncodeRequest(prompts=["late"]), timeout=0.3))
            wait_until(lambda: server.running.engine.queued == 0, what="the server to drop the expired work")
            backend.release()
            list(running)
            assert server.running.engine.queued == 0
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "late" not in backend.computed


def test_cli_flags_reach_the_config():
    from encoder_server.cli import build_parser, config_from_args

    args = build_parser().parse_args([
        "serve", "--max-batch-tokens", "4096", "--max-batch-prompts", "6", "--max-queue-delay-ms", "2.5",
        "--max-queue-prompts", "99", "--cache-dir", "/tmp/x", "--cache-max-gb", "1.5",
        "--memory-cache-mb", "0", "--metrics-port", "9100", "--scheduling", "fifo",
        "--max-concurrent-calls", "7",
    ])  # fmt: skip
    config = config_from_args(args)
    assert config.batching == replace(
        BatchingConfig(),
        max_batch_tokens=4096,
        max_batch_prompts=6,
        max_queue_delay_ms=2.5,
        max_queue_prompts=99,
        fair=False,
    )
    assert config.cache == CacheConfig(memory_mb=0, dir="/tmp/x", max_gb=1.5)
    assert config.metrics_port == 9100
    assert config.limits.max_concurrent_calls == 7
    default = config_from_args(build_parser().parse_args(["serve"]))
    assert default.cache.memory_mb > 0 and default.cache.dir is None and default.metrics_port is None
    assert default.batching == BatchingConfig() and default.batching.fair
    assert default.limits == Limits()


def test_cli_rejects_nonsense_limits(capsys):
    from encoder_server.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--max-batch-prompts", "0"])
    assert info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
