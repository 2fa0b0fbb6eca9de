"""A prompt set with realistic lengths, and how many of FLUX.2-dev's 512 embedding rows each fills.

Four kinds, written for this benchmark in the styles FLUX.2 users write:

- ``short``: a few words, as typed into a UI;
- ``model_card``: long descriptive prompts like those on the FLUX.2-dev model card;
- ``structured``: JSON prompts (scene, subjects, style, lighting, camera...), rendered
  by :func:`dit_client.structured_prompt.render_structured_prompt` as the client sends them;
- ``captions``: training captions, from short alt-text to dense captions written by a
  vision-language model, as fine-tuning data sets hold them.

Rows are counted with the Tekken tokenizer that the ``mistral-common`` package ships
(``tekken_240911.json``, the Mistral-Small family's; FLUX.2-dev's own tokenizer cannot
be downloaded here). It is a benchmark-only dependency, installed beside the project
(its requirements would downgrade numpy in the project's environment); this is the one
install line every benchmark that counts rows (wire.py, cache_size.py, store_size.py) refers to:

    .venv/bin/pip install --no-deps --target /tmp/tekken mistral-common==1.13.1 tiktoken pydantic-extra-types pycountry
    PYTHONPATH=/tmp/tekken .venv/bin/python benchmarks/wire.py --elision

Without it, :func:`row_counter` falls back to an estimate (4 characters per token) and says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from dit_client.structured_prompt import render_structured_prompt

MAX_ROWS = 512
# BOS, [SYSTEM_PROMPT], [/SYSTEM_PROMPT], [INST], [/INST] around the system message and the prompt
# (Mistral-Small-3.x's chat template, as diffusers' Flux2Pipeline renders it).
TEMPLATE_TOKENS = 5

SHORT = [
    "a red fox sitting in fresh snow, golden hour",
    "portrait of an old fisherman, film photo",
    "a cozy reading nook with a cat",
    "cyberpunk street market at night, neon signs, rain",
    "minimalist logo of a mountain and a sun",
    "watercolor painting of a lighthouse",
    "a bowl of ramen, top-down view",
    "astronaut riding a horse on the moon",
    "isometric tiny house made of candy",
    "a golden retriever puppy in a field of tulips",
]

MODEL_CARD = [
    "A hermit crab has made its home in a shell of hand-blown glass on a black sand beach at dawn. The glass is "
    "clear with swirls of cobalt and amber, and the low sun shines through it, throwing coloured light onto the wet "
    "sand. Tiny droplets cling to the crab's legs. Macro photograph, shallow depth of field, the foam of a retreating "
    "wave blurred in the background, pastel pink sky, crisp detail on the crab's eyes and the texture of the glass.",
    "A busy open-air flower market in Amsterdam in early spring, photographed from the height of a bicycle. Buckets "
    "of tulips in red, yellow and violet line the canal, a vendor in a green apron wraps a bouquet in brown paper, "
    "and a woman in a yellow raincoat leans on her bike to look. Overcast soft light, reflections in the wet "
    "cobblestones, gabled houses behind, 35mm documentary style with natural colours.",
    "Interior of a Japanese woodworking workshop at late afternoon. An elderly craftsman planes a long cedar board, "
    "curls of pale wood gathering at his feet. Sunlight enters through a paper screen window and catches the dust in "
    "the air. Chisels hang in neat rows on the wall, a kettle steams on a small stove. Warm tones, quiet atmosphere, "
    "photographed with a 50mm lens at eye level.",
    "A retro travel poster for a fictional Mars colony called New Olympus. Bold flat shapes in rust red, cream and "
    "teal show a glass dome city at the foot of a giant volcano, a rocket rising on a white trail. The title NEW "
    "OLYMPUS is set in large art deco letters at the top, with the line 'Visit the red frontier' below. Grainy "
    "screen-print texture, limited palette, 1950s illustration style.",
    "Close-up product shot of a matte black ceramic coffee cup on a slab of white marble, steam rising from the "
    "coffee. A single sprig of eucalyptus lies beside it. Soft window light from the left, deep shadows on the right, "
    "a clean and calm composition with lots of negative space for text. Commercial photography, high detail.",
    "An ancient library carved into the inside of a giant hollow tree. Spiral staircases of living wood climb past "
    "shelves of leather books, lanterns with warm light hang from branches, and a girl in a blue cloak reads on a "
    "balcony while an owl watches her. Fantasy illustration, rich detail, volumetric light from an opening far "
    "above, a sense of great height.",
    "A street food vendor in Bangkok at night cooking pad thai in a large wok, flames leaping up, his face lit orange. "
    "Customers sit on plastic stools at folding tables, motorbikes pass in a blur, and strings of bulbs hang over the "
    "stall. Handheld photo, high ISO grain, vivid colours, a feeling of heat and movement.",
    "An infographic poster that explains how a bee makes honey, in four numbered steps with simple icons: collecting "
    "nectar, carrying it to the hive, fanning it with wings, and sealing the comb with wax. Clean flat vector style "
    "on a warm yellow background, a honeycomb pattern in the corners, and the title 'From Flower to Honey' in a "
    "friendly rounded typeface.",
]

STRUCTURED_OBJECTS = [
    {
        "scene": "a quiet mountain lake at sunrise",
        "subjects": [
            {
                "description": "a wooden canoe with a red hull",
                "position": "foreground, left third",
                "color_palette": ["#B22222", "#8B5A2B"],
            },
            {"description": "a heron standing in shallow water", "position": "midground, right", "action": "fishing"},
        ],
        "style": "landscape photography",
        "lighting": "soft golden light, mist over the water",
        "mood": "calm, solitary",
        "background": "pine forest and snowy peaks reflected in the lake",
        "composition": "rule of thirds, low horizon",
        "camera": {"angle": "eye level", "lens-mm": 24, "f-number": 8, "ISO": 100},
    },
    {
        "scene": "a product shot of a wristwatch",
        "subjects": [
            {
                "description": "a steel chronograph watch with a green dial",
                "position": "centre",
                "color_palette": ["#2E5E4E", "#C0C0C0"],
            }
        ],
        "style": "commercial studio photography",
        "lighting": "hard key light from the top left, soft fill",
        "background": "dark slate with water droplets",
        "camera": {"angle": "slightly above", "distance": "close-up", "lens-mm": 100, "f-number": 11},
    },
    {
        "scene": "a children's book illustration of a picnic in a meadow",
        "subjects": [
            {"description": "a small bear in a striped shirt", "position": "left", "action": "pouring tea"},
            {"description": "a rabbit with a straw hat", "position": "right", "expression": "laughing"},
            {"description": "a basket of strawberries and bread", "position": "foreground centre"},
        ],
        "style": "gouache illustration, soft edges",
        "lighting": "bright afternoon sun",
        "mood": "cheerful",
        "background": "rolling hills with wildflowers and a windmill",
        "composition": "wide shot, characters on a checked blanket",
    },
    {
        "scene": "a rainy street in Tokyo at night",
        "subjects": [
            {
                "description": "a woman holding a transparent umbrella",
                "position": "centre, walking toward the camera",
                "color_palette": ["#FF2D6F", "#1E90FF"],
            }
        ],
        "style": "cinematic still",
        "lighting": "neon signs reflected on wet asphalt",
        "mood": "melancholic",
        "camera": {"angle": "low", "lens-mm": 35, "f-number": 1.8, "depth_of_field": "shallow"},
    },
    {
        "scene": "an architectural visualisation of a modern timber house",
        "subjects": [
            {"description": "a two-storey house with large glass walls and a cedar facade", "position": "centre"},
            {"description": "a family sitting on the deck", "position": "lower right", "action": "having dinner"},
        ],
        "style": "photorealistic render",
        "lighting": "blue hour, warm interior lights",
        "background": "birch forest",
        "composition": "three-quarter view from the garden",
        "camera": {"lens-mm": 28, "f-number": 5.6},
    },
    {
        "scene": "a bowl of pho on a wooden table",
        "subjects": [{"description": "pho with sliced beef, herbs, lime and chili", "position": "centre"}],
        "style": "food photography",
        "lighting": "natural window light",
        "camera": {"angle": "top-down", "lens-mm": 50},
    },
]
STRUCTURED = [render_structured_prompt(obj) for obj in STRUCTURED_OBJECTS]

CAPTIONS = [
    # Short alt-text style captions, as in web-scraped data sets.
    "a man riding a wave on top of a surfboard",
    "red brick house with white windows and a green door",
    "close up of a bee on a purple flower",
    "two dogs playing with a ball in the park",
    "a plate of pancakes with berries and syrup",
    "vintage car parked on a city street",
    # Trigger-word captions, as LoRA fine-tuning sets write them.
    "photo of sks woman, smiling, wearing a denim jacket, outdoors, autumn leaves in the background",
    "in the style of zxc painting, a harbour with fishing boats at sunset, thick brush strokes, warm palette",
    "sks dog sitting on a sofa, looking at the camera, indoor lighting",
    # Dense captions, as vision-language models write when data sets are recaptioned.
    "The image shows a young woman with curly dark hair sitting at a wooden desk by a large window. She is writing in "
    "a notebook with a fountain pen, and a cup of tea and a stack of books sit to her right. Soft daylight falls on "
    "her face, and a potted plant is visible on the windowsill behind her.",
    "A wide aerial photograph of a river winding through a green valley. Small farms with rectangular fields line "
    "both banks, a narrow road follows the river, and low clouds cast shadows on the hills in the distance. The "
    "colours are saturated greens and browns, and the water reflects the pale sky.",
    "This is a studio photograph of a pair of white sneakers with blue accents placed on a pastel pink background. "
    "The shoes are angled toward the viewer, their laces neatly tied, and a soft shadow falls below them. The "
    "lighting is even and bright, typical of e-commerce product images.",
    "An illustration in a flat vector style showing a city skyline at dusk. Tall buildings in shades of purple and "
    "blue stand against an orange sky, a few windows are lit yellow, and a crescent moon hangs above. The foreground "
    "has a park with round trees and a curving path.",
    "A black and white photograph of an elderly man with a white beard wearing a flat cap. He looks to the left of the "
    "frame with a slight smile. The background is dark and out of focus, and deep wrinkles and the texture of his "
    "wool coat are sharply rendered.",
    "A plate of sushi on a dark slate board: six pieces of salmon nigiri, four tuna rolls and a small mound of "
    "pickled ginger with a dab of wasabi. Chopsticks rest on a ceramic holder at the bottom right. The image is lit "
    "from above with a soft light that makes the fish glisten.",
    "A screenshot-like digital painting of a fantasy game landscape: a stone bridge crosses a deep chasm toward a "
    "castle on a cliff, waterfalls pour down the rock face, and dragons circle the towers. The sky is stormy with "
    "breaks of sunlight, and a lone knight stands at the start of the bridge.",
]

PROMPT_SET: dict[str, list[str]] = {
    "short": SHORT,
    "model_card": MODEL_CARD,
    "structured": STRUCTURED,
    "captions": CAPTIONS,
}


def row_counter() -> tuple[Callable[[str], int], str]:
    """``(rows(prompt), what counted them)``: real rows a prompt fills of FLUX.2-dev's 512.

    Rows = system message + prompt + the template's 5 tokens, capped at 512 (a longer
    prompt is truncated). Tekken when ``mistral-common`` is importable, else 4 characters per token.
    """
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    try:
        from pathlib import Path

        import mistral_common
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError:
        system = len(SYSTEM_MESSAGE) // 4
        return (
            lambda p: min(MAX_ROWS, TEMPLATE_TOKENS + system + max(1, len(p) // 4)),
            "an estimate of 4 characters per token (mistral-common is not installed)",
        )
    path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    tekken = Tekkenizer.from_file(path)
    system = len(tekken.encode(SYSTEM_MESSAGE, bos=False, eos=False))

    def rows(prompt: str) -> int:
        # diffusers removes a literal [IMG] before templating; none of these prompts has one.
        return min(MAX_ROWS, TEMPLATE_TOKENS + system + len(tekken.encode(prompt, bos=False, eos=False)))

    return rows, f"Tekken (mistral-common {mistral_common.__version__}, tekken_240911.json)"


def percentile(values: list[int], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if len(values) == 1:
        return float(values[0])
    cuts = statistics.quantiles(sorted(values), n=100, method="inclusive")
    return cuts[int(q) - 1] if q < 100 else float(max(values))
