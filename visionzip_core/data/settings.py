"""The ``data:`` section of a training YAML, validated, and how its relative paths resolve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# LLaVA-1.5's system prompt: ``conv_vicuna_v1`` in llava/conversation.py, what ``--version v1``
# trains and evaluates with; used when neither the sample nor the config gives one. (The "curious
# human" text is conv_vicuna_v0's / conv_llava_v1's, which LLaVA-1.5 never saw.)
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class DatasetSource(BaseModel):
    """One JSON/JSONL file of samples and the folder its image paths are relative to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="A .json (list of samples) or .jsonl (one sample per line) file.")
    image_folder: str | None = Field(
        None, description="Folder the samples' image paths are relative to (absolute paths are kept as is)."
    )
    format: Literal["auto", "llava", "messages"] = Field(
        "auto",
        description="'llava': {id, image?, conversations: [{from, value}]}; 'messages': {messages: "
        "[{role, content}], images: [...]}; 'auto': picked from the columns.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Mixing weight: the source contributes weight x its valid samples per epoch "
        "(>1 repeats, <1 keeps a seeded subset).",
    )
    name: str | None = Field(
        None, description="Label used in reports and skip summaries (default: file stem)."
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class DataSettings(BaseModel):
    """Where the samples come from, how they are rendered to tokens, and what to do with bad ones.

    Relative paths (``path``, ``image_folder``) resolve against the current working directory,
    the same directory the training command is run from (the repository root in every documented
    command); call :meth:`resolve_paths` to get absolute paths and check they exist.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: list[DatasetSource] = Field(min_length=1, description="Training sources, mixed by weight.")
    val: list[DatasetSource] = Field(default_factory=list, description="Validation sources (may be empty).")
    template: Literal["plain", "vicuna_v1", "chat_template"] = Field(
        "vicuna_v1",
        description="'plain': images then caption (stage-1 pretraining); 'vicuna_v1': LLaVA-1.5 chat "
        "format; 'chat_template': the tokenizer's own chat template.",
    )
    system_prompt: str | None = Field(
        None, description="System prompt when a sample has none (vicuna_v1 default: LLaVA-1.5's)."
    )
    image_placement: Literal["start", "keep"] = Field(
        "start",
        description="'start': each turn holding <image> becomes '<image>\\n' + the rest of its text, "
        "stripped, as LLaVA's training does; 'keep': placeholders stay where the sample puts them.",
    )
    plain_end: Literal["newline", "eos"] = Field(
        "newline",
        description="How the plain template ends a caption: 'newline' (LLaVA's stage-1 separator, "
        "trained, no eos) or 'eos' (the eos token, trained).",
    )
    image_aspect_ratio: Literal["pad", "resize", "crop", "anyres", "native"] = Field(
        "pad",
        description="'pad': pad to a square filled with the processor's mean colour (LLaVA-1.5 "
        "stage 2); 'resize': stretch to the square input size (no crop); 'crop': the processor's "
        "own resize + centre crop (LLaVA's default, its stage-1 pretraining); 'anyres': the image "
        "as it is, cut into tiles by a tiling processor (LLaVA-NeXT); 'native': the image as it is, "
        "resized by a native-resolution processor to keep its aspect ratio (Qwen2.5-VL).",
    )
    model_max_length: int = Field(
        2048, ge=8, description="Tokens per sample after image expansion; longer text is truncated."
    )
    on_bad_sample: Literal["error", "skip"] = Field(
        "error", description="'error': stop before training on the first bad sample; 'skip': drop and count."
    )
    max_skip_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="With 'skip': stop when more than this fraction of a split is bad."
    )
    check_images: Literal["header", "decode"] = Field(
        "header",
        description="Preflight depth: 'header' opens each image's header (fast); 'decode' decodes every "
        "image fully (catches truncated files up front; slow on large sets, cached afterwards).",
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (images decode there).")
    preflight_num_proc: int | None = Field(
        None, ge=1, description="Processes for the preflight check (default: automatic by dataset size)."
    )
    group_by_length: bool = Field(
        True, description="Batch samples of similar token counts (after compression), per modality."
    )
    packing: bool = Field(
        False,
        description="Pack several whole samples into each row (no padding between them); position ids "
        "restart per sample and attention never crosses a sample boundary.",
    )
    max_tokens_per_row: int | None = Field(
        None,
        ge=8,
        description="With packing: tokens per packed row (default: model_max_length); at least "
        "model_max_length, so every sample fits a row.",
    )
    batch_tokens: int | None = Field(
        None,
        ge=8,
        description="Token budget per micro-batch instead of train.per_device_batch_size samples: "
        "the summed sample lengths with packing, rows x longest sample without. Fewer visual tokens "
        "then mean more samples per step. At least model_max_length.",
    )
    seed: int = Field(0, description="Seed for mixing subsets and the sampler's order.")
    cache_dir: str | None = Field(
        None, description="Where `datasets` keeps its arrow cache (default: HF_DATASETS_CACHE)."
    )

    def contradictions(self) -> list[str]:
        """Problems between this section's own keys, each naming its key."""
        problems = []
        if self.max_tokens_per_row is not None and not self.packing:
            problems.append("data.max_tokens_per_row: only used with data.packing=true")
        if self.packing and self.row_tokens < self.model_max_length:
            problems.append(
                f"data.max_tokens_per_row: {self.row_tokens} is below data.model_max_length "
                f"({self.model_max_length}); a sample of that length would fit no row"
            )
        if self.batch_tokens is not None and self.batch_tokens < self.model_max_length:
            problems.append(
                f"data.batch_tokens: {self.batch_tokens} is below data.model_max_length "
                f"({self.model_max_length}); a sample of that length would fit no micro-batch"
            )
        return problems

    @property
    def row_tokens(self) -> int:
        """Tokens per packed row."""
        return self.max_tokens_per_row or self.model_max_length

    def resolve_paths(self, base_dir: str | os.PathLike | None = None, check: bool = True) -> DataSettings:
        """A copy with every path absolute (relative ones joined to ``base_dir``, default the cwd).

        With ``check``, raises one ``ValueError`` listing every missing file or folder by its key,
        e.g. ``data.train[1].image_folder: no such directory /x/images``.
        """
        base = Path(base_dir) if base_dir is not None else Path.cwd()

        def absolute(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(os.path.expanduser(p))
            return str(q if q.is_absolute() else (base / q).resolve())

        problems: list[str] = []
        resolved: dict[str, list[DatasetSource]] = {}
        for split in ("train", "val"):
            out = []
            for i, src in enumerate(getattr(self, split)):
                new = src.model_copy(
                    update={"path": absolute(src.path), "image_folder": absolute(src.image_folder)}
                )
                if check and not Path(new.path).is_file():
                    problems.append(f"data.{split}[{i}].path: no such file {new.path}")
                if check and new.image_folder is not None and not Path(new.image_folder).is_dir():
                    problems.append(f"data.{split}[{i}].image_folder: no such directory {new.image_folder}")
                out.append(new)
            resolved[split] = out
        cache = absolute(self.cache_dir)
        if problems:
            raise ValueError("; ".join(problems))
        return self.model_copy(update={**resolved, "cache_dir": cache})
