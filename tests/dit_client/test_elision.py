"""The client's pad-free wire: real rows over the wire, full embeddings back, bit for bit.

``RemoteTextEncoder`` names the model's pad table by default and puts the pad
rows back; its results must equal the reference whatever the wire carried, and
anything wrong with the table (damaged, foreign, unobtainable) must cost bytes,
never a wrong embedding or a failed encode.
"""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

import dit_client.pad_table as pad_table_module
from common.demo import TinyKleinSpec, build_tiny_klein
from common.errors import IntegrityError
from common.model_source import resolve_model
from common.pad_table import rebuild
from common.protocol import pb2
from dit_client.remote import RemoteTextEncoder
from encoder_server.text_encoder import TruncatedMistral3Encoder, TruncatedTextEncoder
from tests.helpers import ServerThread

PROMPTS = ["a red fox sitting in fresh snow", "", "a hermit crab in a shell of blown glass " * 4]
RESPONSE_BYTES = "flux2_encoder_response_bytes_total"


@pytest.fixture(scope="module")
def elide_server(tiny_backend):
    """The tiny FLUX.2 model served with its pad table, as `flux2-encoder serve` loads it."""
    with ServerThread(tiny_backend, model_id="tiny-test", pad_table=True) as s:
        yield s


@pytest.fixture()
def fetches(monkeypatch):
    """Counts ``GetPadTable`` downloads made by clients."""
    calls = []
    real = pad_table_module.fetch

    def counted(*args, **kwargs):
        calls.append(args[1].pad_table)
        return real(*args, **kwargs)

    monkeypatch.setattr(pad_table_module, "fetch", counted)
    return calls


def sent_bytes(server) -> float:
    return server.running.metrics.sample(RESPONSE_BYTES, {"transport": "grpc"})


def encode(server, prompts, **kwargs):
    """``(embeddings, metadata, embedding bytes the server sent)`` from one client call."""
    dtype = kwargs.pop("dtype", None)
    before = sent_bytes(server)
    with RemoteTextEncoder(server.target, **kwargs) as enc:
        embeds, meta = enc.encode_with_metadata(prompts, dtype=dtype)
    return embeds, meta, sent_bytes(server) - before


def mistral_reference(folder, prompts):
    """diffusers' own function on the full, untruncated model: the ground truth."""
    text_encoder = Mistral3ForConditionalGeneration.from_pretrained(
        folder / "text_encoder", dtype=torch.bfloat16
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    with torch.no_grad():
        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(text_encoder, tokenizer, prompts)


# -- the lossless wire -----------------------------------------------------------


def test_elided_encode_equals_the_reference_and_moves_only_real_rows(elide_server, tiny_model_dir, tmp_path):
    full, full_meta, full_bytes = encode(elide_server, PROMPTS, elide=False)
    elided, meta, elided_bytes = encode(elide_server, PROMPTS, pad_table_dir=tmp_path)

    assert elided.shape == full.shape == (3, 512, 48) and elided.dtype is torch.bfloat16
    assert torch.equal(elided, full)
    assert torch.equal(elided, mistral_reference(tiny_model_dir, PROMPTS))
    assert [m.pad_rows_elided for m in full_meta] == [0, 0, 0]
    assert [m.pad_rows_elided for m in meta] == [512 - m.token_count for m in meta]
    assert all(m.pad_rows_elided > 0 for m in meta)
    row_bytes = 48 * 2
    assert full_bytes == 3 * 512 * row_bytes
    assert elided_bytes == sum(m.token_count for m in meta) * row_bytes < full_bytes


def test_a_cast_output_is_rebuilt_from_the_cast_table(elide_server, tiny_backend, tmp_path):
    elided, meta, _ = encode(elide_server, PROMPTS[:1], dtype=torch.float32, pad_table_dir=tmp_path)
    assert meta[0].pad_rows_elided > 0 and elided.dtype is torch.float32
    assert torch.equal(elided, tiny_backend.encode(PROMPTS[:1]).embeddings.float())


def test_the_table_is_fetched_once_and_kept_on_disk(elide_server, tmp_path, fetches):
    with RemoteTextEncoder(elide_server.target, pad_table_dir=tmp_path) as enc:
        first = enc.encode(PROMPTS)
        again = enc.encode(PROMPTS[:1])
        table_id = enc.info().described.pad_table
    assert fetches == [table_id]
    assert torch.equal(again[0], first[0])
    assert pad_table_module.PadTables(tmp_path).load(table_id) is not None
    with RemoteTextEncoder(elide_server.target, pad_table_dir=tmp_path) as enc:  # another process, same disk
        assert torch.equal(enc.encode(PROMPTS), first)
    assert fetches == [table_id]


def test_threads_sharing_a_client_fetch_the_table_once(elide_server, tiny_backend, tmp_path, fetches):
    from concurrent.futures import ThreadPoolExecutor

    expected = tiny_backend.encode(PROMPTS[:1]).embeddings
    with RemoteTextEncoder(elide_server.target, pad_table_dir=tmp_path) as enc:
        enc.info()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: enc.encode_with_metadata(PROMPTS[:1]), range(4)))
    assert len(fetches) == 1
    for embeds, meta in results:
        assert meta[0].pad_rows_elided > 0 and torch.equal(embeds, expected)


