"""Embedding caches: keys, memory LRU, disk cache (atomic, checked, bounded), and through the engine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.config import BatchingConfig, CacheConfig, ServerConfig
from common.errors import NotCached
from common.pad_table import pad_table_id
from dit_client.remote import RemoteTextEncoder
from encoder_server.cache import ENTRY_OVERHEAD_BYTES, CachedEmbedding, DiskCache, MemoryCache, cache_key
from encoder_server.models import ServedModel, served_pad_table
from tests.encoder_server.test_engine import FakeBackend, embedding_of
from tests.helpers import ServerThread, run_async, running_engine, wait_until_async

ROOT = Path(__file__).resolve().parents[2]


def entry(seed: int, shape=(512, 48)) -> CachedEmbedding:
    g = torch.Generator().manual_seed(seed)
    return CachedEmbedding(
        torch.randn(shape, generator=g).to(torch.bfloat16), token_count=seed + 3, truncated=seed % 2 == 1
    )


def same(a: CachedEmbedding, b: CachedEmbedding) -> bool:
    return torch.equal(a.embedding, b.embedding) and (a.token_count, a.truncated) == (b.token_count, b.truncated)


# -- keys and memory -------------------------------------------------------


def test_keys_depend_on_fingerprint_and_prompt_without_collisions():
    k = cache_key("flux2-dev:aaaa", "a fox")
    assert len(k) == 64 and k == cache_key("flux2-dev:aaaa", "a fox")
    assert k != cache_key("flux2-dev:bbbb", "a fox")
    assert k != cache_key("flux2-dev:aaaa", "a fox ")
    assert cache_key("ab", "c") != cache_key("a", "bc")


def test_memory_cache_is_lru_within_its_byte_bound():
    one = entry(0).nbytes
    cache = MemoryCache(2 * one)
    evicted = []
    cache.on_evict = evicted.append
    cache.put("a", entry(0))
    cache.put("b", entry(1))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", entry(2))
    assert cache.get("b") is None and same(cache.get("a"), entry(0)) and same(cache.get("c"), entry(2))
    assert cache.nbytes == 2 * one and len(cache) == 2 and evicted == [1]
    MemoryCache(one - 1).put("too big", entry(0))  # silently not kept


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def test_memory_cache_never_keeps_a_bigger_storage_alive_and_counts_what_it_holds():
    """A row of a batch is a view that keeps the whole batch alive: the cache keeps its own copy
    instead, and counts the storage its entries really hold (it used to count only the row's bytes)."""
    batch = torch.randn(8, 512, 48).to(torch.bfloat16)
    cache = MemoryCache(2**30)
    for i in range(8):
        cache.put(f"k{i}", CachedEmbedding(batch[i], 3, False))
    held = [cache.get(f"k{i}").embedding for i in range(8)]
    assert all(storage_bytes(t) == t.numel() * t.element_size() == 512 * 48 * 2 for t in held)
    assert all(torch.equal(t, batch[i]) for i, t in enumerate(held))
    assert cache.nbytes == sum(storage_bytes(t) + ENTRY_OVERHEAD_BYTES for t in held)
    # An entry counts what keeps it in memory, view or not.
    assert CachedEmbedding(batch[0], 3, False).nbytes == storage_bytes(batch) + ENTRY_OVERHEAD_BYTES


def test_engine_entries_own_exactly_their_bytes_whatever_the_backend_returns():
    """Rows the engine caches are never views into the backend's result, for one prompt as for a
    batch, even when that result is itself a view of something bigger (a padded batch)."""

    class PaddedBackend(FakeBackend):
        def encode(self, prompts):
            out = super().encode(prompts)
            padded = torch.zeros(len(prompts) + 5, *out.embeddings.shape[1:])
            padded[: len(prompts)] = out.embeddings
            return replace(out, embeddings=padded[: len(prompts)])

    backend = PaddedBackend()

    async def main():
        async with running_engine(backend, batching=BatchingConfig(), memory_cache=MemoryCache(2**20)) as engine:
            for prompts in (["one alone"], ["a", "batch", "of four"]):
                for entry, *_ in engine._forward(prompts):  # noqa: SLF001 - what the model thread hands the caches
                    t = entry.embedding
                    assert storage_bytes(t) == t.numel() * t.element_size(), prompts
                    assert entry.nbytes == storage_bytes(t) + ENTRY_OVERHEAD_BYTES
            return await engine.encode(["x", "y"])

    results = run_async(main())
    assert all(torch.equal(r.embedding, embedding_of(p)) for r, p in zip(results, ["x", "y"], strict=True))
    assert all(storage_bytes(r.embedding) == 8 * 4 * 4 for r in results)


def test_memory_cache_counted_bytes_are_what_it_costs_in_rss():
    """2,000 demo-size entries made as the engine makes them (own copies of batch rows): the
    process grows by what the cache counts (storage plus ENTRY_OVERHEAD_BYTES each), within
    2% above and 10% below."""
    script = textwrap.dedent(f"""
        import gc, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from encoder_server.cache import CachedEmbedding, MemoryCache, cache_key
        def rss():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        batch = torch.randn(4, 512, 48).to(torch.bfloat16)
        cache = MemoryCache(2**40)
        gc.collect()
        before = rss()
        for i in range(2000):
            cache.put(cache_key("fp", str(i)), CachedEmbedding.owning(batch[i % 4], i, False))
        gc.collect()
        print(rss() - before, cache.nbytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    grown, counted = map(int, out.stdout.split())
    assert 0.9 * counted <= grown <= 1.02 * counted, (grown, counted)


# -- disk ------------------------------------------------------------------


def test_disk_entries_survive_a_restart_bit_for_bit(tmp_path):
    DiskCache(tmp_path, 10**9).put("k" * 64, entry(1))
    reopened = DiskCache(tmp_path, 10**9)
    assert len(reopened) == 1 and reopened.nbytes == reopened.path_of("k" * 64).stat().st_size
    got = reopened.get("k" * 64)
    assert got.embedding.dtype is torch.bfloat16 and same(got, entry(1))
    assert reopened.get("0" * 64) is None


@pytest.mark.parametrize(
    "damage",
    ["flip_data", "flip_header", "token_count", "shape", "truncate", "empty", "other_key"],
)
def test_damaged_disk_entries_are_dropped_not_served(tmp_path, damage):
    cache = DiskCache(tmp_path, 10**9)
    key = "a" * 64
    cache.put(key, entry(2))
    path = cache.path_of(key)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    if damage == "flip_data":
        data[-100] ^= 0x01  # one bit of the tensor
    elif damage == "flip_header":
        data[8 + header_len // 2] ^= 0x20
    elif damage in ("token_count", "shape"):  # still valid safetensors, but not what was written
        old, new = (
            (b'"token_count":"5"', b'"token_count":"4"') if damage == "token_count" else (b"[512,48]", b"[48,512]")
        )
        assert data.count(old) == 1
        data = data.replace(old, new)
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    elif damage == "other_key":  # a valid entry under the wrong name
        cache.put("b" * 64, entry(3))
        data = bytearray(cache.path_of("b" * 64).read_bytes())
    path.write_bytes(bytes(data))
    assert cache.get(key) is None
    assert cache.corrupt == 1 and not path.exists()
    assert key not in cache._index  # noqa: SLF001 - the size accounting forgot it too


def test_a_writer_killed_mid_write_leaves_no_entry_that_is_served(tmp_path):
    """SIGKILL a process while it writes an entry: the entry is absent, never half there."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from encoder_server.cache import CachedEmbedding, DiskCache
        real_fsync = os.fsync
        def stall(fd):  # the data is written but not yet renamed into place: held there until killed
            print("writing", flush=True)
            signal.pause()
        os.fsync = stall
        DiskCache({str(tmp_path)!r}, 10**9).put("c" * 64, CachedEmbedding(torch.ones(512, 48, dtype=torch.bfloat16), 5, False))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait(10)
    leftovers = list(tmp_path.glob("??/.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the torn write is there...
    cache = DiskCache(tmp_path, 10**9)
    assert cache.get("c" * 64) is None and len(cache) == 0  # ...but never served
    # An old leftover is cleaned up when a cache opens the folder.
    os.utime(leftovers[0], (time.time() - 7200, time.time() - 7200))
    DiskCache(tmp_path, 10**9)
    assert not leftovers[0].exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path, 10**9)

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        cache.put("d" * 64, entry(4))
    monkeypatch.undo()
    assert cache.get("d" * 64) is None and len(cache) == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_disk_cache_evicts_least_recently_used_within_its_bound(tmp_path):
    size = len(_encoded_size_probe(tmp_path))
    cache = DiskCache(tmp_path / "c", 2 * size + size // 2)  # room for two entries
    evicted = []
    cache.on_evict = evicted.append
    cache.put("1" * 64, entry(1))
    cache.put("2" * 64, entry(2))
    assert cache.get("1" * 64) is not None  # 1 is now more recent than 2
    cache.put("3" * 64, entry(3))
    assert not cache.path_of("2" * 64).exists() and evicted == [1]
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2
    # Recency survives a restart (file mtimes), and a smaller bound evicts the oldest at startup.
    old = time.time() - 100
    os.utime(cache.path_of("3" * 64), (old, old))
    smaller = DiskCache(tmp_path / "c", size + size // 2)
    assert len(smaller) == 1 and smaller.get("1" * 64) is not None
    assert not cache.path_of("3" * 64).exists()


def _encoded_size_probe(tmp_path) -> bytes:
    probe = DiskCache(tmp_path / "probe", 10**9)
    probe.put("p" * 64, entry(0))
    return probe.path_of("p" * 64).read_bytes()


# -- through the engine ----------------------------------------------------


def _engine(backend, cache_dir, memory: bool = False):
    """``async with _engine(...) as engine``: a server's engine with a disk cache in ``cache_dir``;
    leaving the block waits for its background disk writes."""
    return running_engine(
        backend, ServerConfig(cache=CacheConfig(memory_mb=1 if memory else 0, dir=str(cache_dir), max_gb=1))
    )


def test_engine_serves_from_disk_after_a_restart(tmp_path):
    backend = FakeBackend()

    async def session(prompts):
        async with _engine(backend, tmp_path) as engine:  # leaving it waits for the background disk writes
            return await engine.encode(prompts), engine.metrics

    first, _ = run_async(session(["persist me", "me too"]))
    second, metrics = run_async(session(["persist me", "me too", "new"]))
    assert backend.computed == ["persist me", "me too", "new"]
    assert [r.cache_hit for r in first] == [False, False]
    assert [r.cache_hit for r in second] == [True, True, False]
    assert torch.equal(second[0].embedding, embedding_of("persist me"))
    assert second[1].token_count == len("me too")
    assert metrics.sample("flux2_encoder_cache_hits_total", {"tier": "disk"}) == 2
    assert metrics.sample("flux2_encoder_cache_misses_total") == 1


def test_engine_recomputes_a_corrupted_entry_and_rewrites_it(tmp_path):
    backend = FakeBackend()

    async def session():
        async with _engine(backend, tmp_path) as engine:
            return await engine.encode(["fragile"]), engine.metrics

    run_async(session())
    path = DiskCache(tmp_path, 10**9).path_of(cache_key(backend.fingerprint, "fragile"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))

    result, metrics = run_async(session())
    assert backend.computed == ["fragile", "fragile"]
    assert not result[0].cache_hit and torch.equal(result[0].embedding, embedding_of("fragile"))
    assert metrics.sample("flux2_encoder_cache_corrupt_total") == 1
    assert same(DiskCache(tmp_path, 10**9).get(path.stem), CachedEmbedding(embedding_of("fragile"), 7, False))


def test_memory_hits_skip_the_disk(tmp_path):
    backend = FakeBackend()

    async def main():
        async with _engine(backend, tmp_path, memory=True) as engine:
            await engine.encode(["hot"])
            again = await engine.encode(["hot", "hot"])
            return again, engine.metrics

    again, metrics = run_async(main())
    assert [r.cache_hit for r in again] == [True, True] and backend.computed == ["hot"]
    assert metrics.sample("flux2_encoder_cache_hits_total", {"tier": "memory"}) == 1  # one distinct prompt
    assert metrics.sample("flux2_encoder_cache_hits_total", {"tier": "disk"}) == 0


def test_client_cache_only_and_cache_hit_flag_over_grpc(tiny_backend, tmp_path):
    config = replace(ServerConfig(), cache=CacheConfig(memory_mb=64, dir=str(tmp_path)))
    prompts = ["a cached fox", "a cached owl"]
    with ServerThread(tiny_backend, config) as server, RemoteTextEncoder(server.target) as enc:
        with pytest.raises(NotCached, match="not cached"):
            enc.encode(prompts, cache_only=True)
        computed, meta1 = enc.encode_with_metadata(prompts)
        cached = enc.encode(prompts, cache_only=True)
        _, meta2 = enc.encode_with_metadata(prompts)
    assert [m.cache_hit for m in meta1] == [False, False]
    assert [m.cache_hit for m in meta2] == [True, True]
    assert torch.equal(cached, computed) and torch.equal(computed, tiny_backend.encode(prompts).embeddings)
    assert [m.token_count for m in meta2] == [m.token_count for m in meta1]


def test_work_finished_during_a_disk_read_is_not_computed_again(tmp_path):
    backend = FakeBackend()
    first_done = threading.Event()
    reads = []

    async def main():
        async with _engine(backend, tmp_path, memory=True) as engine:
            real_read = engine._read_disk

            def slow_read(keys):  # the first lookup is still reading while another request computes
                reads.append(keys)
                if len(reads) == 1:
                    assert first_done.wait(30)
                return real_read(keys)

            engine._read_disk = slow_read
            slow = asyncio.create_task(engine.encode(["raced"]))
            await wait_until_async(lambda: reads, what="the first request to start its disk read")
            fast = await engine.encode(["raced"])
            first_done.set()
            return fast, await slow

    fast, slow = run_async(main())
    assert backend.computed == ["raced"]
    assert not fast[0].cache_hit and slow[0].cache_hit
    assert torch.equal(slow[0].embedding, embedding_of("raced"))


# -- compact entries (real rows, pad count, pad table id) --------------------

PROMPTS = ["a red fox in fresh snow", "", "Ünïcödé: 東京の夜景 🦊", "a longer prompt " * 12, "long " * 400]


@pytest.fixture(scope="module")
def klein_left_backend(tmp_path_factory):
    """A tiny [klein] encoder whose tokenizer pads on the left (so it has a pad table)."""
    from common.demo import TinyKleinSpec, build_tiny_klein
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedTextEncoder

    folder = build_tiny_klein(tmp_path_factory.mktemp("klein-left"), TinyKleinSpec(padding_side="left", with_dit=False))
    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    return TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def dev_right_backend(tiny_model_dir_right):
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(tiny_model_dir_right), components=("text_encoder", "tokenizer"))
    return TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)


def _compact_engine(backend, cache_dir, memory_bytes: int = 2**30):
    return running_engine(
        backend,
        memory_cache=MemoryCache(memory_bytes) if memory_bytes else None,
        disk_cache=DiskCache(cache_dir, 2**30),
        pad_table=served_pad_table(backend),
    )


def _encode_once(backend, cache_dir, prompts, memory_bytes: int = 2**30):
    """Encode ``prompts`` twice on a fresh engine (computed, then memory hits); its caches after."""

    async def main():
        async with _compact_engine(backend, cache_dir, memory_bytes) as engine:  # leaving it waits for the disk writes
            return await engine.encode(prompts), await engine.encode(prompts), engine

    return run_async(main())


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_compact_entries_rebuild_the_computed_embedding_bit_for_bit(family, tiny_backend, klein_left_backend, tmp_path):
    """Left padding: memory and disk entries keep only the real rows, and a hit from either
    rebuilds exactly what the model computed; the elided answer is the compact rows themselves."""
    backend = tiny_backend if family == "dev" else klein_left_backend
    table = served_pad_table(backend)
    assert table is not None
    expected = backend.encode(PROMPTS)
    computed, hits, engine = _encode_once(backend, tmp_path, PROMPTS)
    length = backend.spec.max_sequence_length
    for i, prompt in enumerate(PROMPTS):
        n = expected.token_counts[i]
        for r in (computed[i], hits[i]):
            assert torch.equal(r.embedding, expected.embeddings[i]), (prompt[:20], r.cache_hit)
            assert r.pad_count == length - n and r.rows.shape[0] == n
        key = cache_key(backend.fingerprint, prompt)
        stored = engine.memory_cache.get(key)
        assert stored.embedding.shape == (n, expected.embeddings.shape[-1]) and stored.pad_count == length - n
        assert stored.pad_table == (engine.pad_table_id if n < length else "")
    assert [r.cache_hit for r in hits] == [True] * len(PROMPTS)
    assert computed[-1].pad_count == 0  # truncated: no pads, the whole embedding is stored
    # The memory cache counts the compact size.
    row_bytes = expected.embeddings.shape[-1] * 2
    assert engine.memory_cache.nbytes == sum(n * row_bytes + ENTRY_OVERHEAD_BYTES for n in expected.token_counts)

    # A restart: hits from the disk, each file holding the real rows only.
    computed_again, _, reopened = _encode_once(backend, tmp_path, PROMPTS, memory_bytes=0)
    assert [r.cache_hit for r in computed_again] == [True] * len(PROMPTS)
    for i, r in enumerate(computed_again):
        assert torch.equal(r.embedding, expected.embeddings[i])
    full_file = length * row_bytes
    assert all(
        DiskCache(tmp_path, 2**30).path_of(cache_key(backend.fingerprint, p)).stat().st_size < full_file
        for p in PROMPTS[:3]
    )

    # What the servicer sends a client that holds the table: the compact rows as they are,
    # the same rows and count the per-answer check on the full tensor gives.
    model = ServedModel("m", backend, reopened, pad_table=table)
    for i, r in enumerate(computed_again):
        rows, pad = model.answer_rows(r, model.pad_table_id)
        want_rows, want_pad = model.elide(expected.embeddings[i], expected.token_counts[i], model.pad_table_id)
        assert pad == want_pad and torch.equal(rows, want_rows)
        assert pad == 0 or rows is r.rows  # not rebuilt and sliced: handed over
        assert torch.equal(model.answer_rows(r, "")[0], expected.embeddings[i])  # no table: whole


def test_a_right_padding_model_stores_whole_embeddings(dev_right_backend, tmp_path):
    """Right padding: no pad table, so entries keep every row (pad rows differ per prompt)."""
    assert served_pad_table(dev_right_backend) is None
    expected = dev_right_backend.encode(PROMPTS[:3])
    computed, hits, engine = _encode_once(dev_right_backend, tmp_path, PROMPTS[:3])
    length = dev_right_backend.spec.max_sequence_length
    for i, prompt in enumerate(PROMPTS[:3]):
        assert torch.equal(hits[i].embedding, expected.embeddings[i]) and hits[i].pad_count == 0
        stored = engine.memory_cache.get(cache_key(dev_right_backend.fingerprint, prompt))
        assert stored.embedding.shape[0] == length and stored.pad_count == 0


def test_the_same_memory_bound_holds_several_times_more_compact_entries(tiny_backend):
    """A bound that holds 2 whole embeddings holds many more compact ones (the rows it really keeps)."""
    full = CachedEmbedding.owning(tiny_backend.encode(["a red fox"]).embeddings[0], 10, False)
    table = served_pad_table(tiny_backend)
    table_id = pad_table_id(tiny_backend.fingerprint, table)
    cache = MemoryCache(2 * full.nbytes)
    batch = tiny_backend.encode([f"fox {i}" for i in range(12)])
    for i in range(12):
        entry = CachedEmbedding.compact(batch.embeddings[i], batch.token_counts[i], False, table, table_id)
        assert entry.pad_count > 0
        cache.put(f"k{i}", entry)
    assert len(cache) >= 4 and cache.evictions == 12 - len(cache)
    assert cache.nbytes == sum(cache.get(f"k{i}").nbytes for i in range(12 - len(cache), 12)) <= cache.max_bytes


def _synthetic_compact(pads: int = 6, real: int = 4) -> tuple[CachedEmbedding, torch.Tensor, torch.Tensor]:
    """(compact entry, its full [pads + real, 48] embedding, the table) without a model."""
    g = torch.Generator().manual_seed(7)
    table = torch.randn(pads + 2, 48, generator=g).to(torch.bfloat16)
    full = torch.cat([table[:pads], torch.randn(real, 48, generator=g).to(torch.bfloat16)])
    entry = CachedEmbedding.compact(full, real, False, table, "fp:x/pad:8:00000000")
    assert entry.pad_count == pads and entry.embedding.shape == (real, 48)
    return entry, full, table


def test_compact_rebuild_and_refusal():
    entry, full, table = _synthetic_compact()
    assert torch.equal(entry.full(table), full)
    # Pad rows that differ from the table are kept: nothing is ever left out that the table would not give back.
    changed = full.clone()
    changed[2, 5] += 1
    whole = CachedEmbedding.compact(changed, 4, False, table, "fp:x/pad:8:00000000")
    assert whole.pad_count == 0 and torch.equal(whole.full(None), changed)


@pytest.mark.parametrize("damage", ["flip_data", "pad_count", "pad_table", "drop_pad_fields"])
def test_a_damaged_compact_disk_entry_is_a_miss_and_deleted(tmp_path, damage):
    entry, _, _ = _synthetic_compact()
    cache = DiskCache(tmp_path, 10**9)
    key = "c" * 64
    cache.put(key, entry)
    assert same(cache.get(key), entry) and cache.get(key).pad_count == 6
    path = cache.path_of(key)
    data = bytearray(path.read_bytes())
    if damage == "flip_data":
        data[-7] ^= 0x10
    elif damage == "pad_count":  # 6 -> 5: rebuilt one row short, had it passed
        assert data.count(b'"pad_count":"6"') == 1
        data = data.replace(b'"pad_count":"6"', b'"pad_count":"5"')
    elif damage == "pad_table":
        data = data.replace(b"pad:8:00000000", b"pad:8:00000001")
    else:  # valid safetensors, metadata fields missing
        data = data.replace(b'"pad_count":"6"', b'"pad_cnt__":"6"')
    path.write_bytes(bytes(data))
    assert cache.get(key) is None
    assert cache.corrupt == 1 and not path.exists() and len(cache) == 0


def _write_full_format_entry(path: Path, key: str, embedding: torch.Tensor, token_count: int) -> None:
    """An entry as the disk cache wrote it before compact entries (format /1), written here by hand."""
    import safetensors.torch

    from common.wire import crc32c, tensor_bytes

    described = f"{key}|{embedding.dtype}|{tuple(embedding.shape)}|{token_count}|0".encode()
    metadata = {
        "format": "flux2-remote-embedding/1",
        "key": key,
        "token_count": str(token_count),
        "truncated": "0",
        "crc32c": str(crc32c(tensor_bytes(embedding), crc32c(described))),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors.torch.save({"embedding": embedding.contiguous()}, metadata=metadata))


def test_entries_in_the_old_full_format_are_still_served_bit_for_bit(tiny_backend, tmp_path):
    """A cache folder written before compact entries: its full entries are read (their own
    checksum checked) and served; the memory cache then keeps them compact."""
    prompt = "written by an older server"
    expected = tiny_backend.encode([prompt])
    key = cache_key(tiny_backend.fingerprint, prompt)
    path = DiskCache(tmp_path, 2**30).path_of(key)
    _write_full_format_entry(path, key, expected.embeddings[0], expected.token_counts[0])

    first, _, engine = _encode_once(tiny_backend, tmp_path, [prompt])
    assert first[0].cache_hit and torch.equal(first[0].embedding, expected.embeddings[0])
    assert engine.memory_cache.get(key).embedding.shape[0] == expected.token_counts[0]
    assert engine.metrics.sample("flux2_encoder_cache_corrupt_total") == 0
    # Damaged, it is dropped like any other entry, never served.
    data = bytearray(path.read_bytes())
    data[-11] ^= 0x01
    path.write_bytes(bytes(data))
    assert DiskCache(tmp_path, 2**30).get(key) is None and not path.exists()


def test_a_compact_entry_of_another_pad_table_is_recomputed_not_rebuilt(tiny_backend, tmp_path):
    """Rows left out of a table this server does not have cannot be put back: a miss."""
    prompt = "made elsewhere"
    expected = tiny_backend.encode([prompt])
    table = served_pad_table(tiny_backend)
    foreign = CachedEmbedding.compact(expected.embeddings[0], expected.token_counts[0], False, table, "other/pad:1:0")
    key = cache_key(tiny_backend.fingerprint, prompt)
    DiskCache(tmp_path, 2**30).put(key, foreign)
    first, _, _ = _encode_once(tiny_backend, tmp_path, [prompt])
    assert not first[0].cache_hit and torch.equal(first[0].embedding, expected.embeddings[0])
    # A server without a table cannot use compact entries either.
    DiskCache(tmp_path, 2**30).put(key, foreign)

    async def without_table():
        async with running_engine(tiny_backend, disk_cache=DiskCache(tmp_path, 2**30)) as engine:
            return await engine.encode([prompt])

    result = run_async(without_table())
    assert not result[0].cache_hit and torch.equal(result[0].embedding, expected.embeddings[0])


def test_a_memory_entry_changed_in_place_is_dropped_not_served(tmp_path):
    entry, _, _ = _synthetic_compact()
    cache = MemoryCache(2**20)
    dropped = []
    cache.on_corrupt = lambda: dropped.append(1)
    cache.put("k", entry)
    cache.get("k").embedding[0, 0] += 1  # a caller writing into a shared tensor
    assert cache.get("k") is None and dropped == [1] and cache.corrupt == 1
    assert len(cache) == 0 and cache.nbytes == 0


def test_count_tokens_matches_what_encode_runs(tiny_backend, klein_left_backend):
    for backend in (tiny_backend, klein_left_backend):
        assert backend.count_tokens(PROMPTS) == backend.encode(PROMPTS).token_counts


def test_packed_results_are_budgeted_by_real_tokens_cached_compact_and_served_bit_for_bit(tiny_model_dir, tmp_path):
    """--compute packed through the engine: the prompts are counted (real tokens) before they are
    queued, the results are stored compact (their pad rows are the table's), and a hit rebuilds
    exactly what the packed forward computed."""
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedMistral3Encoder

    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    packed = TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16, compute="packed")
    prompts = PROMPTS[:4]
    expected = packed.encode(prompts)  # the same batch, in the same order, as the engine runs them
    computed, hits, engine = _encode_once(packed, tmp_path, prompts)
    for i in range(len(prompts)):
        assert torch.equal(computed[i].embedding, expected.embeddings[i])
        assert hits[i].cache_hit and torch.equal(hits[i].embedding, expected.embeddings[i])
        assert hits[i].pad_count == 512 - expected.token_counts[i] and hits[i].rows.shape[0] == expected.token_counts[i]
    assert [r.batch_size for r in computed] == [4] * 4
    assert engine.metrics.sample("flux2_encoder_batch_tokens_sum") == sum(expected.token_counts) < 4 * 512
