"""Pad tables: what they rely on, the lossless wire, and the client's copy on disk.

The wire carries only a prompt's real rows when the client holds the model's
pad table; the rebuilt tensor must equal the full answer bit for bit.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from common.config import ServerConfig
from common.pad_table import pad_table_id, rebuild, same_bits
from common.protocol import pb2, pb2_grpc
from dit_client.pad_table import PadTables, fetch
from dit_client.remote import RemoteTextEncoder
from encoder_server.server import LoadedModel
from tests.helpers import ServerThread

PROMPTS = ["a red fox", "a hermit crab in a shell of blown glass on a beach at dawn, macro photograph", ""]


def test_pad_rows_depend_on_the_position_only(tiny_backend):
    """Every left-padded prompt holds the table's rows at its pad positions, alone or in a batch."""
    table = tiny_backend.pad_rows()
    assert table is not None and table.shape[1] == 3 * tiny_backend.hidden_size
    together = tiny_backend.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        pad = 512 - together.token_counts[i]
        assert pad <= table.shape[0]
        assert torch.equal(together.embeddings[i, :pad], table[:pad])
        alone = tiny_backend.encode([prompt])
        assert torch.equal(alone.embeddings[0, :pad], table[:pad])


def test_right_padding_has_no_table(tiny_model_dir_right):
    from common.model_source import resolve_model
    from encoder_server.text_encoder import TruncatedTextEncoder

    source = resolve_model(str(tiny_model_dir_right), components=("text_encoder", "tokenizer"))
    backend = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.float32)
    assert backend.pad_rows() is None


@pytest.fixture()
def elide_server(tiny_backend):
    model = LoadedModel(
        "dev", tiny_backend, "tiny", pad_table=tiny_backend.pad_rows().clone()
    )  # tests change it: not the shared backend's
    with ServerThread(None, ServerConfig(), models=[model]) as s:
        yield s


def encode_raw(target: str, prompts, pad_table: str = "", dtype=pb2.DTYPE_UNSPECIFIED):
    """(list of (metadata, tensor) per prompt) from one Encode call, exactly as sent."""
    with grpc.insecure_channel(target) as channel:
        messages = list(
            pb2_grpc.TextEncoderStub(channel).Encode(
                pb2.EncodeRequest(prompts=prompts, pad_table=pad_table, dtype=dtype), timeout=60
            )
        )
    out, header, data = [], None, b""
    for m in messages:
        if m.HasField("header"):
            if header is not None:
                out.append((header, data))
            header, data = m.header, b""
        data += m.chunk.data
    out.append((header, data))
    from common.wire import dtype_from_wire

    return [
        (h.metadata, torch.frombuffer(bytearray(d), dtype=dtype_from_wire(h.dtype)).reshape(tuple(h.shape)))
        for h, d in out
    ]


