"""EmbeddingStore / StoreWriter: round trips, memory mapping, crash recovery, one fingerprint per store."""

from __future__ import annotations

import json
import os
import pickle

import psutil
import pytest
import torch

from common.errors import IntegrityError
from dit_client.training.dataset import EmbeddingDataset, text_ids_for
from dit_client.training.store import (
    INDEX_NAME,
    EmbeddingStore,
    StoreError,
    StoreInfo,
    StoreWriter,
)

INFO = StoreInfo("fp-test-1", torch.bfloat16, (8, 6), "tiny")


def _embeds(n: int, shape=INFO.shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g).to(torch.bfloat16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _write(path, captions, embeds, info=INFO, rows_per_shard=3):
    with StoreWriter(path, info, shard_bytes=rows_per_shard * info.row_bytes) as w:
        for c, e in zip(captions, embeds, strict=True):
            w.add(c, e)
    return w


def _shards(path):
    return sorted(p.name for p in path.glob("shard-*.safetensors"))


def test_round_trip_is_bit_identical_across_shards(tmp_path):
    captions = [f"caption {i}" for i in range(10)] + ["ünïcödé 雪", " leading space"]
    embeds = _embeds(len(captions))
    w = _write(tmp_path, captions, embeds)
    assert w.shard_count == 4 and len(_shards(tmp_path)) == 4  # 3 + 3 + 3 + 3 rows

    store = EmbeddingStore(tmp_path)
    assert len(store) == len(captions)
    assert list(store) == captions
    assert store.fingerprint == "fp-test-1"
    for c, e in zip(captions, embeds, strict=True):
        got = store.get(c)
        assert got.shape == INFO.shape and got.dtype == torch.bfloat16
        assert torch.equal(_bits(got), _bits(e))
    assert [c for c, _ in store.items()] == captions
    assert "caption 3" in store and "caption 3 " not in store and "leading space" not in store
    with pytest.raises(KeyError, match="not in the store"):
        store.get("never stored")


def test_get_copies_one_row_not_the_shard(tmp_path):
    _write(tmp_path, ["a", "b", "c"], _embeds(3))
    row = EmbeddingStore(tmp_path).get("b")
    assert row.untyped_storage().nbytes() == INFO.row_bytes


def test_opening_a_large_store_does_not_load_it(tmp_path):
    info = StoreInfo("fp-big", torch.bfloat16, (512, 2048), "big")  # 2 MiB per row
    n = 128  # 256 MiB in 2 shards
    with StoreWriter(tmp_path, info, shard_bytes=64 * info.row_bytes) as w:
        row = torch.ones(info.shape, dtype=info.dtype)
        for i in range(n):
            w.add(f"c{i}", row * i)
    proc = psutil.Process()
    before = proc.memory_info().rss
    store = EmbeddingStore(tmp_path)
    got = store.get("c77")
    grown = proc.memory_info().rss - before
    assert got[0, 0].item() == 77.0
    assert grown < 48 * 2**20, f"opening + one read grew RSS by {grown / 2**20:.0f} MiB"


def test_writer_refuses_duplicates_and_wrong_shapes(tmp_path):
    with StoreWriter(tmp_path, INFO) as w:
        w.add("x", _embeds(1)[0])
        with pytest.raises(ValueError, match="already stored"):
            w.add("x", _embeds(1)[0])
        with pytest.raises(IntegrityError, match="does not fit"):
            w.add("y", torch.zeros((8, 7), dtype=torch.bfloat16))
        with pytest.raises(IntegrityError, match="does not fit"):
            w.add("y", torch.zeros(INFO.shape, dtype=torch.float32))


def test_store_never_mixes_fingerprints(tmp_path):
    _write(tmp_path, ["a"], _embeds(1))
    other = StoreInfo("fp-OTHER", INFO.dtype, INFO.shape)
    with pytest.raises(IntegrityError, match="never mixes models"):
        StoreWriter(tmp_path, other)
    with pytest.raises(IntegrityError, match=r"\[8, 6\]"):
        StoreWriter(tmp_path, StoreInfo(INFO.fingerprint, INFO.dtype, (8, 7)))
    # The refused writers changed nothing.
    assert list(EmbeddingStore(tmp_path)) == ["a"]


def test_shard_of_another_fingerprint_is_rejected_by_reader(tmp_path):
    _write(tmp_path, ["a"], _embeds(1))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["fingerprint"] = "fp-forged"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match="made by fingerprint fp-test-1"):
        EmbeddingStore(tmp_path)


def test_one_writer_at_a_time(tmp_path):
    w = StoreWriter(tmp_path, INFO)
    try:
        with pytest.raises(StoreError, match="another process"):
            StoreWriter(tmp_path, INFO)
    finally:
        w.close()
    StoreWriter(tmp_path, INFO).close()  # released


