"""A tiny CLIP tower that sees the demo's pictures: ``builtin:demo-llava``.

The random tower of ``builtin:tiny-llava`` gives features a tiny LLM cannot read, so a demo
fine-tuned on it learns the answers' priors, not the picture. Here the same tower (same shape,
:func:`visionzip_core.families.llava.tiny_vision_config`) is first trained to classify what the demo
generator drew (colour, shape, position and the written word, if any) with one linear head per
attribute on the CLS token of the **feature layer** (``hidden_states[-2]``): the layer that both
VisionZip's CLS attention and LLaVA's projector read. The layers after it are never run by a
compressed model, so they are not trained. The pictures are fresh ones from the generator's own
drawing code, made in memory with a fixed seed (never the bundled validation images), half padded
to square as ``configs/demo.yaml`` trains (``image_aspect_ratio: pad``), half centre-cropped by the
processor as ``scripts/evaluate.py`` and ``scripts/generate.py`` show a picture, so that both
views of a picture read the same to the LLM.

Deterministic: fixed picture seed, ``torch.manual_seed`` and a seeded batch order (the same
weights for the same torch build and thread count); 8000 pictures, 16 epochs, about 1 minute 50
seconds on two CPU cores. The result is a normal llava-hf folder written by the same code as the
other built-ins, with the trained tower in place of the random one and a random tiny LLM.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from visionzip_core.capture import resolve_feature_layer
from visionzip_core.data.images import mean_colour, pad_to_square
from visionzip_core.families.base import save_model_folder
from visionzip_core.testing import demo_data
from visionzip_core.testing.tiny import tiny_model

# Seed of the pretraining pictures: the demo data uses seed*1000 + {0, 1}; this is none of those.
PICTURE_SEED = 20_241_204
ATTRIBUTES = ("colour", "shape", "position", "word")
# Share of pretraining pictures with a written word: the demo's 0.3 leaves the tower too few to
# learn reading from within this budget.
WORD_RATE = 0.65
VIEWS = ("pad", "crop")


def demo_generator():
    """:mod:`visionzip_core.testing.demo_data` (the one place the demo pictures are drawn)."""
    return demo_data


def attribute_classes(gen=None) -> dict[str, tuple[str, ...]]:
    """The label set of each attribute; ``word`` includes ``"none"`` (no word written)."""
    gen = gen or demo_generator()
    return {
        "colour": tuple(sorted(gen.COLOURS)),
        "shape": tuple(gen.SHAPES),
        "position": tuple(gen.POSITIONS),
        "word": ("none", *gen.WORDS),
    }


@dataclass(frozen=True)
class DemoPictures:
    """``pixel_values``: ``(N, 3, S, S)`` as the tower sees them; ``labels``: attribute -> ``(N,)`` class
    indices; ``object_masks``: ``(N, S, S)`` bool, the shape's pixels (saturated colour) in the same frame."""

    pixel_values: torch.Tensor
    labels: dict[str, torch.Tensor]
    object_masks: torch.Tensor


def make_demo_pictures(
    count: int, seed: int, image_processor, views: tuple[str, ...] = VIEWS, word_rate: float = WORD_RATE
) -> DemoPictures:
    """``count`` fresh demo pictures drawn with ``random.Random(seed)``, each shown one of ``views``
    (picked by the same generator): ``pad`` (to square with the processor's mean colour, as the
    demo trains) or ``crop`` (the processor alone: resize and centre crop, as scripts/evaluate.py
    and scripts/generate.py feed a picture). ``word_rate`` of them show a written word."""
    gen = demo_generator()
    classes = attribute_classes(gen)
    rng = random.Random(seed)
    fill = mean_colour(image_processor)
    images, labels = [], {a: [] for a in ATTRIBUTES}
    for _ in range(count):
        img, facts = gen.make_picture(rng, word_rate)
        images.append(pad_to_square(img, fill) if rng.choice(views) == "pad" else img)
        for a in ATTRIBUTES:
            labels[a].append(classes[a].index(facts[a] or "none"))
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    rgb = (pixels * std + mean) * 255
    # The shape's colours are saturated; the grey background, the mean-colour padding and the black
    # text are not (max - min channel below 80 of 255).
    masks = rgb.amax(1) - rgb.amin(1) > 80
    return DemoPictures(
        pixel_values=pixels, labels={a: torch.tensor(v) for a, v in labels.items()}, object_masks=masks
    )


