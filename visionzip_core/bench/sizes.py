"""Benchmark sizes and shapes: the models the benchmarks and the memory simulation build (random
weights) and the workload run on each, in one table per model layout; a family names its table
(``ModelFamily.bench_sizes``).

Random weights are enough: compression changes shapes, not values, and step time and memory
depend only on shapes (VisionZip's selection is data-dependent, but its cost is not).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from visionzip_core.bench.flops import LlamaShape, VisionTowerShape
from visionzip_core.families import FAMILIES, family_for

# llava-hf LLaVA-1.5 token ids (vocab 32064: Llama's 32000 + <image> + <pad> + padding to 64).
IMAGE_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 32000, 32001, 1, 2


CLIP_L_336 = VisionTowerShape(
    hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch_size=14
)


@dataclass(frozen=True)
class BenchSize:
    """A model size and the workload run on it.

    Attributes:
        text_tokens: per-sample text length range ``[lo, hi]`` (drawn once per sample, fixed seed),
            besides the image tokens: a LLaVA-665k-like instruction + answer.
        batch_size: samples (one image each) per training step.
        dtype: "float32" on CPU (bf16 matmuls are slower on CPUs without bf16 units), "bfloat16" on GPU.
    """

    #: Whether :mod:`visionzip_core.bench.flops` counts this layout's FLOPs analytically (else the
    #: benchmarks count them on the step with ``counted_flops``).
    flop_model: ClassVar[bool] = True

    name: str
    vision: VisionTowerShape
    llm: LlamaShape
    batch_size: int
    text_tokens: tuple[int, int]
    dtype: str
    note: str = ""
    gpu_only: bool = False

    def quick(self) -> BenchSize:
        """A clearly smaller variant for smoke runs: 6 tower layers, 2 LLM layers, same widths."""
        return replace(
            self,
            name=f"{self.name}-quick",
            vision=replace(self.vision, layers=min(self.vision.layers, 6)),
            llm=replace(self.llm, layers=min(self.llm.layers, 2)),
            batch_size=1,
            note=f"QUICK (smoke only): {self.name} widths, 6 tower layers, 2 LLM layers, batch 1",
        )


SIZES: dict[str, BenchSize] = {
    "cpu": BenchSize(
        name="cpu",
        vision=CLIP_L_336,
        # Llama-2 layout at 1/4 width and 1/4 depth, full Llama-2 vocabulary.
        llm=LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=32064),
        batch_size=2,
        text_tokens=(100, 150),
        dtype="float32",
        note="CLIP-L/336 tower (24 layers, 1024 wide) + Llama 8 layers x 1024 (MLP 2816, 16 heads, vocab 32064)",
    ),
    # The cpu size's LLM with a CLIP-L/336 tower at 1/4 width: the tower is about 1/8 of a step's
    # work, as at 7B (where it is 1/20), instead of 3/4 of it. For comparisons that change only the
    # LLM's work (packing), which a full tower beside a small LLM would hide.
    "cpu-llm": BenchSize(
        name="cpu-llm",
        vision=replace(CLIP_L_336, hidden=256, intermediate=1024, heads=4),
        llm=LlamaShape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=32064),
        batch_size=8,
        text_tokens=(100, 150),
        dtype="float32",
        note="CLIP-L/336 geometry at 1/4 width (24 layers x 256, 576 patches) + the cpu size's Llama "
        "(8 layers x 1024, vocab 32064)",
    ),
    "llava-1.5-7b": BenchSize(
        name="llava-1.5-7b",
        vision=CLIP_L_336,
        llm=LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064),
        batch_size=8,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="CLIP-L/336 + Llama-2-7B shapes (LLaVA-1.5-7B), bf16",
    ),
    "llava-next-7b": BenchSize(
        name="llava-next-7b",
        vision=CLIP_L_336,
        llm=LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32064),
        batch_size=4,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="CLIP-L/336 + Vicuna-7B shapes (llava-v1.6-vicuna-7b), 672 px images = 5 crops, bf16",
    ),
}


@dataclass(frozen=True)
class QwenBenchSize:
    """A Qwen2.5-VL size: ``vision`` and ``text`` are the ``vision_config`` / ``text_config`` entries
    of a ``qwen2_5_vl`` config.json (token ids are added by :func:`qwen_config`); ``image`` is the
    (H, W) of every benchmark image (the family's ``bench_image``). The other fields as in
    :class:`BenchSize`."""

    flop_model: ClassVar[bool] = False

    name: str
    vision: dict
    text: dict
    batch_size: int
    text_tokens: tuple[int, int]
    dtype: str
    image: tuple[int, int] = (448, 448)
    note: str = ""
    gpu_only: bool = False

    def quick(self) -> QwenBenchSize:
        """Smoke variant: 2 vision blocks (the last full-attention), 1 LLM layer, same widths, batch 1."""
        depth = min(self.vision["depth"], 2)
        return replace(
            self,
            name=f"{self.name}-quick",
            vision={**self.vision, "depth": depth, "fullatt_block_indexes": [depth - 1]},
            text={**self.text, "num_hidden_layers": min(self.text["num_hidden_layers"], 1)},
            batch_size=1,
            note=f"QUICK (smoke only): {self.name} widths, {depth} vision blocks, 1 LLM layer, batch 1",
        )


_QWEN_VISION_COMMON = {
    "hidden_act": "silu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "tokens_per_second": 2,
}
_QWEN_TEXT_COMMON = {
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},  # sums to head_dim / 2 = 64
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
}

QWEN_SIZES: dict[str, QwenBenchSize] = {
    "cpu": QwenBenchSize(
        name="cpu",
        # The 7B's vision geometry (patch 14, 2x2 merge, 112 px windows, windowed blocks with full
        # attention in every 4th and the last) at 8 blocks of 1/5 width (the 7B's MLP ratio, 3420 / 1280;
        # head dim 64 against the 7B's 80).
        vision={
            **_QWEN_VISION_COMMON,
            "depth": 8,
            "hidden_size": 256,
            "intermediate_size": 684,
            "num_heads": 4,
            "out_hidden_size": 768,
            "fullatt_block_indexes": [3, 7],
        },
        # Qwen2-layout LLM: head dim 128 (so the 7B's mrope_section fits), grouped KV, 4 layers; a
        # 16k vocabulary (the 7B's 152k LM head would be most of a CPU step).
        text={
            **_QWEN_TEXT_COMMON,
            "hidden_size": 768,
            "intermediate_size": 4096,
            "num_hidden_layers": 4,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "vocab_size": 16384,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="float32",
        note="Qwen2.5-VL geometry at CPU scale: ViT 8 blocks x 256 (MLP 684, 4 heads, full attention in "
        "blocks 3 and 7, 112 px windows) + 2x2 merger + Qwen2 LLM 4 layers x 768 (MLP 4096, 6 heads, "
        "2 KV heads, head dim 128, M-RoPE), vocab 16384; 448 px images (256 merged tokens)",
    ),
    "qwen2.5-vl-7b": QwenBenchSize(
        name="qwen2.5-vl-7b",
        vision={
            **_QWEN_VISION_COMMON,
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        text={
            **_QWEN_TEXT_COMMON,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        },
        batch_size=2,
        text_tokens=(100, 150),
        dtype="bfloat16",
        note="Qwen2.5-VL-7B shapes (ViT 32 x 1280, full attention in blocks 7/15/23/31; Qwen2 28 x 3584, "
        "28 heads, 4 KV heads, vocab 152064), 448 px images (256 merged tokens), bf16; GPU only",
        gpu_only=True,
    ),
}


# The size tables by model layout, as ``ModelFamily.bench_sizes`` names them.
SIZE_TABLES: dict[str, dict] = {"clip-llama": SIZES, "qwen2.5-vl": QWEN_SIZES}


def benchmarked_families() -> list[str]:
    """The registered families the benchmarks have sizes of."""
    return [f.name for f in FAMILIES if f.bench_sizes is not None]


def sizes_for(family: str) -> dict:
    """The sizes ``family``'s benchmarks build (its ``bench_sizes`` table)."""
    table = family_for(family).bench_sizes
    if table is None:
        raise ValueError(
            f"{family}: no benchmark sizes; benchmarked families: {', '.join(benchmarked_families())}"
        )
    return SIZE_TABLES[table]


def size_error(family: str, size_name: str, device: str) -> str | None:
    """Why ``--size size_name`` cannot run for ``family`` on ``device`` (None when it can): it must be
    one of the family's sizes, and a GPU-only size needs CUDA."""
    sizes = sizes_for(family)
    if size_name not in sizes:
        return f"--size {size_name}: not a {family} size; choose from {sorted(sizes)}"
    if sizes[size_name].gpu_only and not device.startswith("cuda"):
        return (
            f"--size {size_name} is a GPU size (8.3B parameters in {sizes[size_name].dtype}; a step would "
            "take minutes and tens of GB on a CPU): run it where CUDA is available, or use --size cpu. "
            "Its structure is checked on the meta device by tests/test_bench_scripts.py."
        )
    return None
