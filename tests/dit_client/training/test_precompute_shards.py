"""``precompute --shard I/N`` (one store per shard, every caption in exactly one) and EmbeddingStore over several folders."""

from __future__ import annotations

import pytest
import torch

from common.errors import IntegrityError, InvalidRequest
from dit_client import cli
from dit_client.remote import RemoteTextEncoder
from dit_client.training import EmbeddingStore, StoreInfo, StoreWriter, precompute
from dit_client.training.store import StoreError

# 14 distinct captions, some repeated in the source: a repeat must stay in its first caption's shard.
CAPTIONS = [f"shard caption {i}" for i in range(14)]
SOURCE = CAPTIONS[:7] + ["shard caption 2", "shard caption 5"] + CAPTIONS[7:] + ["shard caption 0"]


def test_n_shards_cover_every_caption_once_and_open_as_one_store(server, tmp_path):
    with RemoteTextEncoder(server.target) as enc:
        reports = [precompute(enc, SOURCE, tmp_path / f"part-{i}", shard=(i, 3), progress=False) for i in range(3)]
        expected = enc.encode(CAPTIONS)
    # Distinct caption k (in order of first appearance) goes to shard k % 3.
    parts = [EmbeddingStore(tmp_path / f"part-{i}") for i in range(3)]
    for i, part in enumerate(parts):
        assert sorted(part) == sorted(c for k, c in enumerate(CAPTIONS) if k % 3 == i)
        assert reports[i].unique == len(part) and reports[i].captions_read == len(SOURCE)
    store = EmbeddingStore([tmp_path / f"part-{i}" for i in range(3)])
    assert len(store) == len(CAPTIONS) and sorted(store) == sorted(CAPTIONS)
    assert store.paths == [tmp_path / f"part-{i}" for i in range(3)] and store.path == tmp_path / "part-0"
    for k, caption in enumerate(CAPTIONS):
        assert torch.equal(store[caption], expected[k])
    assert dict((c, e) for c, e in store.items()).keys() == set(CAPTIONS)


def test_a_rerun_of_one_shard_encodes_nothing_again(server, tmp_path):
    with RemoteTextEncoder(server.target) as enc:
        precompute(enc, SOURCE, tmp_path / "part-1", shard=(1, 2), progress=False)
        again = precompute(enc, SOURCE, tmp_path / "part-1", shard=(1, 2), progress=False)
    assert again.encoded == 0 and again.already_stored == 7


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0)])
def test_a_shard_outside_its_count_is_refused(server, tmp_path, shard):
    with RemoteTextEncoder(server.target) as enc, pytest.raises(InvalidRequest, match="0 <= I < N"):
        precompute(enc, SOURCE, tmp_path / "x", shard=shard, progress=False)


def test_cli_shard_flag(server, tmp_path, capsys):
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(SOURCE) + "\n")
    for i in range(2):
        code = cli.main(
            [
                "precompute",
                "--encoder",
                server.target,
                "--captions",
                str(source),
                "--out",
                str(tmp_path / f"s{i}"),
                "--shard",
                f"{i}/2",
                "--no-progress",
            ]
        )
        assert code == 0
        assert f"in shard {i}/2" in capsys.readouterr().out
    assert sorted(EmbeddingStore([tmp_path / "s0", tmp_path / "s1"])) == sorted(CAPTIONS)
    for bad in ("2/2", "1", "a/b", "1/0"):
        with pytest.raises(SystemExit):
            cli.main(
                [
                    "precompute",
                    "--encoder",
                    server.target,
                    "--captions",
                    str(source),
                    "--out",
                    str(tmp_path / "bad"),
                    "--shard",
                    bad,
                ]
            )


def _store(path, fingerprint: str, captions: list[str], fill: float) -> None:
    info = StoreInfo(fingerprint, torch.bfloat16, (4, 8))
    with StoreWriter(path, info) as writer:
        for caption in captions:
            writer.add(caption, torch.full((4, 8), fill, dtype=torch.bfloat16))


def test_stores_of_different_models_are_not_opened_together(tmp_path):
    _store(tmp_path / "a", "fp-a", ["x"], 1.0)
    _store(tmp_path / "b", "fp-b", ["y"], 2.0)
    with pytest.raises(IntegrityError, match="one model"):
        EmbeddingStore([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(StoreError, match="no store directory"):
        EmbeddingStore([])


def test_a_caption_in_two_folders_is_read_from_the_first(tmp_path):
    _store(tmp_path / "a", "fp", ["x", "y"], 1.0)
    _store(tmp_path / "b", "fp", ["y", "z"], 2.0)
    store = EmbeddingStore([tmp_path / "a", tmp_path / "b"])
    assert list(store) == ["x", "y", "z"]
    assert store["y"].float().mean() == 1.0 and store["z"].float().mean() == 2.0
    assert "EmbeddingStore([" in repr(store)
