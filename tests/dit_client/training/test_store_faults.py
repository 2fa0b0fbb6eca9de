"""Precompute against a server with a pad table: compact store, damage found and re-encoded exactly, a full disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_client import cli
from dit_client.remote import RemoteTextEncoder
from dit_client.training import EmbeddingStore, precompute
from dit_client.training.store import INDEX_NAME, PAD_TABLE_NAMES, PadTableLost, _read_header, verify_store
from tests.helpers import ProxyBackend, ServerThread

REPO = Path(__file__).resolve().parents[3]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _captions(n: int) -> list[str]:
    return [f"a watercolour of harbour boat number {i:02d}" for i in range(n)]


def _locate(store_dir: Path, caption: str) -> tuple[Path, int, int]:
    """The shard holding ``caption``, the file offset of its rows, and their byte length."""
    for file in sorted(store_dir.glob("shard-*.safetensors")):
        header, header_len, _ = _read_header(file)
        captions = json.loads(header["__metadata__"]["captions"])
        if caption in captions:
            entries = json.loads(header["__metadata__"]["entries"])
            i = captions.index(caption)
            width = header["rows"]["shape"][1] * 2
            before = sum(n for n, _, _ in entries[:i])
            return file, 8 + header_len + before * width, entries[i][0] * width
    raise AssertionError(f"{caption!r} is in no shard")


def _assert_matches_service(store_dir: Path, enc: RemoteTextEncoder, captions: list[str]) -> None:
    store = EmbeddingStore(store_dir)
    assert sorted(store) == sorted(captions)
    reference, metadata = enc.encode_with_metadata(captions)
    for caption, ref, meta in zip(captions, reference, metadata, strict=True):
        assert torch.equal(_bits(store.get(caption)), _bits(ref)), caption
        rows, pad = store.get(caption, compact=True)
        assert pad == ref.shape[0] - meta.token_count  # exactly the pad positions left out
        assert torch.equal(_bits(rows), _bits(ref[pad:]))


def test_precompute_keeps_only_real_rows_against_the_servers_table(tiny_backend, tmp_path):
    captions = _captions(6)
    out = tmp_path / "store"
    with ServerThread(tiny_backend, model_id="tiny-test", pad_table=True) as s, RemoteTextEncoder(s.target) as enc:
        precompute(enc, captions, out, progress=False)
        index = json.loads((out / INDEX_NAME).read_text())
        assert index["version"] == 2 and index["pad_table"] == enc.info().described.pad_table
        _assert_matches_service(out, enc, captions)
        row_bytes = 512 * enc.info().embedding_dim * 2
    shards = sum(f.stat().st_size for f in out.glob("shard-*.safetensors"))
    assert shards < len(captions) * row_bytes / 2


def test_precompute_re_encodes_exactly_the_damaged_captions(tiny_backend, tmp_path, capsys):
    captions = _captions(9)
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n")
    out = tmp_path / "store"
    with ServerThread(tiny_backend, model_id="tiny-test", pad_table=True) as s, RemoteTextEncoder(s.target) as enc:
        row_bytes = 512 * enc.info().embedding_dim * 2
        precompute(enc, source, out, shard_bytes=row_bytes // 2, progress=False)  # a few captions per shard
    assert len(list(out.glob("shard-*.safetensors"))) >= 3

    # One byte flipped in the rows of one caption; one caption edited in another shard's header.
    flipped, edited = captions[4], captions[7]
    file, offset, length = _locate(out, flipped)
    data = bytearray(file.read_bytes())
    data[offset + length // 2] ^= 0x01
    file.write_bytes(bytes(data))
    other, _, _ = _locate(out, edited)
    assert other != file
    raw = other.read_bytes()
    other.write_bytes(raw.replace(edited.encode(), edited.replace("number", "NUMBER").encode()))

    assert cli.main(["store", "verify", str(out), "--no-progress"]) == cli.EXIT_ERROR
    report = capsys.readouterr().out
    assert flipped in report and edited.replace("number", "NUMBER") in report and "2 damaged captions" in report

    backend = ProxyBackend(tiny_backend)  # remembers its prompts; a fresh server: no cache to hide a request
    with ServerThread(backend, model_id="tiny-test", pad_table=True) as s:
        args = ["precompute", "--encoder", s.target, "--captions", str(source), "--out", str(out), "--no-progress"]
        assert cli.main(args) == 0
        assert sorted(backend.prompts) == sorted([flipped, edited])  # those two, and nothing else
        assert "2 damaged embeddings dropped" in capsys.readouterr().out
        with RemoteTextEncoder(s.target) as enc:
            _assert_matches_service(out, enc, captions)
    assert verify_store(out).ok


# -- both pad table copies lost ---------------------------------------------------


def test_both_pad_table_copies_lost_are_fetched_again_from_a_server_with_that_table(tiny_backend, tmp_path, capsys):
    captions = _captions(4)
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n")
    out = tmp_path / "store"

    def lose_both() -> None:
        for name in PAD_TABLE_NAMES:
            (out / name).write_bytes(b"not a table")
        with pytest.raises(PadTableLost):
            EmbeddingStore(out)

    with ServerThread(tiny_backend, model_id="tiny-test", pad_table=True) as s:
        args = ["precompute", "--encoder", s.target, "--captions", str(source), "--out", str(out), "--no-progress"]
        assert cli.main(args) == 0
        lose_both()
        assert cli.main(args) == 0  # precompute restores it (and has nothing to encode)
        assert "0 encoded" in capsys.readouterr().out
        assert verify_store(out).ok
        with RemoteTextEncoder(s.target) as enc:
            _assert_matches_service(out, enc, captions)

        lose_both()
        verify = ["store", "verify", "--repair", str(out), "--encoder", s.target, "--no-progress"]
        assert cli.main(verify) == 0
        assert "pad-table.safetensors: restored" in capsys.readouterr().out
        assert verify_store(out).ok

    # A server whose model has no table (or another one) cannot give it back: one line, the store untouched.
    lose_both()
    with ServerThread(tiny_backend, model_id="tiny-test") as s:
        args = ["precompute", "--encoder", s.target, "--captions", str(source), "--out", str(out), "--no-progress"]
        capsys.readouterr()
        assert cli.main(args) == cli.EXIT_ERROR
        err = capsys.readouterr().err.strip()
        assert err.startswith("flux2-dit: ") and "\n" not in err and "Traceback" not in err
        assert f"The encoder at {s.target} does not serve that table" in err and "new --out" in err
    assert all((out / name).read_bytes() == b"not a table" for name in PAD_TABLE_NAMES)


# -- a full disk ---------------------------------------------------------------

_FULL_AFTER_TWO_SHARDS = """
import errno, sys
from pathlib import Path

