"""Structured JSON prompts: schema errors carry their JSON path; the text sent is canonical."""

from __future__ import annotations

import json

import pytest

from dit_client.structured_prompt import (
    MAX_PROMPT_FILE_BYTES,
    StructuredPromptError,
    load_structured_prompt,
    looks_structured,
    parse_structured_prompt,
    render_structured_prompt,
)

GOOD = {
    "scene": "a product shot on polished concrete",
    "subjects": [
        {"description": "a ceramic mug", "position": "center", "color_palette": ["#367588", "matte black"]},
        {"description": "steam", "action": "rising"},
    ],
    "style": "commercial photography",
    "color_palette": ["#FFFFFF", "#1a1A1a"],
    "lighting": "three-point softbox",
    "mood": "calm",
    "background": "grey studio backdrop",
    "composition": "rule of thirds",
    "camera": {
        "angle": "eye level",
        "distance": "close-up",
        "focus": "sharp on the mug",
        "lens-mm": 85,
        "f-number": 2.8,
        "ISO": 200,
    },
}


def errors_of(text: str) -> dict[str, str]:
    with pytest.raises(StructuredPromptError) as info:
        parse_structured_prompt(text)
    return dict(info.value.errors)


def test_valid_prompt_keeps_key_order_and_values():
    text = json.dumps(GOOD, indent=2)
    obj = parse_structured_prompt(text)
    assert obj == GOOD
    assert list(obj) == list(GOOD)
    assert list(obj["camera"]) == ["angle", "distance", "focus", "lens-mm", "f-number", "ISO"]


def test_rendering_is_one_line_fixed_spacing_order_as_written():
    text = render_structured_prompt({"style": "ink", "scene": "a café", "camera": {"ISO": 100, "lens-mm": 35}})
    assert text == '{"style": "ink", "scene": "a café", "camera": {"ISO": 100, "lens-mm": 35}}'


def test_same_structure_any_formatting_gives_the_same_text():
    spellings = [
        json.dumps(GOOD),
        json.dumps(GOOD, indent=4),
        json.dumps(GOOD, separators=(",", ":")),
        "\n\n" + json.dumps(GOOD, indent="\t") + "\n",
    ]
    texts = {render_structured_prompt(parse_structured_prompt(s)) for s in spellings}
    assert len(texts) == 1
    # Reordering keys is a different prompt (order carries emphasis), so a different text.
    reordered = dict(reversed(list(GOOD.items())))
    assert render_structured_prompt(reordered) not in texts


@pytest.mark.parametrize("colour", ["#36758", "#3675888", "#GG7588", "#", "# 367588"])
def test_malformed_hex_colour_is_reported_with_its_path(colour):
    doc = json.loads(json.dumps(GOOD))
    doc["subjects"][0]["color_palette"][0] = colour
    errs = errors_of(json.dumps(doc))
    assert list(errs) == ["$.subjects[0].color_palette[0]"]
    assert "hex colour" in errs["$.subjects[0].color_palette[0]"]


def test_colour_names_are_allowed_next_to_hex():
    parse_structured_prompt(json.dumps({"scene": "x", "color_palette": ["#367588", "teal", "warm amber"]}))


def test_every_error_is_reported_at_once():
    doc = {
        "scene": 3,
        "subjects": [{"position": "left"}, "a dog", {"description": "cat", "size": "big"}],
        "camera": {"lens-mm": -5, "f-number": "2.8", "ISO": 100.5, "zoom": 2},
        "colour_palette": ["#367588"],
    }
    errs = errors_of(json.dumps(doc))
    assert errs == {
        "$.scene": "must be a string, not a number",
        "$.subjects[0]": "has no description",
        "$.subjects[1]": "must be an object, not a string",
        "$.subjects[2].size": errs["$.subjects[2].size"],
        '$.camera["lens-mm"]': "must be a positive number, not a number -5",
        '$.camera["f-number"]': "must be a positive number, not a string",
        "$.camera.ISO": "must be a positive integer, not a number 100.5",
        "$.camera.zoom": errs["$.camera.zoom"],
        "$.colour_palette": errs["$.colour_palette"],
    }
    assert errs["$.subjects[2].size"].startswith("unknown key; known keys here: description")
    assert "lens-mm" in errs["$.camera.zoom"]
    assert "color_palette" in errs["$.colour_palette"]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ('{"scene": "x",}', "not valid JSON"),
        ('["scene"]', "must be a JSON object, not an array"),
        ("{}", "is empty"),
        ('{"scene": "a", "scene": "b"}', "duplicate key 'scene'"),
        ('{"scene": "x", "camera": {"f-number": NaN}}', "NaN is not valid JSON"),
        ('{"scene": "   "}', "is empty"),
        ('{"scene": "x", "camera": "wide"}', "must be an object"),
        ('{"scene": "x", "camera": {"ISO": true}}', "positive integer, not a boolean"),
    ],
)
def test_broken_documents_say_what_is_wrong(text, fragment):
    with pytest.raises(StructuredPromptError) as info:
        parse_structured_prompt(text)
    assert fragment in str(info.value)


def test_prompt_file_loading(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps(GOOD, ensure_ascii=False), encoding="utf-8")
    assert load_structured_prompt(good) == GOOD
    with pytest.raises(FileNotFoundError):
        load_structured_prompt(tmp_path / "missing.json")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"scene": "x" * (MAX_PROMPT_FILE_BYTES + 1)}))
    with pytest.raises(StructuredPromptError, match="at most"):
        load_structured_prompt(big)
    latin = tmp_path / "latin1.json"
    latin.write_bytes('{"scene": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(StructuredPromptError, match="not UTF-8"):
        load_structured_prompt(latin)
    bad = tmp_path / "bad.json"
    bad.write_text('{"scene": "x", "camera": {"ISO": 0}}')
    with pytest.raises(StructuredPromptError) as info:
        load_structured_prompt(bad)
    assert str(bad) in str(info.value) and "$.camera.ISO" in str(info.value)


def test_looks_structured_only_for_objects():
    assert looks_structured('  {"scene": "x"}')
    assert not looks_structured("a {curly} fox")
    assert not looks_structured("")
