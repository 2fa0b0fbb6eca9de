"""Captions from the places training data lives, streamed one at a time.

Supported sources (``path``):

* ``.txt`` file: one caption per line.
* ``.jsonl`` file: one JSON object per line; the caption is in ``caption_field``.
* ``.csv`` file with a header row; the caption is in column ``caption_field``.
* ``.parquet`` file; the caption is in column ``caption_field`` (read in batches).
* an image folder in the diffusers ``imagefolder`` / DreamBooth layout, either
  with a ``metadata.jsonl`` (or ``metadata.csv``) naming each image's
  ``file_name`` and caption, or with a sidecar ``.txt`` caption per image
  (``0001.png`` + ``0001.txt``); subfolders are searched too.
* a ``datasets`` folder written by ``Dataset.save_to_disk`` or
  ``DatasetDict.save_to_disk`` (every split is read); its Arrow files are read
  directly with pyarrow, without the ``datasets`` package.

When ``caption_field`` is not given it is guessed: the only string column, or
the first of ``caption``, ``text``, ``prompt``, ``instance_prompt``, ``captions``.
A field holding a list of strings (several captions per image) yields each.

Captions are stripped of surrounding whitespace; empty and missing captions are
skipped (and counted in the log). The stripped text is the key the embedding
store uses, so training code must look captions up the same way (``.strip()``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CAPTION_FIELD_GUESSES = ("caption", "text", "prompt", "instance_prompt", "captions")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FILE_FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
# Parquet and Arrow are read in record batches of this many rows.
_BATCH_ROWS = 4096


class CaptionSourceError(ValueError):
    """The caption source cannot be read: unknown layout, missing field, bad row."""


@dataclass(frozen=True)
class CaptionRecord:
    """One caption and where it came from.

    Attributes:
        caption: the caption text, stripped.
        source: human-readable origin, e.g. ``"captions.jsonl:12"`` or ``"imgs/0001.txt"``.
        image: the image file it describes, for image-folder layouts; else ``None``.
    """

    caption: str
    source: str
    image: Path | None = None


def iter_captions(path: str | os.PathLike, caption_field: str | None = None) -> Iterator[str]:
    """The captions of ``path`` in file order (duplicates included). See the module docstring for layouts."""
    for record in iter_caption_records(path, caption_field):
        yield record.caption


def iter_caption_records(path: str | os.PathLike, caption_field: str | None = None) -> Iterator[CaptionRecord]:
    """Like :func:`iter_captions`, with each caption's origin (and image, for image folders)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"caption source {path} does not exist")
    skipped = 0
    for record in _records(path, caption_field):
        if record is None:
            skipped += 1
            continue
        yield record
    if skipped:
        log.warning("%s: skipped %d empty or missing caption(s)", path, skipped)


def _records(path: Path, field: str | None) -> Iterator[CaptionRecord | None]:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _datasets_folder(path, field)
        return _image_folder(path, field)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt(path)
    if suffix == ".jsonl":
        return _jsonl(path, field)
    if suffix == ".csv":
        return _csv(path, field)
    if suffix == ".parquet":
        return _parquet(path, field)
    raise CaptionSourceError(
        f"{path}: unsupported caption file type {suffix or '(none)'}; use {', '.join(FILE_FORMATS)}, "
        "an image folder, or a datasets save_to_disk folder"
    )


# -- values ------------------------------------------------------------------


def _values(value, source: str, image: Path | None = None) -> Iterator[CaptionRecord | None]:
    """Caption records for one field value: a string, a list of strings, or missing (``None``)."""
    if value is None:
        yield None
    elif isinstance(value, str):
        text = value.strip()
        yield CaptionRecord(text, source, image) if text else None
    elif isinstance(value, (list, tuple)) and all(v is None or isinstance(v, str) for v in value):
        if not value:
            yield None
        for item in value:
            yield from _values(item, source, image)
    else:
        raise CaptionSourceError(f"{source}: the caption is a {type(value).__name__}, not text: {str(value)[:60]!r}")


def _pick_field(columns: list[str], field: str | None, where: str, string_columns: list[str] | None = None) -> str:
    if field is not None:
        if field not in columns:
            raise CaptionSourceError(
                f"{where}: no caption field {field!r}; fields are: {', '.join(columns) or '(none)'}"
            )
        return field
    for guess in CAPTION_FIELD_GUESSES:
        if guess in columns:
            return guess
    if string_columns is not None and len(string_columns) == 1:
        return string_columns[0]
    raise CaptionSourceError(
        f"{where}: cannot tell which field holds the caption (fields: {', '.join(columns) or '(none)'}); "
        "pass --caption-field NAME"
    )


