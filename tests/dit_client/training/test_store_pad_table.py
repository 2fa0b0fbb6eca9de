"""The store's pad table is kept twice: one damaged or missing copy costs nothing, verify names it, repair restores
it; both lost is a one-line error naming the remedy (the server-side restore is in test_store_faults)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from dit_client import cli
from dit_client.training.store import (
    PAD_TABLE_COPY_NAME,
    PAD_TABLE_KEY,
    PAD_TABLE_NAME,
    PAD_TABLE_NAMES,
    EmbeddingStore,
    PadTableLost,
    StoreWriter,
    repair_pad_table,
    verify_store,
)
from tests.dit_client.training.test_store_v2 import INFO, PADS, TABLE, _bits, _captions, _embedding, _flip_byte, _write


def _store(path):
    captions = _captions(5)
    embeds = torch.stack([_embedding(PADS[i], i) for i in range(5)])
    _write(path, captions, embeds)
    return captions, embeds


def _damage(file, how: str) -> None:
    if how == "flipped byte":
        _flip_byte(file, file.stat().st_size - 3)  # in the rows: the id's CRC-32C no longer matches
    elif how == "missing":
        file.unlink()
    elif how == "torn":
        file.write_bytes(file.read_bytes()[:40])
    else:  # "another table": a sound file, but not the store's
        other = torch.randn((16, 6), generator=torch.Generator().manual_seed(5))
        with StoreWriter(file.parent / "other", INFO, pad_table=other):
            pass
        file.write_bytes((file.parent / "other" / PAD_TABLE_NAME).read_bytes())


def _content(file) -> tuple[dict, bytes]:
    """What a table file holds: its metadata and its rows' bytes (safetensors orders metadata keys freely)."""
    with safe_open(str(file), framework="pt") as f:
        return f.metadata(), f.get_tensor(PAD_TABLE_KEY).contiguous().view(torch.uint8).numpy().tobytes()


def _assert_reads(path, captions, embeds) -> None:
    store = EmbeddingStore(path)
    for c, e in zip(captions, embeds, strict=True):
        assert torch.equal(_bits(store.get(c)), _bits(e)), c


def test_a_new_store_writes_two_identical_copies(tmp_path):
    _store(tmp_path)
    first, copy = (_content(tmp_path / name) for name in PAD_TABLE_NAMES)
    assert first == copy and first[0]["table"] == EmbeddingStore(tmp_path).info.pad_table


# A missing second copy alone is a store written before there were two: see the test after the next one.
@pytest.mark.parametrize(
    ("damaged", "how"),
    [(PAD_TABLE_NAME, how) for how in ("flipped byte", "missing", "torn", "another table")]
    + [(PAD_TABLE_COPY_NAME, how) for how in ("flipped byte", "torn", "another table")],
)
def test_one_unsound_copy_reads_on_verify_names_it_and_repair_restores_it(tmp_path, capsys, caplog, damaged, how):
    captions, embeds = _store(tmp_path)
    sound = next(n for n in PAD_TABLE_NAMES if n != damaged)
    good = _content(tmp_path / sound)
    _damage(tmp_path / damaged, how)

    with caplog.at_level(logging.WARNING, logger="dit_client.training.store"):
        _assert_reads(tmp_path, captions, embeds)
        _assert_reads(tmp_path, captions, embeds)
    # The reader stops at the first sound copy, so only a damaged first copy is seen (and said once).
    warned = [r for r in caplog.records if damaged in r.getMessage()]
    if damaged == PAD_TABLE_NAME:
        assert len(warned) == 1 and "--repair" in warned[0].getMessage()
    else:
        assert not warned

    report = verify_store(tmp_path)
    assert not report.ok and not report.pad_table_lost and not report.damaged
    assert [name for name, _ in report.pad_table_faults] == [damaged]
    assert cli.main(["store", "verify", str(tmp_path), "--no-progress"]) == cli.EXIT_ERROR
    out = capsys.readouterr().out
    assert f"{damaged}: " in out and "--repair" in out

    assert cli.main(["store", "verify", "--repair", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{damaged}: restored" in out and "all sound" in out
    assert _content(tmp_path / damaged) == good
    assert verify_store(tmp_path).ok


def test_the_writer_restores_an_unsound_copy_when_it_opens(tmp_path):
    captions, embeds = _store(tmp_path)
    good = _content(tmp_path / PAD_TABLE_NAME)
    _damage(tmp_path / PAD_TABLE_NAME, "flipped byte")
    with StoreWriter(tmp_path, INFO, verify=True) as w:
        assert not w.dropped
    assert _content(tmp_path / PAD_TABLE_NAME) == good
    assert verify_store(tmp_path).ok
    _assert_reads(tmp_path, captions, embeds)


def test_a_store_written_before_the_second_copy_keeps_working_and_gets_it(tmp_path, caplog):
    captions, embeds = _store(tmp_path)
    good = _content(tmp_path / PAD_TABLE_NAME)
    (tmp_path / PAD_TABLE_COPY_NAME).unlink()  # what this morning's writer left
    with caplog.at_level(logging.WARNING, logger="dit_client.training.store"):
        _assert_reads(tmp_path, captions, embeds)
        assert verify_store(tmp_path).ok  # not damage: nothing to alarm anyone about
    assert not caplog.records
    with StoreWriter(tmp_path, INFO):
        pass
    assert _content(tmp_path / PAD_TABLE_COPY_NAME) == good
    assert not caplog.records


def test_both_copies_lost_is_one_line_naming_the_remedy(tmp_path, capsys):
    captions, embeds = _store(tmp_path)
    _damage(tmp_path / PAD_TABLE_NAME, "flipped byte")
    _damage(tmp_path / PAD_TABLE_COPY_NAME, "missing")

    with pytest.raises(PadTableLost) as caught:
        EmbeddingStore(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and PAD_TABLE_NAME in message and "missing" in message
    assert f"flux2-dit store verify --repair {tmp_path} --encoder HOST:PORT" in message

    report = verify_store(tmp_path)
    assert report.pad_table_lost and not report.ok
    assert cli.main(["store", "verify", str(tmp_path), "--no-progress"]) == cli.EXIT_ERROR
    assert "no sound copy of the pad table" in capsys.readouterr().out

    # --repair with no copy to restore from and no server: the CLI's store error, one line.
    assert cli.main(["store", "verify", "--repair", str(tmp_path), "--no-progress"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flux2-dit: ") and "--encoder HOST:PORT" in err
    assert "Traceback" not in err

    # Another table is no substitute; the same table (say, fetched again) restores both copies.
    other = torch.randn((16, 6), generator=torch.Generator().manual_seed(11))
    with pytest.raises(PadTableLost, match="another one"):
        StoreWriter(tmp_path, INFO, pad_table=other)
    with pytest.raises(PadTableLost, match="another one"):
        repair_pad_table(tmp_path, other)
    assert sorted(repair_pad_table(tmp_path, TABLE)) == sorted(PAD_TABLE_NAMES)
    assert verify_store(tmp_path).ok
    _assert_reads(tmp_path, captions, embeds)
