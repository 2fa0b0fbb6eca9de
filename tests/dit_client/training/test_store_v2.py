"""Store format 2: real rows + pad count against the store's pad table, CRC-32C per embedding, verify, convert,
version 1 stores."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from common.errors import IntegrityError
from common.pad_table import pad_table_id
from dit_client import cli
from dit_client.training import store as store_mod
from dit_client.training.store import (
    FORMAT,
    INDEX_NAME,
    PAD_TABLE_NAME,
    PAD_TABLE_NAMES,
    EmbeddingStore,
    StoreError,
    StoreInfo,
    StoreWriter,
    convert_store,
    verify_store,
)

INFO = StoreInfo("fp-test-2", torch.bfloat16, (16, 6), "tiny")
# The server sends its table in its compute dtype; the store compares it cast to the store's dtype.
TABLE = torch.randn((16, 6), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
PADS = [0, 3, 10, 15, 16, 7, 12, 1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _embedding(pad: int, seed: int, table: torch.Tensor = TABLE) -> torch.Tensor:
    """A left-padded embedding: the table's first ``pad`` rows, then rows of its own."""
    real = torch.randn((INFO.shape[0] - pad, INFO.shape[1]), generator=torch.Generator().manual_seed(seed))
    return torch.cat([table[:pad], real]).to(torch.bfloat16)


def _captions(n: int) -> list[str]:
    return [f"caption number {i:02d}" for i in range(n)]


def _write(path, captions, embeds, *, table=TABLE, per_shard=3, info=INFO):
    with StoreWriter(path, info, pad_table=table) as w:
        for i, (c, e) in enumerate(zip(captions, embeds, strict=True)):
            w.add(c, e)
            if i % per_shard == per_shard - 1:
                w.flush()
    return w


def _shard_files(path):
    return sorted(path.glob("shard-*.safetensors"))


def _data_start(file) -> int:
    (header_len,) = struct.unpack("<Q", file.read_bytes()[:8])
    return 8 + header_len