def test_stream_items_rebuild_and_expose_their_compact_rows(elide_server, tiny_backend, tmp_path):
    expected = tiny_backend.encode(PROMPTS)
    with RemoteTextEncoder(elide_server.target, pad_table_dir=tmp_path) as enc:
        table_id = enc.info().described.pad_table
        table = pad_table_module.PadTables(tmp_path).get(enc.connection.stub, enc.info().described)
        items = sorted(enc.encode_stream(PROMPTS, batch_size=2), key=lambda r: r.index)
    for item, want, tokens in zip(items, expected.embeddings, expected.token_counts, strict=True):
        assert torch.equal(item.embedding, want)
        rows, pad_count = item.compact()
        assert rows.shape == (tokens, 48) and pad_count == 512 - tokens == item.metadata.pad_rows_elided
        assert item.pad_table == table_id
        assert torch.equal(rebuild(rows, pad_count, table), want)


def test_stream_without_elision_has_no_compact_rows(elide_server, tmp_path):
    with RemoteTextEncoder(elide_server.target, elide=False, pad_table_dir=tmp_path) as enc:
        (item,) = enc.encode_stream(PROMPTS[:1])
    rows, pad_count = item.compact()
    assert pad_count == 0 and rows.shape == (512, 48) and item.pad_table == ""
    assert not list(tmp_path.iterdir())


# -- turning it off, and servers or models that cannot elide -----------------------


def test_elide_false_gets_full_tensors_and_fetches_nothing(elide_server, tmp_path, fetches):
    embeds, meta, sent = encode(elide_server, PROMPTS, elide=False, pad_table_dir=tmp_path)
    assert [m.pad_rows_elided for m in meta] == [0, 0, 0] and sent == 3 * 512 * 48 * 2
    assert fetches == [] and not list(tmp_path.iterdir())


def test_a_server_without_tables_gets_full_tensors_and_no_error(server, tiny_backend, tmp_path, fetches):
    """An older server (or one whose model has no table) names none in GetInfo: nothing is asked."""
    embeds, meta, _ = encode(server, PROMPTS, pad_table_dir=tmp_path)
    assert torch.equal(embeds, tiny_backend.encode(PROMPTS).embeddings)
    assert [m.pad_rows_elided for m in meta] == [0, 0, 0] and fetches == []


def test_a_right_padding_model_gets_full_tensors_and_no_error(tiny_model_dir_right, tmp_path, fetches):
    source = resolve_model(str(tiny_model_dir_right), components=("text_encoder", "tokenizer"))
    backend = TruncatedMistral3Encoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)
    with ServerThread(backend, pad_table=True) as s:
        with RemoteTextEncoder(s.target, pad_table_dir=tmp_path) as enc:
            assert enc.info().described.pad_table == ""
        embeds, meta, sent = encode(s, PROMPTS, pad_table_dir=tmp_path)
    assert torch.equal(embeds, backend.encode(PROMPTS).embeddings)
    assert [m.pad_rows_elided for m in meta] == [0, 0, 0] and sent == 3 * 512 * 48 * 2
    assert fetches == []


def test_the_cli_flag_turns_elision_off():
    from dit_client.cli import build_parser
    from dit_client.commands.common_args import encoder_from_args

    args = ["encode", "--encoder", "127.0.0.1:1", "--prompt", "x", "--out", "x.safetensors"]
    with encoder_from_args(build_parser().parse_args(args)) as enc:
        assert enc.elision.tables is not None
    with encoder_from_args(build_parser().parse_args([*args, "--no-elide"])) as enc:
        assert enc.elision.tables is None


# -- a table on disk that must not be used ---------------------------------------


def table_file(server, root):
    with RemoteTextEncoder(server.target, pad_table_dir=root) as enc:
        table_id = enc.info().described.pad_table
        enc.encode(PROMPTS[:1])  # fetched and kept
    return table_id, pad_table_module.PadTables(root).path_of(table_id)


