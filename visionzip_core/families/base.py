"""The seam between the model-free parts (algorithm, data, trainer) and one model family.

A family is one module in this package holding everything that depends on a model's classes: how
it loads (or is assembled for stage 1), how its vision tower is captured and compressed per image
or crop, how many visual tokens each image becomes, how its processor is adapted to that count,
which parameters are projector, vision tower and LLM, its LoRA targets, and how its features stay
in the graph for text-only batches. Nothing outside ``visionzip_core/families/`` names a
transformers model class, a vision-tower attribute or a token-count formula; the rest of the
project asks :func:`visionzip_core.families.family_for` and calls these methods.

Adding a family = one new module with a :class:`ModelFamily` subclass, registered in
``families/registry.py``.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from visionzip_core.algorithm import TokenSelection
from visionzip_core.config import VisionZipConfig
from visionzip_core.data.images import ImageLayout
from visionzip_core.data.settings import VICUNA_V1_SYSTEM
from visionzip_core.tokenizer_files import save_pretrained_faithfully

MODULE_GROUPS = ("projector", "vision", "llm")
# A Llama (Vicuna) or Qwen2 decoder layer's linears: what LoRA wraps by default.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def synthetic_text_lengths(size: Any, seed: int = 0) -> list[int]:
    """Per-sample text lengths of a benchmark batch of ``size`` (``size.batch_size`` draws from
    ``size.text_tokens``), fixed by ``seed`` so that every budget sees the same text."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = size.text_tokens
    return torch.randint(lo, hi + 1, (size.batch_size,), generator=gen).tolist()