def _flip_byte(file, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x40
    file.write_bytes(bytes(data))


def _write_v1(path, captions, embeds, info=INFO, per_shard=3):
    """A store exactly as the version 1 writer made it: [N, L, D] per shard, no checksums, no pad table."""
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(0, len(captions), per_shard):
        name = f"shard-{k // per_shard:06d}-0000000{k % 10}.safetensors"
        part = captions[k : k + per_shard]
        meta = {"format": FORMAT, "fingerprint": info.fingerprint, "captions": json.dumps(part, ensure_ascii=False)}
        save_file({"embeddings": embeds[k : k + per_shard].contiguous()}, str(path / name), metadata=meta)
        shards.append({"file": name, "count": len(part), "bytes": (path / name).stat().st_size})
    index = {"format": FORMAT, "version": 1, **info.to_json(), "count": len(captions), "shards": shards}
    del index["pad_table"]
    (path / INDEX_NAME).write_text(json.dumps(index))


# -- compact rows --------------------------------------------------------------


def test_compact_rows_rebuild_bit_identical(tmp_path):
    captions = _captions(len(PADS))
    embeds = torch.stack([_embedding(p, i) for i, p in enumerate(PADS)])
    _write(tmp_path, captions, embeds)

    store = EmbeddingStore(tmp_path)
    assert list(store) == captions
    for c, e, pad in zip(captions, embeds, PADS, strict=True):
        full = store.get(c)
        assert full.shape == INFO.shape and full.dtype == torch.bfloat16
        assert torch.equal(_bits(full), _bits(e)), c
        rows, pad_count = store.get(c, compact=True)
        # Every leading row equal to the table is left out, and one row always stays.
        assert pad_count == min(pad, INFO.shape[0] - 1)
        assert rows.shape == (INFO.shape[0] - pad_count, INFO.shape[1])
        assert torch.equal(_bits(rows), _bits(e[pad_count:]))
    # Only real rows reached the disk: [sum n, D], not [N, L, D].
    stored_rows = sum(INFO.shape[0] - min(p, INFO.shape[0] - 1) for p in PADS)
    data = sum(f.stat().st_size - _data_start(f) for f in _shard_files(tmp_path))
    assert data == stored_rows * INFO.shape[1] * 2


def test_a_row_that_only_looks_like_padding_is_kept_exactly(tmp_path):
    """Rows are left out only while they equal the table bit for bit: one ulp apart is a real row."""
    e = _embedding(4, 1)
    e[4] = TABLE[4].to(torch.bfloat16)
    e.view(torch.int16)[4, 0] += 1  # one element one ulp away
    _write(tmp_path, ["almost"], e[None])
    rows, pad = EmbeddingStore(tmp_path).get("almost", compact=True)
    assert pad == 4 and torch.equal(_bits(EmbeddingStore(tmp_path).get("almost")), _bits(e))


def test_store_keeps_the_table_it_was_made_with(tmp_path):
    _write(tmp_path, ["a"], _embedding(5, 0)[None])
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["version"] == 2 and index["pad_table"] == pad_table_id(INFO.fingerprint, TABLE)
    assert (tmp_path / PAD_TABLE_NAME).is_file()
    # A later writer offered another table keeps the store's: old and new entries rebuild alike.
    other = torch.randn((16, 6), generator=torch.Generator().manual_seed(99))
    e = _embedding(9, 1)
    with StoreWriter(tmp_path, INFO, pad_table=other) as w:
        w.add("b", e)
    store = EmbeddingStore(tmp_path)
    assert store.get("b", compact=True)[1] == 9 and torch.equal(_bits(store.get("b")), _bits(e))
    assert json.loads((tmp_path / INDEX_NAME).read_text())["pad_table"] == index["pad_table"]


def test_damaged_or_replaced_pad_table_is_refused_when_both_copies_are(tmp_path):
    # One unsound copy is covered by test_store_pad_table; here neither is left.
    _write(tmp_path, ["a"], _embedding(5, 0)[None])
    for name in PAD_TABLE_NAMES:
        _flip_byte(tmp_path / name, (tmp_path / name).stat().st_size - 3)
    with pytest.raises(IntegrityError, match="pad-table.safetensors: not the table the store was made with"):
        EmbeddingStore(tmp_path)
    (tmp_path / PAD_TABLE_NAME).unlink()
    with pytest.raises(
        IntegrityError, match=r"no sound copy of the store's pad table .*pad-table.safetensors: missing"
    ):
        EmbeddingStore(tmp_path)


def test_model_without_a_table_stores_whole_rows(tmp_path):
    e = _embedding(6, 0)
    _write(tmp_path, ["right-padded"], e[None], table=None)
    store = EmbeddingStore(tmp_path)
    rows, pad = store.get("right-padded", compact=True)
    assert pad == 0 and torch.equal(_bits(rows), _bits(e))
    assert json.loads((tmp_path / INDEX_NAME).read_text())["pad_table"] == ""
    assert not any((tmp_path / name).exists() for name in PAD_TABLE_NAMES)


def test_shard_of_another_pad_table_is_refused(tmp_path):
    _write(tmp_path / "a", ["a"], _embedding(5, 0)[None])
    other = torch.randn((16, 6), generator=torch.Generator().manual_seed(3))
    _write(tmp_path / "b", ["b"], _embedding(5, 1, other)[None], table=other)
    # Shard of store b moved into store a and listed there.
    stray = _shard_files(tmp_path / "b")[0]
    (tmp_path / "a" / stray.name).write_bytes(stray.read_bytes())
    index = json.loads((tmp_path / "a" / INDEX_NAME).read_text())
    index["shards"].append({"file": stray.name, "count": 1, "bytes": stray.stat().st_size})
    (tmp_path / "a" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match=r"compacted against pad table fp-test-2/pad:16:.*store's table is"):
        EmbeddingStore(tmp_path / "a")
    report = verify_store(tmp_path / "a")
    assert [(d.file, d.captions, d.whole) for d in report.damaged] == [(stray.name, ("b",), True)]


# -- checksums, verify ---------------------------------------------------------


def _damage(path, captions):
    """Flip one byte in the rows of captions[4] and edit captions[7] in its shard's header (same length)."""
    files = _shard_files(path)
    second = files[1]  # captions 3, 4, 5
    rows, _ = EmbeddingStore(path).get(captions[3], compact=True)
    _flip_byte(second, _data_start(second) + rows.numel() * 2 + 5)  # a byte of captions[4]'s rows
    third = files[2]  # captions 6, 7, 8
    data = third.read_bytes()
    assert data.count(captions[7].encode()) == 1
    third.write_bytes(data.replace(captions[7].encode(), captions[7][:-2].encode() + b"XX"))
    return captions[7][:-2] + "XX"


def test_flipped_byte_and_edited_caption_are_caught(tmp_path, capsys):
    captions = _captions(9)
    embeds = torch.stack([_embedding(PADS[i % len(PADS)], i) for i in range(9)])
    _write(tmp_path, captions, embeds)
    edited = _damage(tmp_path, captions)

    store = EmbeddingStore(tmp_path)  # headers are still well-formed: it opens
    with pytest.raises(IntegrityError, match="caption number 04.*fails its CRC-32C"):
        store.get(captions[4])
    with pytest.raises(IntegrityError, match="fails its CRC-32C"):
        store.get(edited)
    with pytest.raises(IntegrityError, match="fails its CRC-32C"):
        store.get(captions[4], compact=True)
    for i in (0, 3, 5, 6, 8):  # every other embedding reads fine
        assert torch.equal(_bits(store.get(captions[i])), _bits(embeds[i]))

    report = verify_store(tmp_path)
    assert not report.ok and report.bad_captions == [captions[4], edited]
    assert all(not d.whole for d in report.damaged)

    assert cli.main(["store", "verify", str(tmp_path), "--no-progress"]) == cli.EXIT_ERROR
    out = capsys.readouterr().out
    assert "caption number 04" in out and "XX" in out and "2 damaged captions in 2 of 3 shards" in out


def test_writer_with_verify_drops_exactly_the_damaged_embeddings(tmp_path):
    captions = _captions(9)
    embeds = torch.stack([_embedding(PADS[i % len(PADS)], i) for i in range(9)])
    _write(tmp_path, captions, embeds)
    edited = _damage(tmp_path, captions)

    with StoreWriter(tmp_path, INFO) as w:  # without verify only the structure is checked
        assert captions[4] in w and edited in w
    with StoreWriter(tmp_path, INFO, verify=True) as w:
        assert w.dropped == [captions[4], edited]
        assert [c for c in captions if c not in w] == [captions[4], captions[7]]
        w.add(captions[4], embeds[4])
    assert verify_store(tmp_path).ok
    store = EmbeddingStore(tmp_path)
    assert sorted(store) == sorted(c for c in captions if c != captions[7])
    for c in store:
        assert torch.equal(_bits(store.get(c)), _bits(embeds[captions.index(c)]))


def test_verify_of_a_sound_store(tmp_path, capsys):
    _write(tmp_path, _captions(4), torch.stack([_embedding(3, i) for i in range(4)]))
    assert verify_store(tmp_path).ok
    assert cli.main(["store", "verify", str(tmp_path), "--no-progress"]) == 0
    assert "4 captions in 2 shards, all sound" in capsys.readouterr().out


# -- version 1 -----------------------------------------------------------------


def test_version_1_store_stays_readable_and_is_not_written_to(tmp_path):
    captions = _captions(5)
    embeds = torch.stack([_embedding(PADS[i], i) for i in range(5)])
    _write_v1(tmp_path, captions, embeds)
    store = EmbeddingStore(tmp_path)
    assert list(store) == captions
    for c, e in zip(captions, embeds, strict=True):
        assert torch.equal(_bits(store.get(c)), _bits(e))
        rows, pad = store.get(c, compact=True)
        assert pad == 0 and torch.equal(_bits(rows), _bits(e))
    with pytest.raises(StoreError, match=f"version 1 .* flux2-dit store convert {tmp_path}"):
        StoreWriter(tmp_path, INFO)
    assert verify_store(tmp_path).ok and verify_store(tmp_path).version == 1


def test_convert_rewrites_version_1_bit_identical_and_smaller(tmp_path, capsys):
    captions = _captions(8)
    embeds = torch.stack([_embedding(PADS[i], i) for i in range(8)])
    _write_v1(tmp_path, captions, embeds)
    before = sum(f.stat().st_size - _data_start(f) for f in _shard_files(tmp_path))

    assert cli.main(["store", "convert", str(tmp_path), "--no-progress"]) == 0
    assert "converted to version 2, 8 captions" in capsys.readouterr().out
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["version"] == 2 and index["pad_table"]
    store = EmbeddingStore(tmp_path)
    assert list(store) == captions
    for c, e, pad in zip(captions, embeds, PADS, strict=True):
        assert torch.equal(_bits(store.get(c)), _bits(e))
        # The table read off the store itself: rows shared by two or more embeddings at each position.
        assert store.get(c, compact=True)[1] == min(pad, 15)
    after = sum(f.stat().st_size - _data_start(f) for f in _shard_files(tmp_path))
    assert after == sum(16 - min(p, 15) for p in PADS) * 6 * 2 < before * 0.6
    assert verify_store(tmp_path).ok
    assert not (tmp_path / store_mod.CONVERT_DIR).exists()
    # Idempotent; and the converted store takes new embeddings.
    assert not convert_store(tmp_path).converted
    with StoreWriter(tmp_path, INFO) as w:
        w.add("new", _embedding(11, 50))
    assert EmbeddingStore(tmp_path).get("new", compact=True)[1] == 11


def test_convert_interrupted_before_the_switch_leaves_version_1(tmp_path, monkeypatch):
    captions = _captions(6)
    embeds = torch.stack([_embedding(PADS[i], i) for i in range(6)])
    _write_v1(tmp_path, captions, embeds)
    real = store_mod._write_index

    def crash_on_switch(path, info, shards, version=store_mod.VERSION):
        if path == tmp_path:
            raise KeyboardInterrupt  # as good as a kill for what is on disk at this point
        real(path, info, shards, version)

    monkeypatch.setattr(store_mod, "_write_index", crash_on_switch)
    with pytest.raises(KeyboardInterrupt):
        convert_store(tmp_path)
    monkeypatch.undo()
    store = EmbeddingStore(tmp_path)  # still the version 1 store, whole
    assert store.versions == [1] and list(store) == captions
    report = convert_store(tmp_path)
    assert report.converted and report.captions == 6
    store = EmbeddingStore(tmp_path)
    assert store.versions == [2]
    for c, e in zip(captions, embeds, strict=True):
        assert torch.equal(_bits(store.get(c)), _bits(e))
    assert len(_shard_files(tmp_path)) == len(json.loads((tmp_path / INDEX_NAME).read_text())["shards"])


# -- a failed write ------------------------------------------------------------


def test_a_failed_write_stops_the_writer_without_a_second_attempt(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    _write(tmp_path, _captions(3), torch.stack([_embedding(3, i) for i in range(3)]))
    before = (tmp_path / INDEX_NAME).read_text()
    calls = []

    def full(self, data):
        calls.append(self.name)
        raise OSError(errno.ENOSPC, "No space left on device")

    w = StoreWriter(tmp_path, INFO)
    w.add("d", _embedding(2, 9))
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(store_mod.StoreWriteError, match="No space left on device. Free some space") as info:
        w.flush()
    assert info.value.errno == errno.ENOSPC and "Errno" not in str(info.value)
    with pytest.raises(StoreError, match="stopped after a failed write"):
        w.add("e", _embedding(2, 10))
    w.close()  # nothing tried again
    monkeypatch.undo()
    assert len(calls) == 1
    assert (tmp_path / INDEX_NAME).read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert list(EmbeddingStore(tmp_path)) == _captions(3)


def test_repair_interrupted_before_the_index_swap_keeps_every_good_embedding(tmp_path, monkeypatch):
    """The good rest of a damaged shard is written under a new name first: killed there, nothing sound is lost."""
    captions = _captions(9)
    embeds = torch.stack([_embedding(PADS[i % len(PADS)], i) for i in range(9)])
    _write(tmp_path, captions, embeds)
    _damage(tmp_path, captions)
    real = store_mod._write_index
    calls = []

    def killed_at_the_swap(path, info, shards, version=store_mod.VERSION):
        calls.append(len(shards))
        if len(calls) == 2:  # the second repair's index swap; the first one went through
            raise KeyboardInterrupt
        real(path, info, shards, version)

    monkeypatch.setattr(store_mod, "_write_index", killed_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        StoreWriter(tmp_path, INFO, verify=True)
    monkeypatch.undo()
    assert len(_shard_files(tmp_path)) == 4  # the three listed and one new, unlisted
    with StoreWriter(tmp_path, INFO, verify=True) as w:
        assert [c for c in captions if c not in w] == [captions[4], captions[7]]
    store = EmbeddingStore(tmp_path)
    assert len(_shard_files(tmp_path)) == 3
    for c in store:
        assert torch.equal(_bits(store.get(c)), _bits(embeds[captions.index(c)]))


def test_convert_on_a_full_disk_leaves_version_1_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    captions = _captions(4)
    embeds = torch.stack([_embedding(PADS[i], i) for i in range(4)])
    _write_v1(tmp_path, captions, embeds)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    assert cli.main(["store", "convert", str(tmp_path), "--no-progress"]) == cli.EXIT_ERROR
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"flux2-dit: cannot convert {tmp_path}: No space left on device. It is left as it was (version 1, "
        "readable); free some space (the new shards need about a tenth of the old ones) and run the command again"
    )
    assert not (tmp_path / store_mod.CONVERT_DIR).exists()
    store = EmbeddingStore(tmp_path)
    assert store.versions == [1] and list(store) == captions