def test_refuses_foreign_directories(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(StoreError, match="not an embedding store"):
        StoreWriter(tmp_path, INFO)
    with pytest.raises(StoreError, match="not an embedding store"):
        EmbeddingStore(tmp_path)


def test_recovery_after_kill_between_rename_and_index(tmp_path):
    """A shard renamed into place but never indexed is complete: adopt it, no duplicates."""
    captions = [f"c{i}" for i in range(6)]
    embeds = _embeds(6)
    _write(tmp_path, captions, embeds)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["shards"] = index["shards"][:1]  # the index write of shard 2 "never happened"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    assert len(EmbeddingStore(tmp_path)) == 3  # readers see only what the index lists

    with StoreWriter(tmp_path, INFO) as w:
        assert len(w) == 6 and all(c in w for c in captions)
    store = EmbeddingStore(tmp_path)
    assert sorted(store) == captions
    assert torch.equal(_bits(store.get("c5")), _bits(embeds[5]))


def test_recovery_removes_torn_files_and_damaged_shards(tmp_path):
    captions = [f"c{i}" for i in range(9)]
    embeds = _embeds(9)
    _write(tmp_path, captions, embeds)
    names = _shards(tmp_path)
    # A write killed before its rename, a torn unindexed shard, and a listed shard damaged on disk.
    (tmp_path / ".shard-000003-dead.safetensors.1234.tmp").write_bytes(b"\x00" * 100)
    (tmp_path / "shard-000009-beef.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    damaged = tmp_path / names[1]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="does not match|size"):
        EmbeddingStore(tmp_path)

    with StoreWriter(tmp_path, INFO, shard_bytes=3 * INFO.row_bytes) as w:
        missing = [c for c in captions if c not in w]
        assert missing == ["c3", "c4", "c5"]  # exactly the damaged shard's captions
        for c in missing:
            w.add(c, embeds[int(c[1:])])
    assert not list(tmp_path.glob(".*.tmp"))
    assert "shard-000009-beef.safetensors" not in _shards(tmp_path)
    store = EmbeddingStore(tmp_path)
    assert sorted(store) == sorted(captions)
    for c in captions:
        assert torch.equal(_bits(store.get(c)), _bits(embeds[int(c[1:])]))


def test_missing_listed_shard_is_reported_by_reader(tmp_path):
    _write(tmp_path, ["a", "b", "c", "d"], _embeds(4))
    (tmp_path / _shards(tmp_path)[0]).unlink()
    with pytest.raises(IntegrityError, match="missing; rerun precompute"):
        EmbeddingStore(tmp_path)


def test_store_pickles_for_dataloader_workers(tmp_path):
    _write(tmp_path, ["a", "b"], _embeds(2))
    store = EmbeddingStore(tmp_path)
    store.get("a")  # opens a handle; pickling must drop it
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(_bits(clone.get("b")), _bits(store.get("b")))


def test_dataset_yields_prompt_embeds_and_pipeline_text_ids(tmp_path):
    from diffusers import Flux2Pipeline

    captions = [f"c{i}" for i in range(5)]
    embeds = _embeds(5)
    _write(tmp_path, captions, embeds)
    ds = EmbeddingDataset(tmp_path, captions=["c4", "c0", "c4"])  # repeats allowed
    assert len(ds) == 3
    item = ds[0]
    assert item["caption"] == "c4" and torch.equal(_bits(item["prompt_embeds"]), _bits(embeds[4]))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    batch = next(iter(loader))
    assert batch["prompt_embeds"].shape == (3, *INFO.shape)
    assert batch["text_ids"].dtype == torch.int64
    assert torch.equal(batch["text_ids"], Flux2Pipeline._prepare_text_ids(batch["prompt_embeds"]))
    assert torch.equal(text_ids_for(embeds[0]), Flux2Pipeline._prepare_text_ids(embeds[:1])[0])
    assert list(EmbeddingDataset(tmp_path).captions) == captions


def test_dataset_reports_missing_captions_up_front(tmp_path):
    _write(tmp_path, ["a"], _embeds(1))
    with pytest.raises(KeyError, match="1 of 2 captions are not in the store"):
        EmbeddingDataset(tmp_path, captions=["a", "b"])


def test_failed_commit_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    """A rename that fails (disk full) leaves the previous shards and index intact and no temp file."""
    _write(tmp_path, ["a", "b", "c"], _embeds(3))
    before = (tmp_path / INDEX_NAME).read_text()
    w = StoreWriter(tmp_path, INFO)
    w.add("d", _embeds(1)[0])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    monkeypatch.undo()
    w.close()
    assert (tmp_path / INDEX_NAME).read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert list(EmbeddingStore(tmp_path)) == ["a", "b", "c"]
