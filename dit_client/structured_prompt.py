"""FLUX.2 structured (JSON) prompts: validate, then render one canonical text.

FLUX.2 reads prompts written as JSON objects (Black Forest Labs' prompting
guide): ``scene``, ``subjects`` (each with ``description``, ``position``,
``color_palette``...), ``style``, ``lighting``, ``mood``, ``background``,
``composition`` and a ``camera`` object. The model sees the JSON *text*, so the
encoder receives a string; this module makes that string deterministic:

- keys stay in the order the author wrote them (order carries emphasis, and a
  sorted rewrite would be a different prompt);
- spacing is fixed (one line, ``", "`` and ``": "``), so re-indenting a file or
  passing the same object from Python never changes the text, the embedding or
  the cache entry.

Validation rejects what is certainly a mistake (unknown keys, wrong types,
malformed hex colours, duplicate keys) and names the JSON path of each error,
e.g. ``$.subjects[1].color_palette[0]``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# A prompt file is a few KiB; anything far larger is a wrong file, not a prompt.
MAX_PROMPT_FILE_BYTES = 256 * 1024
MAX_SUBJECTS = 32
MAX_PALETTE = 32
MAX_TEXT_CHARS = 4096

HEX_COLOUR = re.compile(r"#[0-9A-Fa-f]{6}")

_STR = "string"
_PALETTE = "palette"
_NUMBER = "number"
_INT = "integer"

SUBJECT_KEYS: dict[str, str] = {
    "description": _STR,
    "position": _STR,
    "action": _STR,
    "pose": _STR,
    "expression": _STR,
    "color_palette": _PALETTE,
}

CAMERA_KEYS: dict[str, str] = {
    "angle": _STR,
    "distance": _STR,
    "focus": _STR,
    "lens": _STR,
    "depth_of_field": _STR,
    "lens-mm": _NUMBER,
    "f-number": _NUMBER,
    "ISO": _INT,
}

TOP_LEVEL_KEYS: dict[str, str] = {
    "scene": _STR,
    "subjects": "subjects",
    "style": _STR,
    "color_palette": _PALETTE,
    "lighting": _STR,
    "mood": _STR,
    "background": _STR,
    "composition": _STR,
    "camera": "camera",
}


class StructuredPromptError(ValueError):
    """A structured prompt is not valid JSON or breaks the schema.

    Attributes:
        errors: ``(json_path, message)`` pairs, e.g. ``("$.camera.ISO", "must be a positive integer")``.
    """

    def __init__(self, errors: list[tuple[str, str]], source: str = "structured prompt"):
        self.errors = errors
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{source} is invalid ({len(errors)} error{'s' * (len(errors) != 1)}):\n{lines}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            # json.loads would silently keep the last one; the author meant something else.
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_structured_prompt(text: str, *, source: str = "structured prompt") -> dict[str, Any]:
    """Parse and validate JSON ``text``; return the object with its key order kept.

    Raises:
        StructuredPromptError: not JSON, not an object, or the schema is broken.
    """
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise StructuredPromptError(
            [("$", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")], source
        ) from None
    except ValueError as exc:
        raise StructuredPromptError([("$", str(exc))], source) from None
    validate_structured_prompt(obj, source=source)
    return obj


def load_structured_prompt(path: str | os.PathLike) -> dict[str, Any]:
    """Read, parse and validate a prompt file (UTF-8 JSON, at most 256 KiB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise StructuredPromptError(
            [("$", f"file is {size} bytes; a prompt file may be at most {MAX_PROMPT_FILE_BYTES} bytes")], str(path)
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StructuredPromptError([("$", "file is not UTF-8 text")], str(path)) from None
    return parse_structured_prompt(text, source=str(path))


def looks_structured(prompt: str) -> bool:
    """True when a ``--prompt`` value is meant as JSON (its first non-blank character is ``{``)."""
    return prompt.lstrip().startswith("{")


def render_structured_prompt(obj: Mapping[str, Any]) -> str:
    """The one text the encoder receives for ``obj``: key order as given, fixed spacing, one line.

    Non-ASCII characters are kept as they are (not ``\\u`` escapes): the
    tokenizer sees the same characters the author typed.
    """
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


def validate_structured_prompt(obj: Any, *, source: str = "structured prompt") -> None:
    """Check ``obj`` against the FLUX.2 structured-prompt schema; raise with every error found."""
    errors: list[tuple[str, str]] = []
    if not isinstance(obj, dict):
        raise StructuredPromptError([("$", f"must be a JSON object, not {_json_type(obj)}")], source)
    if not obj:
        errors.append(("$", "is empty; give at least a scene or subjects"))
    _check_object(obj, TOP_LEVEL_KEYS, "$", errors)
    if errors:
        raise StructuredPromptError(errors, source)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_object(obj: dict, schema: dict[str, str], path: str, errors: list[tuple[str, str]]) -> None:
    for key, value in obj.items():
        where = f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{json.dumps(key)}]"
        kind = schema.get(key)
        if kind is None:
            errors.append((where, f"unknown key; known keys here: {', '.join(schema)}"))
        elif kind == _STR:
            _check_text(value, where, errors)
        elif kind == _PALETTE:
            _check_palette(value, where, errors)
        elif kind == _NUMBER:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                errors.append(
                    (
                        where,
                        f"must be a positive number, not {_json_type(value)}"
                        + (f" {value!r}" if isinstance(value, (int, float)) else ""),
                    )
                )
        elif kind == _INT:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                errors.append(
                    (
                        where,
                        f"must be a positive integer, not {_json_type(value)}"
                        + (f" {value!r}" if isinstance(value, (int, float)) else ""),
                    )
                )
        elif kind == "subjects":
            _check_subjects(value, where, errors)
        elif kind == "camera":
            if not isinstance(value, dict):
                errors.append((where, f"must be an object, not {_json_type(value)}"))
            else:
                _check_object(value, CAMERA_KEYS, where, errors)


def _check_text(value: Any, where: str, errors: list[tuple[str, str]]) -> None:
    if not isinstance(value, str):
        errors.append((where, f"must be a string, not {_json_type(value)}"))
    elif not value.strip():
        errors.append((where, "is empty"))
    elif len(value) > MAX_TEXT_CHARS:
        errors.append((where, f"is {len(value)} characters; at most {MAX_TEXT_CHARS}"))


def _check_palette(value: Any, where: str, errors: list[tuple[str, str]]) -> None:
    if not isinstance(value, list):
        errors.append((where, f"must be an array of colours, not {_json_type(value)}"))
        return
    if len(value) > MAX_PALETTE:
        errors.append((where, f"has {len(value)} colours; at most {MAX_PALETTE}"))
    for i, colour in enumerate(value):
        item = f"{where}[{i}]"
        if not isinstance(colour, str):
            errors.append(
                (item, f"must be a string (a hex colour like '#367588' or a colour name), not {_json_type(colour)}")
            )
        elif not colour.strip():
            errors.append((item, "is empty"))
        elif colour.lstrip().startswith("#") and not HEX_COLOUR.fullmatch(colour):
            errors.append((item, f"{colour!r} is not a hex colour; write six hex digits like '#367588'"))


def _check_subjects(value: Any, where: str, errors: list[tuple[str, str]]) -> None:
    if not isinstance(value, list):
        errors.append((where, f"must be an array of subject objects, not {_json_type(value)}"))
        return
    if len(value) > MAX_SUBJECTS:
        errors.append((where, f"has {len(value)} subjects; at most {MAX_SUBJECTS}"))
    for i, subject in enumerate(value):
        item = f"{where}[{i}]"
        if not isinstance(subject, dict):
            errors.append((item, f"must be an object, not {_json_type(subject)}"))
            continue
        if "description" not in subject:
            errors.append((item, "has no description"))
        _check_object(subject, SUBJECT_KEYS, item, errors)
