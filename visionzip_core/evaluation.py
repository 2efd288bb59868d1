"""Generation-based scoring: exact-match accuracy of a model's first reply, per token budget.

Used by ``scripts/evaluate.py``. The prompt is the one LLaVA-1.5 trains and ``scripts/generate.py``
uses (the ``vicuna_v1`` template): ``{system} USER: <image>\\n{question} ASSISTANT:``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from visionzip_core.data.sources import to_conversation
from visionzip_core.data.validation import SampleError


@dataclass(frozen=True)
class EvalSample:
    """The first user turn (placeholders removed), its reference reply and the images it shows."""

    sample_id: str
    question: str
    reference: str
    images: tuple[Path, ...]


def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace and one trailing period do not count: ``" Blue."`` -> ``"blue"``."""
    text = " ".join(text.strip().split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def load_eval_samples(
    path: str | Path, image_folder: str | Path, image_token: str = "<image>"
) -> list[EvalSample]:
    """The samples of a LLaVA-format (or messages-format) JSON/JSONL file that show at least one image.

    Raises ``ValueError`` with one line naming the file and the sample for unreadable JSON, a
    malformed sample, or a missing image.
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
    samples = []
    for k, row in enumerate(rows):
        where = f"{path}: sample {k}" + (
            f" (id {row.get('id')})" if isinstance(row, dict) and "id" in row else ""
        )
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not an object")
        fmt = "messages" if "messages" in row else "llava"
        try:
            conv = to_conversation(row, fmt, image_token)
        except SampleError as err:
            raise ValueError(f"{where}: {err}") from None
        if not conv.images:
            continue
        turns = [(role, text) for role, text in conv.turns if role != "system"]
        if len(turns) < 2 or turns[0][0] != "user" or turns[1][0] != "assistant":
            raise ValueError(f"{where}: needs a user turn followed by an assistant reply")
        images = tuple(p if p.is_absolute() else folder / p for p in map(Path, conv.images))
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise ValueError(f"{where}: image not found: {', '.join(missing)}")
        question = re.sub(r"\s*" + re.escape(image_token) + r"\s*", " ", turns[0][1]).strip()
        samples.append(EvalSample(conv.sample_id or str(k), question, turns[1][1], images))
    return samples


def parse_budgets(text: str, recorded: tuple[int, int] | None) -> list[tuple[str, tuple[int, int] | None]]:
    """``"recorded,stock,6+2"`` -> ``[("12+4", (12, 4)), ("stock", None), ("6+2", (6, 2))]``.

    ``stock`` is the model without compression; ``recorded`` the split a trained export records;
    ``D+C`` a dominant + contextual split.
    """
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "stock":
            out.append(("stock", None))
        elif part == "recorded":
            if recorded is None:
                raise ValueError("--budgets: 'recorded' but the model records no VisionZip settings")
            out.append((f"{recorded[0]}+{recorded[1]}", recorded))
        elif re.fullmatch(r"\d+\+\d+", part):
            d, c = map(int, part.split("+"))
            out.append((part, (d, c)))
        else:
            raise ValueError(
                f"--budgets: {part!r} is not stock, recorded or DOMINANT+CONTEXTUAL (e.g. 54+10)"
            )
    if not out:
        raise ValueError("--budgets: empty")
    return out


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


def eval_prompt(sample: EvalSample, system: str) -> str:
    """The first user turn as LLaVA-1.5 trains it: ``{system} USER: <image>\\n{question} ASSISTANT:``."""
    return f"{system} USER: " + "<image>\n" * len(sample.images) + f"{sample.question} ASSISTANT:"


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

    The same prompt and matching as ``scripts/evaluate.py``; inputs go to the model's device and dtype.
    """
    import torch
    from PIL import Image

    from visionzip_core.data.settings import VICUNA_V1_SYSTEM

    system = VICUNA_V1_SYSTEM if system is None else system
    param = next(model.parameters())
    correct, mistakes = 0, []
    for sample in samples:
        images = [Image.open(p).convert("RGB") for p in sample.images]
        inputs = processor(text=[eval_prompt(sample, system)], images=images, return_tensors="pt")
        inputs = inputs.to(param.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        reply = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if exact_match(reply, sample.reference):
            correct += 1
        elif len(mistakes) < 5:
            mistakes.append({"id": sample.sample_id, "reference": sample.reference, "reply": reply.strip()})
    return GeneratedScore(correct, len(samples), tuple(mistakes))