real = Path.write_bytes
shards = []

def write_bytes(self, data):
    if self.name.startswith(".shard-"):
        shards.append(self.name)
        if len(shards) > 2:  # what a full disk does: part of the data lands, then ENOSPC
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, data)

Path.write_bytes = write_bytes
from dit_client import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _limit_file_size(limit: int):
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("fault", ["ENOSPC after two shards", "a real file size limit (EFBIG)"])
def test_full_disk_ends_with_one_line_and_a_consistent_store(tiny_backend, tmp_path, fault):
    captions = _captions(16)
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n")
    out = tmp_path / "store"
    with ServerThread(tiny_backend, model_id="tiny-test", pad_table=True) as s, RemoteTextEncoder(s.target) as enc:
        row_mib = 512 * enc.info().embedding_dim * 2 / 2**20
        args = ["precompute", "--encoder", s.target, "--captions", str(source), "--out", str(out)]
        args += ["--shard-size-mb", f"{row_mib / 2:.6f}", "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if fault.startswith("ENOSPC"):
            cmd, preexec = [sys.executable, "-c", _FULL_AFTER_TWO_SHARDS, *args], None
        else:
            # Larger than the index and the pad table, smaller than a shard.
            cmd, preexec = [sys.executable, "-m", "dit_client.cli", *args], _limit_file_size(40_000)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)
        assert proc.returncode == cli.EXIT_ERROR, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"flux2-dit: cannot write to the embedding store {out}: ")
        assert last.endswith("run the same command again: finished shards are kept")
        assert proc.stderr.count("cannot write") == 1

        # Consistent: what the index lists is whole and sound, no temporary file is left.
        assert not list(out.glob(".*.tmp"))
        kept = EmbeddingStore(out)
        assert len(kept) < len(captions)
        if fault.startswith("ENOSPC"):
            assert len(json.loads((out / INDEX_NAME).read_text())["shards"]) == 2
        assert verify_store(out).ok

        report = precompute(enc, source, out, progress=False)  # space again: the rest is done
        assert report.already_stored == len(kept) and report.already_stored + report.encoded == len(captions)
        _assert_matches_service(out, enc, captions)