def test_a_damaged_table_on_disk_is_fetched_again_not_used(elide_server, tiny_backend, tmp_path, fetches):
    table_id, path = table_file(elide_server, tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in the rows
    path.write_bytes(bytes(data))

    embeds, meta, _ = encode(elide_server, PROMPTS, pad_table_dir=tmp_path)
    assert fetches == [table_id, table_id]
    assert all(m.pad_rows_elided > 0 for m in meta)
    assert torch.equal(embeds, tiny_backend.encode(PROMPTS).embeddings)
    assert pad_table_module.PadTables(tmp_path).load(table_id) is not None  # a good copy again


def test_another_models_table_under_this_name_is_fetched_again(elide_server, tiny_backend, tmp_path, fetches):
    """A file whose rows and checksum are sound but whose fingerprint is another model's is not used."""
    table_id, path = table_file(elide_server, tmp_path)
    rows = safetensors.torch.load(path.read_bytes())["pad_rows"]
    foreign = "flux2-dev:00000000deadbeef" + table_id[table_id.index("/pad:") :]
    path.write_bytes(
        safetensors.torch.save(
            {"pad_rows": (rows + 1).contiguous()}, metadata={"format": "flux2-remote-pad-table/1", "table": foreign}
        )
    )

    embeds, meta, _ = encode(elide_server, PROMPTS, pad_table_dir=tmp_path)
    assert fetches == [table_id, table_id]
    assert torch.equal(embeds, tiny_backend.encode(PROMPTS).embeddings)
    assert torch.equal(pad_table_module.PadTables(tmp_path).load(table_id), rows)


def test_a_failed_fetch_falls_back_to_full_tensors_and_warns_once(
    elide_server, tiny_backend, tmp_path, monkeypatch, caplog
):
    def broken(*args, **kwargs):
        raise IntegrityError("the pad table received is not the one named")

    monkeypatch.setattr(pad_table_module, "fetch", broken)
    with caplog.at_level(logging.WARNING, logger="dit_client.pad_table"):
        with RemoteTextEncoder(elide_server.target, pad_table_dir=tmp_path) as enc:
            first, meta = enc.encode_with_metadata(PROMPTS)
            second = enc.encode(PROMPTS)
    assert torch.equal(first, tiny_backend.encode(PROMPTS).embeddings) and torch.equal(second, first)
    assert [m.pad_rows_elided for m in meta] == [0, 0, 0]
    warnings = [r for r in caplog.records if "could not fetch pad table" in r.getMessage()]
    assert len(warnings) == 1


def test_a_failed_table_is_tried_again_later(elide_server, tiny_backend, tmp_path, monkeypatch):
    real, calls = pad_table_module.fetch, []

    def down_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise IntegrityError("the server sent no pad table")
        return real(*args, **kwargs)

    monkeypatch.setattr(pad_table_module, "fetch", down_once)
    with RemoteTextEncoder(elide_server.target, pad_table_dir=tmp_path) as enc:
        _, whole = enc.encode_with_metadata(PROMPTS[:1])
        _, still_whole = enc.encode_with_metadata(PROMPTS[:1])  # within retry_after_s: not asked again
        assert len(calls) == 1
        enc.elision.retry_after_s = 0.0
        embeds, elided = enc.encode_with_metadata(PROMPTS[:1])
    assert len(calls) == 2
    assert whole[0].pad_rows_elided == still_whole[0].pad_rows_elided == 0 < elided[0].pad_rows_elided
    assert torch.equal(embeds, tiny_backend.encode(PROMPTS[:1]).embeddings)


def test_an_unwritable_table_folder_still_elides(elide_server, tiny_backend, tmp_path):
    """The table could not be kept (here: the folder is a file); this client still uses it, from memory."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    embeds, meta, _ = encode(elide_server, PROMPTS, pad_table_dir=blocked)
    assert all(m.pad_rows_elided > 0 for m in meta)
    assert torch.equal(embeds, tiny_backend.encode(PROMPTS).embeddings)


def test_rows_left_out_without_a_table_to_rebuild_from_are_refused(elide_server, tmp_path):
    """An answer with rows left out that this client cannot put back is an error, never zeros."""
    with RemoteTextEncoder(elide_server.target, pad_table_dir=tmp_path) as enc:
        info = enc.info()
        request = pb2.EncodeRequest(prompts=PROMPTS[:1], pad_table=info.described.pad_table)
        out = torch.empty((1, 512, 48), dtype=torch.bfloat16)
        with pytest.raises(IntegrityError, match="named no pad table"):
            enc._encode_part(request, out, info, held=None)


# -- FLUX.2 [klein] -----------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_left_dir(tmp_path_factory):
    """A tiny [klein] text encoder whose tokenizer pads on the left, so its pad rows form a table."""
    spec = TinyKleinSpec(padding_side="left", seed=1, with_dit=False)
    return build_tiny_klein(tmp_path_factory.mktemp("tiny-klein-left"), spec)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_klein_elides_with_left_padding_and_equals_the_reference(padding, klein_left_dir, tmp_path):
    folder = klein_left_dir if padding == "left" else build_tiny_klein(tmp_path / "klein-right", TinyKleinSpec())
    source = resolve_model(str(folder), components=("text_encoder", "tokenizer"))
    backend = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)
    with ServerThread(backend, model_id="tiny-klein", pad_table=True) as s:
        embeds, meta, _ = encode(s, PROMPTS, pad_table_dir=tmp_path / "tables")
    text_encoder = Qwen3ForCausalLM.from_pretrained(folder / "text_encoder", dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    with torch.no_grad():
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(text_encoder, tokenizer, PROMPTS)
    assert torch.equal(embeds, ref)
    elided = [m.pad_rows_elided for m in meta]
    if padding == "left":
        assert elided == [512 - m.token_count for m in meta] and all(elided)
    else:
        assert elided == [0, 0, 0]
