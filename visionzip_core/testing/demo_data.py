"""Write the bundled demo data set: small synthetic pictures with LLaVA-format captions and Q/A.

    python data/make_demo_data.py            # -> data/demo/ (deterministic: same bytes every run)
    python data/make_demo_data.py --out DIR --train 300 --val 50 --seed 0
    python -m visionzip_core.testing.demo_data --out DIR   # the same, from an installed package

Each picture is a light background with one coloured shape (circle, square, triangle or star) in
one of five positions, and sometimes a short word written in black. Answers are short and tied
to what is drawn ("What colour is the shape?" -> "red."), so a tiny model learns them quickly.
Files: images/{split}_{i:04d}.png, pretrain_{split}.json (captions, one <image> per sample) and
instruct_{split}.json (single- and multi-turn Q/A, plus a few text-only samples).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
WORDS = ("yes", "no", "one", "two", "big", "small")
TEXT_ONLY = (
    ("What is the opposite of left?", "right."),
    ("What is the opposite of top?", "bottom."),
    ("What is the opposite of big?", "small."),
    ("What is the opposite of yes?", "no."),
    ("How many sides does a triangle have?", "three."),
    ("How many sides does a square have?", "four."),
)


def _centre(position: str, w: int, h: int) -> tuple[float, float]:
    fx = 0.27 if "left" in position else 0.73 if "right" in position else 0.5
    fy = 0.27 if "top" in position else 0.73 if "bottom" in position else 0.5
    return fx * w, fy * h


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        draw.regular_polygon((cx, cy, r), n_sides=5, fill=fill)
        draw.regular_polygon((cx, cy, r * 0.9), n_sides=5, rotation=36, fill=fill)
        for k in range(5):  # five points make it read as a star, not a blob
            a = -math.pi / 2 + k * 2 * math.pi / 5
            tip = (cx + 1.6 * r * math.cos(a), cy + 1.6 * r * math.sin(a))
            left = (cx + r * 0.6 * math.cos(a - 0.6), cy + r * 0.6 * math.sin(a - 0.6))
            right = (cx + r * 0.6 * math.cos(a + 0.6), cy + r * 0.6 * math.sin(a + 0.6))
            draw.polygon([tip, left, right], fill=fill)


def make_picture(rng: random.Random, word_rate: float = 0.3) -> tuple[Image.Image, dict]:
    """One picture and what is drawn in it; ``word_rate`` of them also show a word (the bundled data: 0.3)."""
    w, h = rng.randint(112, 224), rng.randint(112, 224)
    grey = rng.randint(225, 250)
    img = Image.new("RGB", (w, h), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    facts = {
        "colour": rng.choice(sorted(COLOURS)),
        "shape": rng.choice(SHAPES),
        "position": rng.choice(POSITIONS),
        "word": rng.choice(WORDS) if rng.random() < word_rate else None,
    }
    cx, cy = _centre(facts["position"], w, h)
    r = min(w, h) * rng.uniform(0.14, 0.2)
    _draw_shape(draw, facts["shape"], cx, cy, r, COLOURS[facts["colour"]])
    if facts["word"]:
        font = ImageFont.load_default(size=max(14, min(w, h) // 7))
        # the word goes on the side away from the shape so that it never overlaps it
        ty = 0.08 * h if "bottom" in facts["position"] or facts["position"] == "center" else 0.8 * h
        draw.text((w * 0.5, ty), facts["word"], fill=(0, 0, 0), font=font, anchor="mt")
    return img, facts


def caption(facts: dict) -> str:
    text = f"a {facts['colour']} {facts['shape']} at the {facts['position']}."
    if facts["word"]:
        text += f" the word {facts['word']} is written."
    return text


def qa_pairs(facts: dict) -> list[tuple[str, str]]:
    pairs = [
        ("What colour is the shape?", f"{facts['colour']}."),
        ("What shape is in the picture?", f"{facts['shape']}."),
        ("Where is the shape?", f"{facts['position']}."),
    ]
    if facts["word"]:
        pairs.append(("What word is written?", f"{facts['word']}."))
    return pairs


def build_split(out: Path, split: str, count: int, rng: random.Random) -> tuple[list, list]:
    pretrain, instruct = [], []
    for i in range(count):
        img, facts = make_picture(rng)
        name = f"{split}_{i:04d}.png"
        img.save(out / "images" / name, optimize=True)
        sid = f"{split}-{i:04d}"
        pretrain.append(
            {
                "id": sid,
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the picture briefly."},
                    {"from": "gpt", "value": caption(facts)},
                ],
            }
        )
        pairs = qa_pairs(facts)
        rng.shuffle(pairs)
        turns = pairs[: 2 if rng.random() < 0.3 else 1]  # about a third multi-turn
        conv = []
        for t, (q, a) in enumerate(turns):
            conv.append({"from": "human", "value": f"<image>\n{q}" if t == 0 else q})
            conv.append({"from": "gpt", "value": a})
        instruct.append({"id": sid, "image": name, "conversations": conv})
        if i % 10 == 9:  # a text-only sample every ten, as mix665k has
            q, a = TEXT_ONLY[(i // 10) % len(TEXT_ONLY)]
            conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            instruct.append({"id": f"{split}-text-{i:04d}", "conversations": conv})
    return pretrain, instruct


def main(argv=None, default_out: str = "data/demo") -> None:
    """``default_out``: the ``--out`` default (the repository's script passes its own ``data/demo``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    parser.add_argument("--train", type=int, default=300, help="training pictures")
    parser.add_argument("--val", type=int, default=50, help="validation pictures")
    parser.add_argument("--seed", type=int, default=0, help="another seed draws other pictures")
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", args.train, 0), ("val", args.val, 1)):
        rng = random.Random(args.seed * 1000 + offset)
        pretrain, instruct = build_split(out, split, count, rng)
        for kind, rows in (("pretrain", pretrain), ("instruct", instruct)):
            (out / f"{kind}_{split}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.train} train + {args.val} val pictures and their JSON to {out}")


if __name__ == "__main__":
    main()
