"""One embedding store per model: the index records the server model, and readers can insist on theirs."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import IntegrityError
from dit_client.training.store import EmbeddingStore, StoreInfo, StoreWriter

KLEIN = StoreInfo(
    "flux2-klein:1111", torch.bfloat16, (8, 6), "black-forest-labs/FLUX.2-klein-4B", "klein", "flux2-klein"
)
DEV = StoreInfo("flux2-dev:2222", torch.bfloat16, (8, 6), "black-forest-labs/FLUX.2-dev", "dev", "flux2-dev")


def write(path, info, captions=("a fox", "a bird")):
    with StoreWriter(path, info) as writer:
        for i, caption in enumerate(captions):
            writer.add(caption, torch.full(info.shape, float(i), dtype=info.dtype))


def test_the_index_records_the_model_name_and_family(tmp_path):
    write(tmp_path / "s", KLEIN)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert (index["model_name"], index["family"], index["fingerprint"]) == ("klein", "flux2-klein", KLEIN.fingerprint)
    store = EmbeddingStore(tmp_path / "s", expected_model="klein", expected_fingerprint=KLEIN.fingerprint)
    assert store.info == KLEIN and len(store) == 2
    assert len(EmbeddingStore(tmp_path / "s", expected_model="flux2-klein")) == 2  # a family will do


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (
            {"expected_model": "dev"},
            "holds embeddings of model 'klein' (flux2-klein, black-forest-labs/FLUX.2-klein-4B, "
            "fingerprint flux2-klein:1111), not of model 'dev'",
        ),
        ({"expected_fingerprint": DEV.fingerprint}, "not of fingerprint flux2-dev:2222: it was made for another model"),
    ],
)
def test_a_reader_refuses_a_store_of_another_model(tmp_path, kwargs, says):
    write(tmp_path / "s", KLEIN)
    with pytest.raises(IntegrityError) as err:
        EmbeddingStore(tmp_path / "s", **kwargs)
    assert says in str(err.value)


def test_a_writer_refuses_to_append_another_models_embeddings(tmp_path):
    write(tmp_path / "s", KLEIN)
    with pytest.raises(IntegrityError) as err:
        write(tmp_path / "s", DEV, captions=("a cat",))
    assert "model 'klein' (flux2-klein" in str(err.value) and "model 'dev' (flux2-dev" in str(err.value)
    assert "one store never mixes models" in str(err.value)
    assert list(EmbeddingStore(tmp_path / "s")) == ["a fox", "a bird"]  # untouched


def test_stores_from_before_model_names_still_open(tmp_path):
    old = StoreInfo("flux2-dev:2222", torch.bfloat16, (8, 6), "black-forest-labs/FLUX.2-dev")
    write(tmp_path / "s", old)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    del index["model_name"], index["family"]
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    assert len(EmbeddingStore(tmp_path / "s", expected_fingerprint=old.fingerprint)) == 2
    write(tmp_path / "s", DEV, captions=("a cat",))  # the same fingerprint appends, and names the model now
    assert EmbeddingStore(tmp_path / "s", expected_model="dev").info.model_name == "dev"