def test_the_lossless_wire_rebuilds_the_full_answer_bit_for_bit(elide_server, tmp_path):
    with grpc.insecure_channel(elide_server.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        info = stub.GetInfo(pb2.GetInfoRequest(), timeout=10).models[0]
        assert info.pad_table.startswith(info.fingerprint + "/pad:") and info.pad_table_rows > 0
        table = PadTables(tmp_path).get(stub, info)
    assert pad_table_id(info.fingerprint, table) == info.pad_table

    metrics = elide_server.running.metrics
    full = encode_raw(elide_server.target, PROMPTS)
    full_bytes = metrics.sample("flux2_encoder_response_bytes_total", {"transport": "grpc"})
    elided = encode_raw(elide_server.target, PROMPTS, pad_table=info.pad_table)
    elided_bytes = metrics.sample("flux2_encoder_response_bytes_total", {"transport": "grpc"}) - full_bytes
    for (meta_full, whole), (meta, rows) in zip(full, elided, strict=True):
        assert meta_full.pad_rows_elided == 0 and whole.shape[0] == 512
        assert meta.pad_rows_elided == 512 - meta.token_count > 0
        assert rows.shape[0] == meta.token_count
        assert torch.equal(rebuild(rows, meta.pad_rows_elided, table), whole)
    # Exactly the real rows went on the wire.
    row_bytes = full[0][1].shape[1] * full[0][1].element_size()
    assert elided_bytes == sum(meta.token_count for meta, _ in elided) * row_bytes < full_bytes


def test_a_cast_answer_rebuilds_too(elide_server, tmp_path):
    with grpc.insecure_channel(elide_server.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        info = stub.GetInfo(pb2.GetInfoRequest(), timeout=10).models[0]
        table = PadTables(tmp_path).get(stub, info)
    ((_, whole),) = encode_raw(elide_server.target, ["a red fox"], dtype=pb2.DTYPE_FLOAT32)
    ((meta, rows),) = encode_raw(elide_server.target, ["a red fox"], pad_table=info.pad_table, dtype=pb2.DTYPE_FLOAT32)
    assert rows.dtype == torch.float32 and torch.equal(rebuild(rows, meta.pad_rows_elided, table), whole)


@pytest.mark.parametrize("claimed", ["", "stale-table", "flux2-dev:0000000000000000/pad:479:deadbeef"])
def test_a_client_without_the_servers_table_gets_full_tensors(elide_server, claimed):
    ((meta, whole),) = encode_raw(elide_server.target, ["a red fox"], pad_table=claimed)
    assert meta.pad_rows_elided == 0 and whole.shape[0] == 512


def test_rows_that_differ_from_the_table_are_sent_whole(elide_server):
    """The server checks every answer: a table that no longer matches is never used to drop rows."""
    model = next(iter(elide_server.running.models))
    claimed = model.pad_table_id
    model.pad_table[0, 0] += 1  # the id still names the old content
    ((meta, whole),) = encode_raw(elide_server.target, ["a red fox"], pad_table=claimed)
    assert meta.pad_rows_elided == 0 and whole.shape[0] == 512


def test_same_bits_tells_minus_zero_from_zero():
    plus, minus = torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.bfloat16)
    minus[1, 2] = -0.0
    assert torch.equal(plus, minus)  # what a value comparison would let through
    assert not same_bits(plus, minus)
    assert same_bits(plus, plus.clone()) and not same_bits(plus, plus.float())


def test_rows_equal_in_value_but_not_in_bits_are_kept(elide_server):
    """-0.0 in the answer where the table holds +0.0: leaving the row out would rebuild other bits."""
    from encoder_server.cache import CachedEmbedding

    model = next(iter(elide_server.running.models))
    batch = model.backend.encode(["a red fox"])
    embedding, tokens = batch.embeddings[0].clone(), batch.token_counts[0]
    table = model.pad_table.clone()
    rows, elided = model.elide(embedding, tokens, model.pad_table_id)
    assert elided > 0  # as computed, the pad rows are the table's
    table[0, 0], embedding[0, 0] = 0.0, -0.0
    model.pad_table[0, 0] = 0.0
    rows, elided = model.elide(embedding, tokens, model.pad_table_id)
    assert elided == 0 and same_bits(rows, embedding)
    entry = CachedEmbedding.compact(embedding, tokens, False, table, model.pad_table_id)
    assert entry.pad_count == 0 and same_bits(entry.embedding, embedding)


def test_a_model_without_a_table_says_so(tiny_backend):
    with ServerThread(tiny_backend, ServerConfig()) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        assert stub.GetInfo(pb2.GetInfoRequest(), timeout=10).models[0].pad_table == ""
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GetPadTable(pb2.GetPadTableRequest(), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no pad table" in info.value.details()


def test_a_damaged_or_foreign_table_on_disk_is_fetched_again(elide_server, tmp_path):
    tables = PadTables(tmp_path)
    with grpc.insecure_channel(elide_server.target) as channel:
        stub = pb2_grpc.TextEncoderStub(channel)
        info = stub.GetInfo(pb2.GetInfoRequest(), timeout=10).models[0]
        good = tables.get(stub, info)
        path = tables.path_of(info.pad_table)
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40  # a flipped bit in the rows
        path.write_bytes(bytes(data))
        assert tables.load(info.pad_table) is None and not path.exists()
        assert torch.equal(tables.get(stub, info), good)  # fetched again
        # A file holding another table under this name is not used either.
        tables.save(info.pad_table, good[:-1].clone())
        assert tables.load(info.pad_table) is None
        assert torch.equal(fetch(stub, info), good)


def test_compute_flag_reaches_each_model_and_packed_has_its_own_fingerprint(tiny_model_dir):
    from common.model_source import resolve_model
    from encoder_server.cli import build_parser, config_from_args
    from encoder_server.text_encoder import TruncatedTextEncoder

    config = config_from_args(
        build_parser().parse_args(["serve", "--model", "dev=demo", "--model", "fast=demo", "--compute", "fast=packed"])
    )
    assert config.compute == "exact"
    assert [m.compute for m in config.served_models()] == [None, "packed"]
    source = resolve_model(str(tiny_model_dir), components=("text_encoder", "tokenizer"))
    exact = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.bfloat16)
    packed = TruncatedTextEncoder(source, device=torch.device("cpu"), dtype=torch.bfloat16, compute="packed")
    assert packed.compute == "packed" and packed.fingerprint == exact.fingerprint + "+packed"
    models = [LoadedModel("fast", packed, "tiny"), LoadedModel("dev", exact, "tiny")]
    with (
        ServerThread(None, ServerConfig(), models=models) as s,
        grpc.insecure_channel(s.target) as channel,
        RemoteTextEncoder(s.target, elide=False) as enc,
    ):
        info = pb2_grpc.TextEncoderStub(channel).GetInfo(pb2.GetInfoRequest(), timeout=10)
        # Each answer says which mode made it, as GetInfo does for the model.
        _, (fast,) = enc.encode_with_metadata(["a red fox"], model="fast")
        _, (dev,) = enc.encode_with_metadata(["a red fox"], model="dev")
    assert info.models[0].compute == "packed" and info.fingerprint.endswith("+packed")
    assert (fast.compute, dev.compute) == ("packed", "exact")
    assert fast.model_fingerprint.endswith("+packed") and not dev.model_fingerprint.endswith("+packed")
