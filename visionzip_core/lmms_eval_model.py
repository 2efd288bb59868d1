"""``lmms-eval --model visionzip``: any supported model folder, at a VisionZip budget, in lmms-eval.

lmms-eval finds this model through the ``lmms_eval.models`` entry point that ``pyproject.toml``
declares (:mod:`visionzip_core.lmms_eval_entry`), so an installed ``visionzip-core`` is enough;
nothing in lmms-eval is edited. Install both with ``bash scripts/setup.sh --eval``.

    lmms-eval --model visionzip \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,dominant=54,contextual=10 \\
        --tasks pope,mme --batch_size 8 --output_path results/lmms_eval

``--model_args`` keys (all optional but ``pretrained``):
  ``pretrained``  a trained export (``final/``), a folder of a supported family, a hub id (e.g.
                  ``llava-hf/llava-1.5-7b-hf``, downloaded on first use) or a ``builtin:`` name;
  ``dominant``, ``contextual``  the budget as token counts per image (or crop);
  ``dominant_ratio``, ``contextual_ratio``  the budget as fractions of each image's tokens
                  (families whose token count follows the image size: Qwen2-VL, Qwen2.5-VL);
  ``stock``       ``True``: no compression (the baseline the budgets are compared with);
  ``system``      system prompt (default: the family's own, e.g. vicuna's for LLaVA);
  ``dtype``       ``float32`` / ``bfloat16`` / ``float16`` (default: bfloat16 on CUDA, else float32);
  ``device``      torch device (default: ``cuda:$LOCAL_RANK`` when CUDA is there, else ``cpu``).
A key left out keeps the export's recorded split, else the family's own budget
(:attr:`~visionzip_core.families.base.ModelFamily.default_budget`: 54 + 10 for LLaVA).

Every request is asked the way the model's family is trained
(:meth:`~visionzip_core.families.base.ModelFamily.prompt`), with the task's images; requests are
batched (``--batch_size``) with the same generation settings per batch. ``generate_until`` is greedy
unless the task sets a temperature; ``loglikelihood`` returns the summed log-probability of the
continuation and whether greedy decoding would have produced it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from PIL import Image
from tqdm.auto import tqdm

from visionzip_core.adapt import remove_visionzip, visionzip, visionzip_processor
from visionzip_core.config import VisionZipConfig, one_line, read_visionzip_config, settings_from_flags
from visionzip_core.families import FAMILIES, ModelFamily, family_for, image_token_count
from visionzip_core.model_folders import MODEL, check_model_folder
from visionzip_core.model_names import resolve_model_path

# lmms-eval is the optional [eval] extra: without it this module still imports (the class is then
# a plain object that refuses to be built), so importing the package never needs it.
# (lmms_eval.api only: lmms_eval.models would load the entry points, see visionzip_core.lmms_eval_entry.)
try:
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - exercised where the extra is missing
    _LmmsBase, GenerationResult = object, None

INSTALL_HINT = "bash scripts/setup.sh --eval (lmms-eval is the [eval] extra)"
# Placeholders a task's prompt text may already hold: the family's prompt places its own.
_PLACEHOLDERS = ("<image>", "<video>")


def budget_settings(
    family: ModelFamily,
    recorded: VisionZipConfig | None,
    stock: bool = False,
    dominant: int | None = None,
    contextual: int | None = None,
    dominant_ratio: float | None = None,
    contextual_ratio: float | None = None,
) -> VisionZipConfig | None:
    """The VisionZip settings a run uses (None: stock), from the ``--model_args`` keys: a key given
    replaces the export's ``recorded`` split, else the family's default budget applies.

    Raises ``ValueError`` in one line naming the ``--model_args`` key."""
    given = {"dominant": dominant, "contextual": contextual}
    ratios = {"dominant_ratio": dominant_ratio, "contextual_ratio": contextual_ratio}
    if stock:
        named = [k for k, v in (given | ratios).items() if v is not None]
        if named:
            raise ValueError(f"--model_args: stock=True runs without VisionZip; drop {', '.join(named)}")
        return None
    if any(v is not None for v in ratios.values()) and not family.takes_ratios:
        takers = ", ".join(f.name for f in FAMILIES if f.takes_ratios)
        raise ValueError(
            "--model_args dominant_ratio/contextual_ratio: only for families whose token count follows the "
            f"image size ({takers}); {family.name} takes dominant= and contextual= counts"
        )
    try:
        return settings_from_flags(recorded, family.default_budget, **given, **ratios)
    except ValueError as err:
        raise ValueError(f"--model_args: {one_line(err)}") from None


def describe_budget(vz: VisionZipConfig | None) -> str:
    if vz is None:
        return "stock"
    if vz.uses_ratios:
        return (
            f"VisionZip dominant {vz.dominant_ratio:.0%} + contextual {vz.contextual_ratio:.0%} of each image"
        )
    return f"VisionZip dominant {vz.dominant} + contextual {vz.contextual}"


def model_folder(name: str) -> str:
    """The local folder of ``pretrained``: a folder, a ``builtin:`` name, or a hub id (``org/name``,
    downloaded or taken from the hub cache, as lmms-eval's own models take them). Raises
    ``ValueError`` in one line when a hub id cannot be had (e.g. offline and not cached)."""
    path = resolve_model_path(name)
    if Path(path).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return path
    try:
        return snapshot_download(repo_id=path)
    except Exception as err:  # the hub client raises many kinds; the user needs one line
        raise ValueError(
            f"--model_args pretrained: {path} is neither a folder nor a hub model that can be downloaded "
            f"({type(err).__name__}: {' '.join(str(err).split())[:160]})"
        ) from None


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        # Under `accelerate launch` lmms-eval shards the requests by rank; each rank takes its own card.
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--model_args dtype: {name!r} is not float32, bfloat16, float16 or auto")
    return getattr(torch, name)


def _strip_placeholders(text: str) -> str:
    """The task's text without image/video placeholders (as :func:`visionzip_core.evaluation.load_eval_samples`
    reads a question)."""
    return re.sub(r"\s*(" + "|".join(map(re.escape, _PLACEHOLDERS)) + r")\s*", " ", text).strip()


class VisionZipLMM(_LmmsBase):
    """An lmms-eval "simple" model: one supported model folder, compressed to a budget (or stock).

    Built by lmms-eval from ``--model_args`` (see the module docstring); ``batch_size`` and
    ``device`` come from lmms-eval's own flags.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        dominant: int | None = None,
        contextual: int | None = None,
        dominant_ratio: float | None = None,
        contextual_ratio: float | None = None,
        stock: bool = False,
        system: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it for automatic batch sizes; unused
        **unknown: Any,
    ) -> None:
        if GenerationResult is None:
            raise ImportError(f"lmms-eval is not installed: {INSTALL_HINT}")
        super().__init__()
        if unknown:
            known = "pretrained, dominant, contextual, dominant_ratio, contextual_ratio, stock, system, dtype, device"
            raise ValueError(f"--model_args: unknown key(s) {', '.join(sorted(unknown))}; known: {known}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"--batch_size: {batch_size!r}; the visionzip model takes a whole number >= 1")
        self.batch_size_per_gpu = int(batch_size)
        self._device = _device(device)
        self._dtype = _dtype(dtype, self._device)
        self.system = system

        path = model_folder(str(pretrained))
        config_file = Path(path) / "config.json"
        problems = check_model_folder(path, MODEL, "--model_args pretrained")
        if problems:
            raise ValueError("; ".join(problems))
        family = family_for(_model_type(config_file))
        # Budget errors come before the weights load.
        recorded = read_visionzip_config(family.config_from_file(str(config_file)))
        settings = budget_settings(
            family, recorded, bool(stock), dominant, contextual, dominant_ratio, contextual_ratio
        )
        model = family.load(path, dtype=self._dtype)
        remove_visionzip(model)  # an export comes back compressed at its recorded split
        processor = family.load_processor(path)
        if settings is not None:
            visionzip(model, config=settings)
            visionzip_processor(processor, model.config)
        self._model = model.to(self._device).eval()
        self.processor, self.family, self.settings, self.path = processor, family, settings, path
        self.tokenizer = processor.tokenizer
        self._kept_count = image_token_count(model.config, settings)
        self._stock_count = image_token_count(model.config)
        print(
            f"visionzip: {path} ({family.name}), {describe_budget(settings)}, "
            f"{self._tokens_phrase()}, batch size {self.batch_size_per_gpu}, {self._device}, "
            f"{str(self._dtype).removeprefix('torch.')}",
            file=sys.stderr,
            flush=True,
        )

    # --- lmms-eval's interface -------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: Sequence) -> list[str]:
        """Each request's ``args``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``."""
        kwargs = [dict(req.args[1] or {}) for req in requests]
        keys = [json.dumps(k, sort_keys=True, default=str) for k in kwargs]
        out: list[str] = [""] * len(requests)
        batches = _batches(range(len(requests)), keys, self.batch_size, lambda i: -len(requests[i].args[0]))
        for batch in tqdm(batches, desc="visionzip generate", disable=self.rank != 0):
            # A batch's images are read when it runs: a benchmark's would not all fit in memory.
            items = [self._item(*_unpack(requests[i].args, 2)) for i in batch]
            for i, text in zip(batch, self._generate(items, kwargs[batch[0]])):
                out[i] = text
        return out

    def loglikelihood(self, requests: Sequence) -> list:
        """Each request's ``args``: ``(context, continuation, doc_to_visual, doc_id, task, split)``;
        ``continuation`` may be the task's ``doc_to_target`` (a callable on the document).

        Returns one ``(summed log-probability, greedy)`` per request, each wrapped in lmms-eval's
        ``GenerationResult``: lmms-eval 0.7.3 turns any other non-text result into its ``str()``
        before scoring (``unwrap_generation_output``), which breaks every multiple-choice task, while
        a ``GenerationResult``'s ``text`` passes through as it is."""
        continuations = []
        for req in requests:
            continuation = req.args[1]
            if callable(continuation):
                doc_id, task, split = req.args[3:6]
                continuation = continuation(self.task_dict[task][split][doc_id])
            continuations.append(str(continuation))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = _batches(range(len(requests)), [""] * len(requests), self.batch_size, lambda i: 0)
        for batch in tqdm(batches, desc="visionzip loglikelihood", disable=self.rank != 0):
            items = [self._item(*_unpack(requests[i].args, 2)) for i in batch]
            for i, score in zip(batch, self._score(items, [continuations[i] for i in batch])):
                out[i] = score
        return [GenerationResult(text=score) for score in out]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("visionzip: multi-round generation is not supported")

    # --- work ------------------------------------------------------------------------------------
    def _tokens_phrase(self) -> str:
        kept, stock = self._kept_count.describe(), self._stock_count.describe()
        if isinstance(kept, int) and isinstance(stock, int):
            return f"visual tokens per image: {kept} of {stock}"
        return f"visual tokens per image: {kept} ({stock})"  # a count that follows the image size

    def _item(self, context: str, doc_to_visual: Callable | None, where) -> tuple[str, list[Image.Image]]:
        """``(prompt, images)`` of one request: the family's prompt around the task's question."""
        images: list[Image.Image] = []
        if doc_to_visual is not None:
            doc_id, task, split = where
            for visual in doc_to_visual(self.task_dict[task][split][doc_id]) or []:
                if not isinstance(visual, Image.Image):
                    raise ValueError(
                        f"visionzip: task {task}, document {doc_id}: a {type(visual).__name__} visual; "
                        "the visionzip model takes images (PIL) only"
                    )
                images.append(visual.convert("RGB"))
        prompt = self.family.prompt(self.processor, _strip_placeholders(context), len(images), 0, self.system)
        return prompt, images

    def _inputs(self, prompts: list[str], images: list[Image.Image], padding_side: str):
        self.tokenizer.padding_side = padding_side
        inputs = self.processor(text=prompts, images=images or None, return_tensors="pt", padding=True).to(
            self._device
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        return inputs

    def _generate(self, items: list[tuple[str, list]], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0)
        sample = temperature > 0  # lmms-eval's convention: a task asks for sampling by its temperature
        options = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 256),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": sample,
        }
        if sample:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        # Left padding: every row's reply starts right after the prompt's last column.
        inputs = self._inputs([p for p, _ in items], [img for _, imgs in items for img in imgs], "left")
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self._model.generate(
                **inputs, **options, pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id
            )
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [_cut(text, until) for text in texts]

    def _score(self, items: list[tuple[str, list]], continuations: list[str]) -> list[tuple[float, bool]]:
        # The continuation's tokens are those the full text has beyond the prompt alone (tokenized
        # with the placeholders unexpanded: the expansion lies inside the prompt, so it cancels).
        n_cont = []
        for (prompt, _), cont in zip(items, continuations):
            n = len(self.tokenizer(prompt + cont).input_ids) - len(self.tokenizer(prompt).input_ids)
            if n < 1:
                raise ValueError(f"visionzip: loglikelihood of an empty continuation {cont!r}")
            n_cont.append(n)
        inputs = self._inputs(
            [p + c for (p, _), c in zip(items, continuations)],
            [img for _, imgs in items for img in imgs],
            "right",
        )
        with torch.inference_mode():
            logits = self._model(**inputs).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = inputs["input_ids"][:, 1:]
        lengths = inputs["attention_mask"].sum(dim=1).tolist()  # right padding: real tokens come first
        scores = []
        for row, (length, n) in enumerate(zip(lengths, n_cont)):
            span = slice(length - 1 - n, length - 1)  # logits at t predict token t + 1
            want = targets[row, span]
            total = logprobs[row, span].gather(-1, want[:, None]).sum()
            greedy = bool((logprobs[row, span].argmax(-1) == want).all())
            scores.append((float(total), greedy))
        return scores


def _unpack(args: tuple, visual_at: int) -> tuple:
    """``(context, doc_to_visual, (doc_id, task, split))`` of a request's ``args``; a bare
    ``(context, continuation)`` (lmms-eval's unconditional scoring) has no visual."""
    if len(args) < visual_at + 4:
        return args[0], None, None
    return args[0], args[visual_at], tuple(args[visual_at + 1 : visual_at + 4])


def _batches(indices, keys: list[str], size: int, order: Callable[[int], Any]) -> list[list[int]]:
    """Requests grouped by ``keys`` (same generation settings), then by ``order`` (longest prompt
    first, so padding stays small), in batches of ``size``."""
    ranked = sorted(indices, key=lambda i: (keys[i], order(i), i))
    batches, current = [], []
    for i in ranked:
        if current and (len(current) == size or keys[current[0]] != keys[i]):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the task's stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _model_type(config_file: Path) -> str:
    try:
        return json.loads(config_file.read_text())["model_type"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"--model_args pretrained: cannot read {config_file} ({type(err).__name__})"
        ) from None
