"""Bulk encoding: encode_stream (bounded, retried, reconnecting), precompute (dedupe, resume, kill -9), the CLI,
and the drop-in remote_text_encoder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.errors import EncoderOverloaded, IntegrityError, InvalidRequest
from dit_client import cli
from dit_client.remote import RemoteTextEncoder
from dit_client.retry import RetryPolicy
from dit_client.training import EmbeddingStore, StoreInfo, StoreWriter, precompute, remote_text_encoder
from dit_client.training.store import INDEX_NAME
from tests.helpers import OverloadedFirst, ProxyBackend, ServerThread, wait_until

REPO = Path(__file__).resolve().parents[3]
FAST_RETRY = RetryPolicy(max_attempts=6, initial_backoff_s=0.05, max_backoff_s=0.2)


class HoldsAfter(ProxyBackend):
    """Answers its first ``n`` prompts; every later forward pass waits until the test opens ``gate``.

    A server caught mid-run, whatever the machine's speed (a fixed delay per pass could
    let a fast machine finish the run before the test had stopped or killed anything).
    """

    def __init__(self, backend, n: int):
        super().__init__(backend)
        self.n = n
        self.gate = threading.Event()

    def encode(self, prompts):
        if len(self.prompts) >= self.n:  # one model thread: no lock needed to read it
            assert self.gate.wait(60), "the test never opened the gate"
        return super().encode(prompts)


def stop_while_held(server: ServerThread, backend: HoldsAfter) -> None:
    """``server.stop(0)`` with work held in ``backend``: the gate opens only once the engine is closing
    (its calls already cut off), since closing waits for the forward pass that is running."""
    engine = server.running.engine
    stopping = threading.Thread(target=server.stop, args=(0,))
    stopping.start()
    wait_until(lambda: engine._closed, what="the stopping server to close its engine")  # noqa: SLF001 - the engine has no public "closed" to wait on
    backend.gate.set()
    stopping.join(30)
    assert not stopping.is_alive(), "the server did not stop"


class OtherModel(ProxyBackend):
    fingerprint = "fp-some-other-model"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _captions(n: int, tag: str = "") -> list[str]:
    return [f"a photo of object {i}{tag}" for i in range(n)]


def _server_on_port(backend, port: int) -> ServerThread:
    s = ServerThread(backend, model_id="tiny-test")
    s.config = replace(s.config, port=port)
    return s


# -- encode_stream -----------------------------------------------------------


def test_encode_stream_returns_every_prompt_once_bit_identical(server):
    prompts = _captions(5) + ["", "ünïcödé 雪"]
    with RemoteTextEncoder(server.target) as enc:
        results = list(enc.encode_stream(prompts, batch_size=2, max_in_flight=3))
        reference = enc.encode(prompts)
    assert sorted(r.index for r in results) == list(range(len(prompts)))
    for r in results:
        assert r.prompt == prompts[r.index]
        assert r.embedding.shape == reference.shape[1:]
        assert torch.equal(_bits(r.embedding), _bits(reference[r.index]))
        assert r.metadata.model_fingerprint == enc.info().fingerprint


def test_encode_stream_consumes_prompts_lazily_with_bounded_window(server):
    pulled = 0

    def prompts():
        nonlocal pulled
        for p in _captions(10, " lazy"):
            pulled += 1
            yield p

    with RemoteTextEncoder(server.target) as enc:
        stream = enc.encode_stream(prompts(), batch_size=2, max_in_flight=2)
        next(stream)
        # One request answered: no more was read than the window of 2 requests x 2 prompts.
        assert pulled == 4
        assert sum(1 for _ in stream) == 9
        assert pulled == 10


def test_encode_stream_retries_resource_exhausted(tiny_backend):
    backend = OverloadedFirst(tiny_backend, failures=2)
    with ServerThread(backend, model_id="tiny-test") as s, RemoteTextEncoder(s.target) as enc:
        results = list(enc.encode_stream(_captions(6, " retry"), batch_size=2, retry=FAST_RETRY))
    assert sorted(r.index for r in results) == list(range(6))
    assert backend.calls > 2  # the failures happened and were retried past


def test_encode_stream_gives_up_after_max_attempts(tiny_backend):
    backend = OverloadedFirst(tiny_backend, failures=10_000)
    with ServerThread(backend, model_id="tiny-test") as s, RemoteTextEncoder(s.target) as enc:
        with pytest.raises(EncoderOverloaded, match=r"gave up after 2 attempts"):
            list(enc.encode_stream(["x"], retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)))


def test_encode_stream_waits_at_least_the_servers_retry_hint(tiny_backend):
    backend = OverloadedFirst(tiny_backend, failures=1, retry_after_s=0.6)
    with ServerThread(backend, model_id="tiny-test") as s, RemoteTextEncoder(s.target) as enc:
        results = list(enc.encode_stream(["hinted"], retry=RetryPolicy(initial_backoff_s=0.01, max_backoff_s=5)))
    assert [r.prompt for r in results] == ["hinted"]
    first, second = backend.call_times[:2]
    assert second - first >= 0.6  # the policy alone would have waited ~10 ms


def test_encode_stream_fails_at_once_when_the_hint_is_longer_than_it_waits(tiny_backend):
    backend = OverloadedFirst(tiny_backend, failures=1, retry_after_s=3 * 3600)
    with ServerThread(backend, model_id="tiny-test") as s, RemoteTextEncoder(s.target) as enc:
        t0 = time.monotonic()
        with pytest.raises(EncoderOverloaded, match=r"asks to retry in 3.0 h.*max_backoff_s=30") as info:
            list(enc.encode_stream(["x"], retry=RetryPolicy(max_attempts=6, max_backoff_s=30)))
    assert time.monotonic() - t0 < 10
    assert backend.calls == 1
    assert info.value.retry_after_s == pytest.approx(3 * 3600)


def test_encode_stream_reconnects_after_server_restart(tiny_backend):
    held = HoldsAfter(tiny_backend, n=2)  # one batch answered, the rest held when the server goes
    first = ServerThread(held, model_id="tiny-test").__enter__()
    port = first.running.port
    replacement = ProxyBackend(tiny_backend)
    second = None
    try:
        with RemoteTextEncoder(first.target) as enc:
            got = []
            for r in enc.encode_stream(_captions(8, " restart"), batch_size=2, max_in_flight=2, retry=FAST_RETRY):
                got.append(r.index)
                if second is None:  # kill the server under the open stream, start a new one on the same port
                    stop_while_held(first, held)
                    second = _server_on_port(replacement, port).__enter__()
        assert sorted(got) == list(range(8))
        assert replacement.calls > 0  # the rest really was sent again, to the new server
    finally:
        held.gate.set()
        first.stop(0)
        if second is not None:
            second.stop(0)


def test_encode_stream_refuses_a_different_model_after_reconnect(tiny_backend):
    held = HoldsAfter(tiny_backend, n=2)
    first = ServerThread(held, model_id="tiny-test").__enter__()
    port = first.running.port
    second = None
    try:
        with RemoteTextEncoder(first.target) as enc:
            with pytest.raises(IntegrityError, match="embeddings would be mixed"):
                for _ in enc.encode_stream(_captions(8, " swap"), batch_size=2, max_in_flight=2, retry=FAST_RETRY):
                    if second is None:
                        stop_while_held(first, held)
                        second = _server_on_port(OtherModel(tiny_backend), port).__enter__()
    finally:
        held.gate.set()
        first.stop(0)
        if second is not None:
            second.stop(0)


def test_encode_stream_rejects_overlong_prompt_by_position(server):
    with RemoteTextEncoder(server.target) as enc:
        limit = enc.info().limits["max_prompt_chars"]
        with pytest.raises(InvalidRequest, match=f"prompt 1 has {limit + 1} characters"):
            list(enc.encode_stream(["ok", "x" * (limit + 1)]))


# -- precompute --------------------------------------------------------------


def _assert_store_matches_service(store: EmbeddingStore, enc: RemoteTextEncoder, captions: list[str]) -> None:
    assert sorted(store) == sorted(set(captions))
    reference = enc.encode(sorted(set(captions)))
    for caption, ref in zip(sorted(set(captions)), reference, strict=True):
        assert torch.equal(_bits(store.get(caption)), _bits(ref)), caption


def test_precompute_dedupes_and_resumes_incrementally(server, tmp_path):
    captions = _captions(7) + _captions(3)  # 3 duplicates
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n")
    out = tmp_path / "store"
    with RemoteTextEncoder(server.target) as enc:
        row_bytes = 512 * enc.info().embedding_dim * 2
        report = precompute(enc, source, out, batch_size=2, concurrency=2, shard_bytes=3 * row_bytes, progress=False)
        assert (report.captions_read, report.unique, report.already_stored, report.encoded) == (10, 7, 0, 7)
        assert report.shards == 3  # 3 + 3 + 1
        _assert_store_matches_service(EmbeddingStore(out), enc, captions)

        again = precompute(enc, source, out, progress=False)
        assert (again.already_stored, again.encoded) == (7, 0)

        source.write_text("\n".join(captions + ["a brand new caption"]) + "\n")
        more = precompute(enc, source, out, progress=False)
        assert (more.already_stored, more.encoded) == (7, 1)
        store = EmbeddingStore(out)
        assert len(store) == 8
        index = json.loads((out / INDEX_NAME).read_text())
        assert index["fingerprint"] == enc.info().fingerprint and index["count"] == 8


def test_precompute_refuses_a_store_of_another_fingerprint(server, tmp_path):
    out = tmp_path / "store"
    with RemoteTextEncoder(server.target) as enc:
        info = enc.info()
        StoreWriter(out, StoreInfo("fp-another-model", info.dtype, (512, info.embedding_dim))).close()
        with pytest.raises(IntegrityError, match="never mixes models"):
            precompute(enc, ["a caption"], out, progress=False)
    assert len(EmbeddingStore(out)) == 0


def test_precompute_refuses_a_bad_caption_before_encoding_anything(server, tmp_path):
    out = tmp_path / "store"
    with RemoteTextEncoder(server.target) as enc:
        limit = enc.info().limits["max_prompt_chars"]
        with pytest.raises(InvalidRequest, match=f"caption 3 has {limit + 1} characters"):
            precompute(enc, ["fine", "also fine", "x" * (limit + 1)], out, progress=False)
    assert len(EmbeddingStore(out)) == 0


def test_cli_precompute_jsonl_and_errors(server, tmp_path, capsys):
    source = tmp_path / "c.jsonl"
    source.write_text("\n".join(json.dumps({"file_name": f"{i}.png", "desc": c}) for i, c in enumerate(_captions(4))))
    out = tmp_path / "store"
    args = [
        "precompute",
        "--encoder",
        server.target,
        "--captions",
        str(source),
        "--out",
        str(out),
        "--caption-field",
        "desc",
        "--concurrency",
        "2",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert "4 distinct captions" in capsys.readouterr().out
    assert len(EmbeddingStore(out)) == 4

    # A field that is not there: usage error naming the fields.
    assert cli.main([a if a != "desc" else "caption" for a in args]) == cli.EXIT_USAGE
    assert "no caption field 'caption'" in capsys.readouterr().err
    # A source that does not exist.
    assert (
        cli.main(
            ["precompute", "--encoder", server.target, "--captions", str(tmp_path / "nope.txt"), "--out", str(out)]
        )
        == cli.EXIT_USAGE
    )
    assert "does not exist" in capsys.readouterr().err


def test_cli_precompute_unreachable_encoder(tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = tmp_path / "c.txt"
    source.write_text("x\n")
    code = cli.main(
        [
            "precompute",
            "--encoder",
            f"127.0.0.1:{port}",
            "--captions",
            str(source),
            "--out",
            str(tmp_path / "s"),
            "--timeout",
            "5",
        ]
    )
    assert code == cli.EXIT_ERROR
    assert "cannot reach the encoder" in capsys.readouterr().err


def test_kill_9_mid_run_then_resume(tiny_backend, tmp_path):
    """SIGKILL the CLI while it streams and writes shards; a rerun completes with each caption exactly once."""
    captions = _captions(24, " kill")
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n")
    out = tmp_path / "store"
    # At most 3 prompts more than 20 start before it holds (2 requests of 2 in flight), so the first run
    # cannot finish, and it has written its two shards (6 captions fill one here) well before.
    backend = HoldsAfter(tiny_backend, n=len(captions) - 4)
    # With its pad table, as `flux2-encoder serve` runs it: the store keeps compact rows.
    with ServerThread(backend, model_id="tiny-test", pad_table=True) as s, RemoteTextEncoder(s.target) as enc:
        row_mib = 512 * enc.info().embedding_dim * 2 / 2**20
        cmd = [
            sys.executable,
            "-m",
            "dit_client.cli",
            "precompute",
            "--encoder",
            s.target,
            "--captions",
            str(source),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--concurrency",
            "2",
            "--shard-size-mb",
            f"{2 * row_mib:.6f}",
            "--no-progress",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def two_shards() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()
            return len(list(out.glob("shard-*.safetensors"))) >= 2

        try:
            wait_until(two_shards, timeout=120, what="precompute to write two shards")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
            backend.gate.set()  # the resumed run below is served normally
        assert proc.returncode == -signal.SIGKILL

        partial = EmbeddingStore(out)  # what the index lists is whole and readable
        assert 0 < len(partial) < len(captions)
        assert json.loads((out / INDEX_NAME).read_text())["pad_table"]
        for c in partial:
            partial.get(c)  # each checked against its CRC-32C

        report = precompute(enc, source, out, progress=False)
        assert report.already_stored >= len(partial)
        assert report.already_stored + report.encoded == len(captions)
        assert not list(out.glob(".*.tmp"))
        store = EmbeddingStore(out)
        assert len(store) == len(captions)  # the reader refuses duplicates, so: each exactly once
        _assert_store_matches_service(store, enc, captions)


# -- remote_text_encoder -------------------------------------------------------


def test_remote_text_encoder_is_a_drop_in(server, tmp_path):
    from diffusers import Flux2Pipeline

    with RemoteTextEncoder(server.target) as enc:
        embeds, text_ids = remote_text_encoder(["a", "b", "a"], encoder=enc, retry=FAST_RETRY)
        reference = enc.encode(["a", "b"])
        assert embeds.shape == (3, 512, enc.info().embedding_dim) and embeds.dtype == torch.bfloat16
        assert torch.equal(_bits(embeds[0]), _bits(reference[0])) and torch.equal(_bits(embeds[2]), _bits(reference[0]))
        assert torch.equal(_bits(embeds[1]), _bits(reference[1]))
        assert torch.equal(text_ids, Flux2Pipeline._prepare_text_ids(embeds))

        one, ids = remote_text_encoder("a", encoder=enc, dtype=torch.float32)
        assert one.shape == (1, 512, enc.info().embedding_dim) and one.dtype == torch.float32
        assert ids.shape == (1, 512, 4)

        # Prompts in a store are read from it, not sent: a marker row proves which path answered.
        info = enc.info()
        marker = torch.full((512, info.embedding_dim), 7.0, dtype=info.dtype)
        with StoreWriter(tmp_path / "s", StoreInfo(info.fingerprint, info.dtype, (512, info.embedding_dim))) as w:
            w.add("stored", marker)
        mixed, _ = remote_text_encoder(["stored", "b"], encoder=enc, store=EmbeddingStore(tmp_path / "s"))
        assert torch.equal(mixed[0], marker) and torch.equal(_bits(mixed[1]), _bits(reference[1]))

        with StoreWriter(tmp_path / "o", StoreInfo("fp-other", info.dtype, (512, info.embedding_dim))) as w:
            w.add("stored", marker)
        with pytest.raises(IntegrityError, match="fp-other"):
            remote_text_encoder(["stored"], encoder=enc, store=EmbeddingStore(tmp_path / "o"))