class AttributeHeads(nn.Module):
    """One linear classifier per attribute on a ``(B, hidden)`` CLS feature."""

    def __init__(self, hidden: int, classes: dict[str, tuple[str, ...]]):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(c)) for a, c in classes.items()})

    def forward(self, cls: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: head(cls) for a, head in self.heads.items()}


def feature_layer_cls(tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -2) -> torch.Tensor:
    """``(B, hidden)``: the CLS token of ``hidden_states[feature_layer]``, running only the layers up to it."""
    index = resolve_feature_layer(feature_layer, len(tower.encoder.layers))
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in tower.encoder.layers[:index]:
        hidden = layer(hidden, None)
    return hidden[:, 0]


def accuracy(heads: AttributeHeads, tower: nn.Module, pictures: DemoPictures) -> dict[str, float]:
    """Held-out accuracy of each head on ``pictures``."""
    with torch.no_grad():
        logits = heads(feature_layer_cls(tower, pictures.pixel_values))
    return {a: (logits[a].argmax(-1) == pictures.labels[a]).float().mean().item() for a in ATTRIBUTES}


def pretrain_demo_tower(
    tower: nn.Module,
    image_processor,
    pictures: int = 8000,
    epochs: int = 16,
    batch_size: int = 64,
    lr: float = 6e-3,
    seed: int = 0,
    log=print,
) -> AttributeHeads:
    """Train ``tower`` (in place) and fresh attribute heads on its feature-layer CLS; return the heads.

    Runs on one CPU thread whatever the machine has: float sums depend on the thread count, and
    over 2000 steps a 2-thread build drifts to other weights (up to 1.6 apart). The demo then
    scored 0.66 instead of 0.96 on the same recipe, so the demo's result would depend on the
    machine. One thread takes the same 1 min 45 s here: the model is too small to gain from more.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(tower, image_processor, pictures, epochs, batch_size, lr, seed, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain(tower, image_processor, pictures, epochs, batch_size, lr, seed, log) -> AttributeHeads:
    torch.manual_seed(seed)
    classes = attribute_classes()
    start = time.perf_counter()
    data = make_demo_pictures(pictures, PICTURE_SEED, image_processor)
    log(f"demo tower: {pictures} pictures drawn in {time.perf_counter() - start:.0f} s")
    heads = AttributeHeads(tower.config.hidden_size, classes)
    params = [p for p in list(tower.parameters()) + list(heads.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * (pictures // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    for epoch in range(epochs):
        order = torch.randperm(pictures, generator=gen)
        total = 0.0
        for k in range(pictures // batch_size):
            idx = order[k * batch_size : (k + 1) * batch_size]
            logits = heads(feature_layer_cls(tower, data.pixel_values[idx]))
            loss = sum(loss_fn(logits[a], data.labels[a][idx]) for a in ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        log(
            f"demo tower: epoch {epoch + 1}/{epochs} loss {total / (pictures // batch_size):.3f} "
            f"({time.perf_counter() - start:.0f} s)"
        )
    tower.eval()
    return heads


def build_demo_llava(out_dir: str | os.PathLike | None = None, seed: int = 0, log=print):
    """The tiny LLaVA of ``builtin:tiny-llava`` with the pretrained demo tower; saved like the other
    built-ins when ``out_dir`` is given. Returns ``(model, processor, heads)``."""
    model, processor = tiny_model("llava-1.5", seed=seed)
    tower = model.model.vision_tower
    heads = pretrain_demo_tower(tower, processor.image_processor, seed=seed, log=log)
    if out_dir is not None:
        save_model_folder(model, processor, out_dir)
    return model, processor, heads