# -- files -------------------------------------------------------------------


def _txt(path: Path) -> Iterator[CaptionRecord | None]:
    with path.open(encoding="utf-8", newline="") as f:
        for n, line in enumerate(_lines(f, path), 1):
            yield from _values(line, f"{path.name}:{n}")


def _lines(f, path: Path):
    try:
        yield from f
    except UnicodeDecodeError as exc:
        raise CaptionSourceError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl(path: Path, field: str | None, *, base: Path | None = None) -> Iterator[CaptionRecord | None]:
    chosen = None
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CaptionSourceError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise CaptionSourceError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if chosen is None:  # settled on the first row, then held fixed
                strings = [k for k, v in row.items() if isinstance(v, str) and k != "file_name"]
                chosen = _pick_field(list(row), field, where, strings)
            yield from _values(row.get(chosen), where, _image_of(base, row, where))


def _csv(path: Path, field: str | None, *, base: Path | None = None) -> Iterator[CaptionRecord | None]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(_lines(f, path))
        columns = list(reader.fieldnames or [])
        others = [c for c in columns if c != "file_name"]
        chosen = _pick_field(columns, field, path.name, others)
        for n, row in enumerate(reader, 2):
            where = f"{path.name}:{n}"
            yield from _values(row.get(chosen), where, _image_of(base, row, where))


def _image_of(base: Path | None, row: dict, where: str) -> Path | None:
    if base is None:
        return None
    name = row.get("file_name")
    if not isinstance(name, str) or not name:
        raise CaptionSourceError(f"{where}: metadata row has no file_name")
    return base / name


def _arrow_field(schema, field: str | None, where: str) -> str:
    import pyarrow as pa

    columns = list(schema.names)
    strings = [
        n for n in columns if pa.types.is_string(schema.field(n).type) or pa.types.is_large_string(schema.field(n).type)
    ]
    return _pick_field(columns, field, where, strings)


def _parquet(path: Path, field: str | None) -> Iterator[CaptionRecord | None]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise CaptionSourceError(f"{path}: not a readable parquet file ({exc})") from None
    chosen = _arrow_field(pf.schema_arrow, field, path.name)
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[chosen]):
        for value in batch.column(0).to_pylist():
            yield from _values(value, f"{path.name} row {row}")
            row += 1


# -- folders -----------------------------------------------------------------


def _datasets_folder(path: Path, field: str | None) -> Iterator[CaptionRecord | None]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if not splits:
            raise CaptionSourceError(f"{path}/dataset_dict.json lists no splits")
        for split in splits:
            yield from _datasets_split(path / split, field, f"{path.name}/{split}")
    else:
        yield from _datasets_split(path, field, path.name)


def _datasets_split(path: Path, field: str | None, label: str) -> Iterator[CaptionRecord | None]:
    import pyarrow as pa

    try:
        state = json.loads((path / "state.json").read_text())
        files = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaptionSourceError(f"{path}: not a datasets save_to_disk folder (state.json: {exc})") from None
    chosen = None
    row = 0
    for name in files:
        file = path / name
        if file.parent != path or not file.is_file():
            raise CaptionSourceError(f"{path}/state.json names a data file that is not there: {name}")
        # save_to_disk writes the Arrow IPC *stream* format.
        with pa.memory_map(str(file)) as source:
            reader = pa.ipc.open_stream(source)
            if chosen is None:
                chosen = _arrow_field(reader.schema, field, label)
            index = reader.schema.get_field_index(chosen)
            for batch in reader:
                for value in batch.column(index).to_pylist():
                    yield from _values(value, f"{label} row {row}")
                    row += 1


def _image_folder(path: Path, field: str | None) -> Iterator[CaptionRecord | None]:
    metadata = sorted(p for p in path.rglob("metadata.jsonl")) + sorted(p for p in path.rglob("metadata.csv"))
    if metadata:
        for meta in metadata:
            if meta.suffix == ".jsonl":
                yield from _jsonl(meta, field, base=meta.parent)
            else:
                yield from _csv(meta, field, base=meta.parent)
        return
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise CaptionSourceError(
            f"{path}: no captions found (expected metadata.jsonl, metadata.csv, images with sidecar .txt "
            "captions, or a datasets save_to_disk folder)"
        )
    found = 0
    for image in images:
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            yield None
            continue
        try:
            text = sidecar.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CaptionSourceError(f"{sidecar} is not UTF-8 text ({exc.reason})") from None
        found += 1
        yield from _values(text, str(sidecar.relative_to(path)), image)
    if not found:
        raise CaptionSourceError(f"{path}: {len(images)} image(s) but no sidecar .txt captions and no metadata.jsonl")