def save_model_folder(model: nn.Module, processor: Any, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` and ``processor`` as one folder, as a model download holds them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_pretrained_faithfully(processor, out)
    return out


@dataclass(frozen=True)
class ImageTokenSelection:
    """What VisionZip kept of one image, crop by crop, as the adapted model's forward selects it.

    Attributes:
        crops: ``(n_crops, 3, H, W)`` the pixel values the tower saw: the base crop first, then the
            tiles row by row (one crop for an untiled family).
        selection: the :class:`~visionzip_core.algorithm.TokenSelection` of those crops (batch = crops).
        grid: ``(rows, cols)`` of the tiles after the base crop; ``(0, 0)`` for one crop per image.
        patch_side: patches per crop side (the crop's patches are ``patch_side`` squared, in raster order).
        patch_grid: ``(rows, cols)`` of the selected tokens of a crop when they are not a square
            of ``patch_side`` (a native-resolution family: merge units on the resized picture).
        cls: whether the selection's token 0 is a CLS token (patch ``p`` then is token ``p + 1``);
            without one, token ``p`` is patch ``p``.
    """

    crops: torch.Tensor
    selection: TokenSelection
    grid: tuple[int, int]
    patch_side: int
    patch_grid: tuple[int, int] | None = None
    cls: bool = True

    @property
    def patch_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of selected tokens per crop."""
        return self.patch_grid or (self.patch_side, self.patch_side)


class ModelFamily(ABC):
    """One model family (e.g. LLaVA-1.5). Stateless: methods take the model, config or path."""

    #: Short name used in messages and configs ("llava-1.5").
    name: ClassVar[str]
    #: transformers model classes (names) handled, the registry's keys.
    model_classes: ClassVar[tuple[str, ...]]
    #: processor classes (names) handled.
    processor_classes: ClassVar[tuple[str, ...]]
    #: ``config.model_type`` values handled.
    model_types: ClassVar[tuple[str, ...]]
    #: Placeholder the processor expands into the visual tokens of one image.
    image_token: ClassVar[str] = "<image>"
    #: LLM linear layers LoRA wraps by default.
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: Whether stage 1 (assembling the model from a vision folder and an LLM folder) is supported.
    assembles: ClassVar[bool] = False
    #: Whether its stage 2 starts from the stage-1 family's export (:meth:`from_stage1`) instead of
    #: assembling its own stage 1.
    reuses_stage1: ClassVar[bool] = False
    #: Whether an image's visual-token count depends on its size (tiled images, native resolution).
    count_depends_on_size: ClassVar[bool] = False
    #: The vision layer VisionZip reads when the caller does not name one.
    default_feature_layer: ClassVar[int] = -2
    #: Whether the family takes videos, in training data and in the commands (its
    #: ``stock_tokens_per_video`` / ``compressed_tokens_per_video`` count them).
    takes_video: ClassVar[bool] = False
    #: Whether prompts are rendered by the processor's chat template (HF ``messages``) rather
    #: than LLaVA-1.5's ``vicuna_v1`` text.
    uses_chat_template: ClassVar[bool] = False
    #: How inference (``scripts/generate.py``, ``scripts/show_tokens.py``) hands an image to the
    #: processor, as a ``data.image_aspect_ratio`` value: the processor alone.
    inference_aspect_ratio: ClassVar[str] = "crop"
    #: The VisionZip budget a command uses when neither the flags nor the checkpoint give one
    #: (the paper's 54 + 10 for a fixed-size tower).
    default_budget: ClassVar[dict[str, Any]] = {"dominant": 54, "contextual": 10}
    #: Whether the budget may be given as ratios of each image's tokens (``dominant_ratio``): only
    #: for a tower whose token count follows the image size.
    takes_ratios: ClassVar[bool] = False
    #: What the tokens VisionZip selects from are called in ``show_tokens``' summary (a tower
    #: without CLS): its patches, or a family's own unit (Qwen's 2 x 2 merged tokens).
    selected_tokens: ClassVar[str] = "patches"
    #: The same for a video's frame group, where it differs from an image's (None: the same).
    selected_video_tokens: ClassVar[str | None] = None
    #: Placeholder the processor expands into one video's tokens (None: the family takes no video).
    video_token: ClassVar[str | None] = None
    #: ``data.*`` values this family trains with when the config leaves the key out (LLaVA's are
    #: the fields' own defaults).
    data_defaults: ClassVar[dict[str, str]] = {}
    #: ``data.template`` values the family can be trained on.
    templates: ClassVar[tuple[str, ...]] = ("vicuna_v1", "plain", "chat_template")
    #: ``data.image_aspect_ratio`` values its processor can take, the usual one first.
    aspect_ratios: ClassVar[tuple[str, ...]] = ("pad", "resize", "crop")
    #: Sample file formats whose placeholders it reads (``llava``: ``<image>`` in the text;
    #: ``messages``: HF content parts).
    sample_formats: ClassVar[tuple[str, ...]] = ("llava", "messages")

    def prompt(
        self, processor, question: str, images: int, videos: int = 0, system: str | None = None
    ) -> str:
        """The first user turn as the family is trained on it, ending where the reply starts:
        LLaVA-1.5's ``vicuna_v1`` text ``{system} USER: <image>\\n{question} ASSISTANT:`` (``system``
        None: vicuna's own), one placeholder per image. ``scripts/evaluate.py`` and
        ``eval.generate_accuracy`` ask with it."""
        if videos:
            raise ValueError(f"{self.name} takes images only, not videos")
        system = VICUNA_V1_SYSTEM if system is None else system
        return f"{system} USER: " + f"{self.image_token}\n" * images + f"{question} ASSISTANT:"

    def image_layout(self, image_processor, video_processor=None):
        """How this family's processor lays out an image (and a video's frames), for the data
        pipeline (:class:`~visionzip_core.data.images.ImageLayout`): one fixed-size crop by default."""
        return ImageLayout()

    def counted_image_sizes(self, config: Any, inputs: Any, images: list) -> list[tuple[int, int]]:
        """Each image's ``(H, W)`` as the token count needs it, from the processor's output for
        ``images`` (PIL): the original size unless the processor resizes first (native resolution)."""
        return [(img.height, img.width) for img in images]

    # --- loading ---------------------------------------------------------------------------------
    @abstractmethod
    def load(self, path: str, check_files: bool = True, **from_pretrained_kwargs: Any) -> nn.Module:
        """The model in ``path``, refusing missing, unexpected or misshapen tensors, and (with
        ``check_files``) unreadable files and non-finite values
        (:func:`visionzip_core.weight_checks.load_checked`)."""

    @abstractmethod
    def load_processor(self, path: str, **kwargs: Any):
        """The stock processor saved in ``path``. ``trust_remote_code`` and ``config`` (the folder's
        model config, when the caller has read it: not read again) are accepted by every family."""

    @abstractmethod
    def config_from_dict(self, data: dict) -> Any:
        """The model config from a ``config.json``'s contents (without importing remote code)."""

    def config_from_file(self, path: str) -> Any:
        """The model config in a ``config.json`` file (without importing remote code)."""
        return self.config_from_dict(json.loads(Path(path).read_text()))

    def assemble(
        self, vision_path: str, llm_path: str, processor, from_pretrained_kwargs: dict, llm_config: Any = None
    ) -> nn.Module:
        """Stage 1: the model from a vision-tower folder and an LLM folder, with a fresh projector
        (``llm_config``: the LLM folder's config when the caller has read it)."""
        raise NotImplementedError(f"{self.name}: no stage-1 assembly")

    def from_stage1(
        self, stage1: str, out: str, grid_pinpoints: list[list[int]] | None = None, seed: int = 0
    ) -> nn.Module:
        """Write this family's folder in ``out`` from a stage-1 export of the stage-1 family
        (:attr:`reuses_stage1`): stage 2's start."""
        raise NotImplementedError(f"{self.name}: stage 2 does not start from another family's stage 1")

    def assemble_processor(
        self,
        vision_path: str,
        llm_path: str,
        trust_remote_code: bool,
        vision_config: Any = None,
        llm_config: Any = None,
    ):
        """Stage 1: the processor from the LLM's tokenizer and the vision folder's image processor."""
        raise NotImplementedError(f"{self.name}: no stage-1 assembly")

    def assembled_image_tokens(self, vision_config: Any) -> int:
        """Stage 1: visual tokens per image of the model assembled on the tower of ``vision_config``."""
        raise NotImplementedError(f"{self.name}: no stage-1 assembly")

    # --- visual tokens ---------------------------------------------------------------------------
    @abstractmethod
    def tower_tokens(self, config: Any) -> int:
        """Tokens the vision tower yields per image (or per crop), CLS included: what VisionZip
        selects from, so ``dominant + contextual`` must fit in it."""

    @abstractmethod
    def stock_tokens_per_image(self, config: Any, image_size: tuple[int, int] | None = None) -> int:
        """Visual tokens the stock model gives the LLM for one image of ``image_size`` (H, W)."""

    @abstractmethod
    def compressed_tokens_per_image(
        self, config: Any, vz: VisionZipConfig, image_size: tuple[int, int] | None = None
    ) -> int:
        """Visual tokens per image with VisionZip ``vz`` on, for an image of ``image_size``."""

    def several_image_tokens(self, config: Any, vz: VisionZipConfig | None) -> int | None:
        """Visual tokens of each image of a sample holding several, compressed by ``vz`` (None: stock),
        for a family whose processor lays those out apart from an image alone (then its
        :meth:`image_layout` sets ``several_one_crop``); None (the default): as an image alone."""
        return None

    # --- instance adaptation ---------------------------------------------------------------------
    def select_image_tokens(
        self, model: nn.Module, pixel_values: torch.Tensor, image_sizes: Any = None
    ) -> list[ImageTokenSelection]:
        """What the VisionZip-adapted ``model`` keeps of each image in ``pixel_values`` (as the
        image processor gives them; ``image_sizes`` as it gives them too), selected by the same
        calls its forward makes."""
        raise NotImplementedError(f"{self.name}: no token selection to show")

    def select_video_tokens(self, model: nn.Module, **video_inputs: Any) -> list[list[ImageTokenSelection]]:
        """Per video, per frame group, what the VisionZip-adapted ``model`` keeps of it, from the data
        pipeline's video inputs (``ImageTransform.load_videos``: ``pixel_values_videos`` and the
        family's own layout keys); each group's picture is its first frame."""
        raise NotImplementedError(f"{self.name}: no video token selection to show")

    @abstractmethod
    def check_supported(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the model when ``model`` is not this family's."""

    @abstractmethod
    def apply(self, model: nn.Module, vz: VisionZipConfig) -> None:
        """Compress ``model``'s visual tokens (adapts the instance; no class is patched)."""

    @abstractmethod
    def remove(self, model: nn.Module) -> None:
        """Undo :meth:`apply`."""

    @abstractmethod
    def configs(self, model: nn.Module) -> list[Any]:
        """The config objects that record the VisionZip settings (inner model's and wrapper's)."""

    @abstractmethod
    def adapt_processor(self, processor, vz: VisionZipConfig | None, config: Any = None):
        """Make ``processor`` expand each image placeholder to exactly as many ids as the model
        gives features: compressed by ``vz``, or the stock count (``vz=None``, ``config`` given)."""

    def unused_params(self, model: nn.Module) -> set[str]:
        """Parameters outside the vision tower that the adapted model never uses (kept frozen)."""
        return set()

    @abstractmethod
    def keep_vision_in_graph(self, model: nn.Module) -> None:
        """Text-only batches also run the vision path (times zero), so every rank runs the same
        collectives whatever its batch holds."""

    # --- training --------------------------------------------------------------------------------
    @abstractmethod
    def module_group(self, param_name: str) -> str:
        """``projector``, ``vision`` or ``llm``: learning-rate group and freezing unit."""

    def unused_vision_params(self, model: nn.Module) -> set[str]:
        """Vision parameters that never reach the LLM (after the feature layer): kept frozen."""
        return set()

    @abstractmethod
    def lora_target_regex(self, targets: tuple[str, ...]) -> str:
        """A regex matching the LLM's ``targets`` layers only (never the vision tower's)."""

    def unquantized_modules(self) -> list[str]:
        """Module-name patterns that ``model.quantization`` leaves in full precision (transformers'
        ``llm_int8_skip_modules``): everything outside the language model (vision tower, projector,
        lm_head). Every supported family keeps its LLM under ``language_model``."""
        return [r"(?!.*language_model\.)[^.]+"]

    def video_placeholder_text(
        self, config: Any, vz: VisionZipConfig | None, video_size: tuple[int, int, int], video_token: str
    ) -> str | None:
        """The text a video placeholder becomes in training data, for a family whose processor lays a
        video out as more than one run (Qwen3-VL: a timestamp and a run per frame group); it must hold
        exactly ``compressed_tokens_per_video`` (or the stock count when ``vz`` is None) ``video_token``.
        None (the default): the placeholder is repeated that many times."""
        return None

    def packing_refusal(self, config: Any) -> str | None:
        """Why ``data.packing`` (samples packed in one row, 1-D positions restarting per sample)
        cannot train this model, as the end of a one-line config error; None when it can (1-D
        positions: images and videos alike)."""
        return None

    @abstractmethod
    def projector_modules(self) -> list[str]:
        """Module names of the projector (LoRA ``modules_to_save``; the projector-only export)."""

    def llm_hidden_size(self, config: Any) -> int:
        return config.text_config.hidden_size

    @abstractmethod
    def feature_layer(self, config: Any) -> int:
        """The vision layer the projector reads (VisionZip's capture layer), from the model's config
        or, for stage 1, from a bare vision tower's."""

    @abstractmethod
    def vision_layers(self, config: Any) -> int:
        """Encoder layers of the vision tower described by ``config`` (model or bare tower config)."""

    # --- benchmarks ------------------------------------------------------------------------------
    # What ``visionzip_core.bench`` (the FLOP model, the memory simulation, the planner) and the
    # benchmark scripts ask of a family; a family without ``bench_sizes`` is not benchmarked.
    #: The benchmark sizes its random models are built from, name -> size. A size is a frozen
    #: dataclass of the family's layout with ``name``, ``batch_size``, ``text_tokens`` (per-sample
    #: ``(lo, hi)``), ``dtype``, ``note``, ``gpu_only``, ``flop_model`` (whether :meth:`step_flops`
    #: counts it) and ``quick()`` (a smoke variant); real sizes are named ``<family>-<size>``; a
    #: ``smoke`` size (the real image geometry at 64 wide, 2-layer models; figures meaningless) lets
    #: the tests run the scripts in seconds. None: the benchmarks have no size of it.
    bench_sizes: ClassVar[dict[str, Any] | None] = None
    #: The picture ``(H, W)`` its benchmarks feed each sample; None: one crop of the tower's size.
    bench_image: ClassVar[tuple[int, int] | None] = None
    #: The visual-token budgets its benchmarks sweep, key -> split; the key of the None split is the
    #: stock model. Counts ``(dominant, contextual)`` per image (per crop for a tiled family), or, for
    #: a family that :attr:`takes_ratios`, percent kept -> ``(dominant_ratio, contextual_ratio)``.
    bench_budgets: ClassVar[dict[int, tuple | None]] = {}
    #: Tokens of a benchmark sample besides its text and its image tokens (LLaVA's ``<s>``).
    bench_prompt_tokens: ClassVar[int] = 1
    #: Whether its vision tower's forward runs on the meta device. The memory simulation runs the
    #: whole step there; for a tower that cannot, it stands in the frozen tower's measured working
    #: set and runs the rest (:meth:`stand_in_vision`, :meth:`vision_probe`).
    vision_runs_on_meta: ClassVar[bool] = True
    #: The memory simulation's default workload (``scripts/simulate_memory.py``): ``size`` (a name in
    #: its size table), the per-GPU ``micro_batch`` and the ``batch_source`` recipe it comes from, the
    #: ``modes`` it runs, and the stock and smallest budgets it ``calibrate``\ s with; None: the
    #: simulation does not run this family.
    simulation: ClassVar[dict[str, Any] | None] = None
    #: The VisionZip setting its tiny model's host-sync count runs (``scripts/count_syncs.py``):
    #: keyword arguments of ``visionzip()``.
    tiny_budget: ClassVar[dict[str, Any]] = {"dominant": 20, "contextual": 6}

    def bench_config(self, size: Any, tokenizer: Any) -> Any:
        """The model config of benchmark ``size`` (one of :attr:`bench_sizes`), its special-token ids
        those of ``tokenizer`` (the family's tiny tokenizer) where the family has no fixed ones;
        ``text_config`` carries the pad, bos and eos ids the random model generates with."""
        raise NotImplementedError(f"{self.name}: no benchmark sizes")

    def bench_processor(self, model: nn.Module, size: Any, tokenizer: Any):
        """The processor of a random benchmark ``model`` of ``size``, over ``tokenizer`` (a fresh tiny
        tokenizer of the family), as a download would hold it; may point the model's special ids at
        the tokenizer's."""
        raise NotImplementedError(f"{self.name}: no benchmark processor")

    def bench_messages(self, question: str) -> list[dict]:
        """The chat ``messages`` of a one-image benchmark request, for the processor's chat template
        (``scripts/bench_prefill.py``): by default the image placeholder in the text."""
        return [{"role": "user", "content": f"{self.image_token}\n{question}"}]

    def bench_batch(
        self, size: Any, config: Any, plan: Any, device: str | torch.device = "cpu", seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """A right-padded synthetic training batch of ``size`` (``size.batch_size`` samples of
        :func:`synthetic_text_lengths` text, one :attr:`bench_image` each, labels on the answer only)
        with ``plan.llm`` image tokens per image (``plan``: ``visionzip_core.bench.budgets.ImagePlan``),
        as the model's forward takes it."""
        raise NotImplementedError(f"{self.name}: no synthetic benchmark batch")

    def bench_items(
        self, size: Any, text_lengths: list[int], image_tokens: int, seed: int = 0
    ) -> list[dict[str, torch.Tensor]]:
        """Dataset-like items (one image each) with ``image_tokens`` per image and these text lengths,
        laid out as :meth:`bench_batch`'s rows, for the real collators and samplers (packing
        benchmark; families whose count does not depend on the image size)."""
        raise NotImplementedError(f"{self.name}: no synthetic dataset items")

    def step_flops(
        self,
        size: Any,
        config: Any,
        parts: Any,
        plan: Any,
        split: tuple | None,
        *,
        samples: int,
        seq_len: int,
        logits_positions: int | None = None,
    ) -> dict[str, Any] | None:
        """Matmul FLOPs of one training step (``visionzip_core.families.flops``), by part: ``{"vision",
        "projector", "llm", "total", ...} -> Flops``, for ``samples`` samples (one image each) padded
        to ``seq_len``, at the budget of ``plan`` and ``split`` (None: stock), ``parts``
        (``TrainableParts``) trained; ``logits_positions`` as ``llama_flops``. None: no analytic
        model (the benchmarks count FLOPs on the step)."""
        return None

    def bench_size_from_config(self, config: Any, name: str) -> tuple[Any, dict]:
        """The benchmark size of a model folder's ``config`` (no weights) and the budget table to plan
        it with, for the planner's ``--model FOLDER``."""
        raise NotImplementedError(f"{self.name}: the planner takes it by its size name")

    def simulation_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a simulation ``batch`` by the parts of the forward, without its
        data-dependent checks, so that it also runs on meta (``visionzip_core.bench.memory_sim``):
        the token embeddings, ``get_image_features``, ``masked_scatter`` of the features into the
        image positions, then the model on ``inputs_embeds``. Embeddings come before the tower, as in
        the stock forward: the order decides which gradients backward produces first, and so the
        backward peak."""
        inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        inner = inner.model
        input_ids = batch["input_ids"]
        embeds = inner.get_input_embeddings()(input_ids)
        extra = {"image_sizes": batch["image_sizes"]} if "image_sizes" in batch else {}
        features = inner.get_image_features(pixel_values=batch["pixel_values"], return_dict=True, **extra)
        features = torch.cat(list(features.pooler_output), dim=0).to(embeds.device, embeds.dtype)
        image_positions = (input_ids == inner.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_positions, features)
        return model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def vision_probe(self, config: Any, dtype: torch.dtype, attn_implementation: str) -> tuple:
        """For a tower that does not run on meta (:attr:`vision_runs_on_meta` false): a small frozen
        tower of ``config``'s widths whose forward peak per row of ``pixel_values`` is the full
        tower's, with ``attn_implementation``; returns ``(tower, pixel_values, kwargs, rows)``."""
        raise NotImplementedError(f"{self.name}: its tower runs on meta")

    def stand_in_vision(
        self, config: Any, batch: dict[str, torch.Tensor], plan: Any
    ) -> dict[str, torch.Tensor]:
        """For a tower that does not run on meta: what stands in for the frozen tower and the
        compression in :meth:`simulation_loss`, from the CPU ``batch`` of :meth:`bench_batch`."""
        raise NotImplementedError(f"{self.name}: its tower runs on meta")

    def token_plan(
        self, config: Any, vz: VisionZipConfig | None, image_size: tuple[int, int] | None = None
    ) -> tuple[int, int, int]:
        """What one image of ``image_size`` costs, compressed by ``vz`` (None: stock): ``(crops``
        through the tower``, tokens`` through the projector``, tokens`` in the LLM``)``."""
        if vz is None:
            n = self.stock_tokens_per_image(config, image_size)
        else:
            n = self.compressed_tokens_per_image(config, vz, image_size)
        return 1, n, n

    # --- tiny models (tests, demos) ----------------------------------------------------------------
    #: The test tokenizer its tiny folders speak, of the kind its downloads ship: a key of
    #: ``visionzip_core.testing.tokenizers.TINY_TOKENIZERS``.
    tiny_tokenizer: ClassVar[str] = "llama-bpe"

    def image_processor_for(self, config: Any, side: int):
        """The family's stock image processor for a tower of ``side`` px crops, for processors built
        from parts (tiny models, benchmarks)."""
        raise NotImplementedError(f"{self.name}: its processor is loaded from a folder")

    def tiny_model(self, tokenizer: Any, seed: int = 0, **shape: Any) -> tuple[nn.Module, Any]:
        """A tiny random model of this family and its processor, in memory, speaking ``tokenizer``
        (``shape``: the family's size options). Deterministic for a seed."""
        raise NotImplementedError(f"{self.name}: no in-memory tiny model; write one with write_tiny")

    def write_tiny(self, tokenizer: Any, out_dir: str | os.PathLike, seed: int = 0, **shape: Any) -> Path:
        """Write a tiny random model of this family into ``out_dir``, laid out like its real download;
        returns the folder."""
        model, processor = self.tiny_model(tokenizer, seed, **shape)
        return save_model_folder(model, processor, out_dir)

    def write_tiny_parts(
        self, tokenizer: Any, out_dir: str | os.PathLike, seed: int = 0, **shape: Any
    ) -> tuple[Path, Path]:
        """Stage 1's inputs (:attr:`assembles`): a tiny vision-tower folder and a tiny LLM folder
        under ``out_dir``; returns ``(vision_dir, llm_dir)``."""
        raise NotImplementedError(f"{self.name}: no stage-1 assembly")
