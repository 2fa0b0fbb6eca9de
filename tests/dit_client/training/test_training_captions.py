"""Caption readers: every supported layout, field selection, and clear errors for bad input."""

from __future__ import annotations

import csv
import json

import pytest

from dit_client.training.captions import CaptionSourceError, iter_caption_records, iter_captions

CAPTIONS = ["a red fox in the snow", "  two cats, one hat  ", "ünïcödé — 雪の狐", "a red fox in the snow"]
STRIPPED = [c.strip() for c in CAPTIONS]


def test_txt_one_caption_per_line_strips_and_skips_blank(tmp_path):
    p = tmp_path / "captions.txt"
    p.write_text("\n".join(CAPTIONS[:2]) + "\n\n   \r\n" + "\r\n".join(CAPTIONS[2:]) + "\n", encoding="utf-8")
    assert list(iter_captions(p)) == STRIPPED  # duplicates are kept; precompute dedupes


def test_txt_not_utf8_is_a_clear_error(tmp_path):
    p = tmp_path / "captions.txt"
    p.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(CaptionSourceError, match="not UTF-8"):
        list(iter_captions(p))


def test_jsonl_guesses_caption_field_and_honours_explicit_one(tmp_path):
    p = tmp_path / "c.jsonl"
    rows = [{"id": i, "caption": c, "alt": f"alt {i}"} for i, c in enumerate(CAPTIONS)]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert list(iter_captions(p)) == STRIPPED
    assert list(iter_captions(p, "alt")) == [f"alt {i}" for i in range(4)]


def test_jsonl_missing_field_names_the_fields(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"id": 1, "caption": "x"}) + "\n")
    with pytest.raises(CaptionSourceError, match=r"no caption field 'text'.*id, caption"):
        list(iter_captions(p, "text"))


def test_jsonl_bad_line_is_located(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"caption": "ok"}) + "\n{not json\n")
    with pytest.raises(CaptionSourceError, match=r"c\.jsonl:2: not valid JSON"):
        list(iter_captions(p))


def test_jsonl_list_of_captions_yields_each_and_none_is_skipped(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"caption": ["a", "b"]}, {"caption": None}, {"caption": "c"}]))
    assert list(iter_captions(p)) == ["a", "b", "c"]


def test_non_text_caption_is_refused(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"caption": 12}) + "\n")
    with pytest.raises(CaptionSourceError, match="is a int, not text"):
        list(iter_captions(p))


def test_ambiguous_fields_ask_for_caption_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(CaptionSourceError, match="--caption-field"):
        list(iter_captions(p))


def test_csv_with_quoted_multiline_and_explicit_column(tmp_path):
    p = tmp_path / "c.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "description"])
        w.writerow(["1.png", "line one,\nline two"])
        w.writerow(["2.png", CAPTIONS[2]])
    assert list(iter_captions(p, "description")) == ["line one,\nline two", CAPTIONS[2]]
    with pytest.raises(CaptionSourceError, match="no caption field 'caption'"):
        list(iter_captions(p, "caption"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"n": list(range(4)), "prompt": CAPTIONS}), p, row_group_size=2)
    assert list(iter_captions(p)) == STRIPPED


def test_unsupported_extension(tmp_path):
    p = tmp_path / "c.xlsx"
    p.write_bytes(b"x")
    with pytest.raises(CaptionSourceError, match="unsupported caption file type .xlsx"):
        list(iter_captions(p))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_captions(tmp_path / "nope.txt"))


def _image(path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(path)


def test_image_folder_with_sidecar_txt(tmp_path):
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "0001.png")
    (tmp_path / "0001.txt").write_text("  first  \n")
    _image(tmp_path / "sub" / "0002.jpg")
    (tmp_path / "sub" / "0002.txt").write_text("second")
    _image(tmp_path / "0003.png")  # no caption: skipped
    records = list(iter_caption_records(tmp_path))
    assert [r.caption for r in records] == ["first", "second"]
    assert [r.image.name for r in records] == ["0001.png", "0002.jpg"]


def test_image_folder_with_metadata_jsonl(tmp_path):
    # The diffusers imagefolder / DreamBooth layout: file_name + text.
    for i in range(2):
        _image(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"photo {i} of sks dog"}) for i in range(2))
    )
    records = list(iter_caption_records(tmp_path))
    assert [r.caption for r in records] == ["photo 0 of sks dog", "photo 1 of sks dog"]
    assert records[1].image == tmp_path / "1.png"


def test_image_folder_without_captions_is_a_clear_error(tmp_path):
    _image(tmp_path / "0001.png")
    with pytest.raises(CaptionSourceError, match="no sidecar .txt captions"):
        list(iter_captions(tmp_path))


def test_datasets_save_to_disk_dataset_and_datasetdict(tmp_path):
    import datasets  # test extra: the fixture is written by the real library

    ds = datasets.Dataset.from_dict({"image_id": [1, 2, 3, 4], "caption": CAPTIONS})
    ds.save_to_disk(str(tmp_path / "single"), num_shards=2)
    assert list(iter_captions(tmp_path / "single")) == STRIPPED
    dd = datasets.DatasetDict({"train": ds.select([0, 1]), "validation": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert list(iter_captions(tmp_path / "dict")) == STRIPPED[:3]
    with pytest.raises(CaptionSourceError, match="no caption field 'text'"):
        list(iter_captions(tmp_path / "single", "text"))
