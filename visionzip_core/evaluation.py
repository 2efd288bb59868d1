"""Generation-based scoring: exact-match accuracy of a model's first reply, per token budget.

Used by ``scripts/evaluate.py`` and the trainer's ``eval.generate_accuracy``. Each model is asked
the way its family is trained (:meth:`ModelFamily.prompt`): LLaVA's ``vicuna_v1`` text
``{system} USER: <image>\\n{question} ASSISTANT:``, Qwen's chat template.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from visionzip_core.config import VisionZipConfig, one_line, settings_from_flags
from visionzip_core.data.sources import to_conversation
from visionzip_core.data.validation import SampleError

# Placeholders the samples' media parts are read into (LLaVA files write ``<image>`` in the text);
# the question keeps neither, since each family's prompt places its own.
_IMAGE, _VIDEO = "<image>", "<video>"


@dataclass(frozen=True)
class EvalSample:
    """The first user turn (placeholders removed), its reference reply and the images (and videos,
    each a tuple of frame files) it shows."""

    sample_id: str
    question: str
    reference: str
    images: tuple[Path, ...]
    videos: tuple[tuple[Path, ...], ...] = ()


def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace and one trailing period do not count: ``" Blue."`` -> ``"blue"``."""
    text = " ".join(text.strip().split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def load_eval_samples(path: str | Path, image_folder: str | Path) -> list[EvalSample]:
    """The samples of a LLaVA-format (or messages-format) JSON/JSONL file that show at least one
    image or video.

    Raises ``ValueError`` with one line naming the file and the sample for unreadable JSON, a
    malformed sample, or a missing image or frame.
    """
    path, folder = Path(path), Path(image_folder)
    text = path.read_text()
    try:
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else json.loads(text)
        )
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of samples")

    def located(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else folder / p

    samples = []
    for k, row in enumerate(rows):
        where = f"{path}: sample {k}" + (
            f" (id {row.get('id')})" if isinstance(row, dict) and "id" in row else ""
        )
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not an object")
        fmt = "messages" if "messages" in row else "llava"
        try:
            conv = to_conversation(row, fmt, _IMAGE, _VIDEO)
        except SampleError as err:
            raise ValueError(f"{where}: {err}") from None
        if not conv.images and not conv.videos:
            continue
        turns = [(role, text) for role, text in conv.turns if role != "system"]
        if len(turns) < 2 or turns[0][0] != "user" or turns[1][0] != "assistant":
            raise ValueError(f"{where}: needs a user turn followed by an assistant reply")
        images = tuple(map(located, conv.images))
        videos = tuple(tuple(map(located, video)) for video in conv.videos)
        missing = [str(p) for p in (*images, *(f for v in videos for f in v)) if not p.is_file()]
        if missing:
            raise ValueError(f"{where}: image not found: {', '.join(missing)}")
        question = re.sub(r"\s*(" + re.escape(_IMAGE) + "|" + re.escape(_VIDEO) + r")\s*", " ", turns[0][1])
        samples.append(EvalSample(conv.sample_id or str(k), question.strip(), turns[1][1], images, videos))
    return samples


def samples_for(family, samples: list[EvalSample]) -> tuple[list[EvalSample], int]:
    """``(samples the family can be asked, how many show a video it cannot take)``."""
    if family.takes_video:
        return samples, 0
    kept = [s for s in samples if not s.videos]
    return kept, len(samples) - len(kept)


def parse_budgets(
    text: str, family, recorded: VisionZipConfig | None
) -> list[tuple[str, VisionZipConfig | None]]:
    """``"recorded,stock,6+2"`` -> ``[("12+4", <12+4>), ("stock", None), ("6+2", <6+2>)]``: each
    budget's label and the split it runs at (None: no compression).

    ``stock`` is the model without compression; ``recorded`` the split a trained export records;
    ``default`` the family's default budget (``family.default_budget``); ``D+C`` a dominant +
    contextual count split, ``R+R`` (``0.45+0.05``) a ratio split of each image's tokens (for a
    family that takes ratios). A count or ratio split keeps the rest of the recorded settings
    (feature layer, merge), else the family's, as the budget flags of ``generate`` do; counts
    replace recorded ratios and the other way round. Raises ``ValueError`` naming the bad part.
    """
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "stock":
            out.append(("stock", None))
            continue
        if part == "recorded":
            if recorded is None:
                raise ValueError("--budgets: 'recorded' but the model records no VisionZip settings")
            flags = {}
        elif part == "default":
            flags = {}
        elif re.fullmatch(r"\d+\+\d+", part):
            d, c = map(int, part.split("+"))
            flags = {"dominant": d, "contextual": c}
        elif re.fullmatch(r"\d*\.\d+\+\d*\.\d+", part):
            if not family.takes_ratios:
                raise ValueError(
                    f"--budgets: {part!r} is a ratio split; {family.name} takes DOMINANT+CONTEXTUAL counts"
                )
            d, c = map(float, part.split("+"))
            flags = {"dominant_ratio": d, "contextual_ratio": c}
        else:
            raise ValueError(
                f"--budgets: {part!r} is not stock, recorded, default, DOMINANT+CONTEXTUAL (e.g. 54+10) "
                "or ratios (e.g. 0.45+0.05)"
            )
        base = None if part == "default" else recorded
        try:
            settings = settings_from_flags(base, family.default_budget, **flags)
        except ValueError as err:
            raise ValueError(f"--budgets {part}: {one_line(err)}") from None
        out.append((budget_label(settings), settings))
    if not out:
        raise ValueError("--budgets: empty")
    return out


def budget_label(vz: VisionZipConfig) -> str:
    """A split as ``--budgets`` writes it: ``"54+10"`` or ``"0.45+0.05"``."""
    if vz.uses_ratios:
        return f"{vz.dominant_ratio:g}+{vz.contextual_ratio:g}"
    return f"{vz.dominant}+{vz.contextual}"


class FirstTokenTimer:
    """A ``generate`` streamer that notes when the first new token arrives (the prompt comes first)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self._calls = 0

    def put(self, value) -> None:
        self._calls += 1
        if self._calls == 2 and self.first is None:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.start


def eval_inputs(family, processor, sample: EvalSample, system: str | None, device, dtype):
    """``(processor inputs on device, images)`` for ``sample``'s first user turn, prompted the way
    ``family`` is trained (:meth:`~visionzip_core.families.base.ModelFamily.prompt`); pixel values
    in ``dtype``. ``system`` None: the family's own system prompt."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sample.images]
    frames = [[Image.open(f).convert("RGB") for f in video] for video in sample.videos]
    prompt = family.prompt(processor, sample.question, len(images), len(frames), system)
    inputs = processor(
        text=[prompt],
        images=images or None,
        return_tensors="pt",
        **({"videos": frames} if frames else {}),
    ).to(device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    return inputs, images


@dataclass(frozen=True)
class GeneratedScore:
    correct: int
    samples: int
    mistakes: tuple[dict, ...]  # the first few: id, reference, reply

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0


def score_generation(
    model, processor, samples: list[EvalSample], max_new_tokens: int = 16, system: str | None = None
) -> GeneratedScore:
    """Greedy first replies of ``model`` (compressed or not, as it is) against the references.

    The same prompt (the model family's) and matching as ``scripts/evaluate.py``; inputs go to the
    model's device and dtype. ``samples`` the family cannot take (videos) are the caller's to leave out.
    """
    import torch

    from visionzip_core.families import family_for

    family = family_for(model)
    param = next(model.parameters())
    correct, mistakes = 0, []
    for sample in samples:
        inputs, _ = eval_inputs(family, processor, sample, system, param.device, param.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        reply = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if exact_match(reply, sample.reference):
            correct += 1
        elif len(mistakes) < 5:
            mistakes.append({"id": sample.sample_id, "reference": sample.reference, "reply": reply.strip()})
    return GeneratedScore(correct, len(samples), tuple(mistakes))
