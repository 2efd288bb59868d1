"""DeepSpeed JSON with its ``"auto"`` fields filled from the training YAML, so each value lives once.

The JSON keeps what is DeepSpeed's own business (ZeRO stage, overlap, offload); the YAML owns
batch sizes, accumulation, clipping and precision. Bucket sizes marked ``"auto"`` scale with
the LLM's hidden size, as is usual for ZeRO. Any ``"auto"`` left unfilled is an error, not a
silent default. The optimizer and scheduler are torch objects passed to ``deepspeed.initialize``
(per-module learning rates; no FusedAdam compile), so the JSON must not carry its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from visionzip_core.training.repo_paths import resolve_repo_path
from visionzip_core.training.schema import Settings


def fill_deepspeed_config(
    settings: Settings, world_size: int, precision: str, hidden_size: int
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run.

    Args:
        settings: validated training settings.
        world_size: number of processes (data-parallel ranks).
        precision: resolved precision, "bf16" | "fp16" | "fp32".
        hidden_size: the LLM's hidden size (for ZeRO bucket sizes).
    """
    path = resolve_repo_path(settings.deepspeed.config)
    cfg = json.loads(path.read_text())
    train = settings.train
    micro, accum = train.per_device_batch_size, train.grad_accum_steps
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": settings.optim.max_grad_norm,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.allgather_bucket_size": max(hidden_size * hidden_size, 50_000_000),
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for dotted, value in values.items():
        node, key = _parent(cfg, dotted)
        if node is not None and node.get(key) == "auto":
            node[key] = value
    # A section the JSON leaves out is as good as "auto" for precision: the YAML decides.
    for name in ("bf16", "fp16"):
        cfg.setdefault(name, {})["enabled"] = (
            cfg.get(name, {}).get("enabled", False) is True or precision == name
        )
    if precision == "bf16" and zero_stage(cfg) >= 1:
        # Accumulated over micro-batches in bf16, small gradients are rounded away against large
        # sums (8 bits of mantissa); ZeRO 1-3 keep the accumulator in fp32 when asked. A JSON that
        # names its own data_types keeps them. (Without ZeRO DeepSpeed refuses the mix.)
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    left = sorted(_autos(cfg))
    if left:
        raise ValueError(
            f'deepspeed.config: {path} has "auto" fields this trainer cannot fill: {", ".join(left)}'
        )
    return cfg


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


@contextmanager
def partitioned_loading(cfg: dict[str, Any], enabled: bool = True) -> Iterator[None]:
    """Under ZeRO-3, make ``from_pretrained`` inside this block load weights straight into
    per-rank partitions (``deepspeed.zero.Init``) instead of a whole copy on every rank.

    Only model building may run inside: transformers' switch is process-global, and while it is
    on every ``from_pretrained`` is a collective. Export later builds an unpartitioned copy on
    rank 0 alone, which would hang if the switch were still on. ALL RANKS must enter together.
    """
    if not enabled or zero_stage(cfg) < 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    switch = HfDeepSpeedConfig(cfg)  # transformers keeps only a weak reference: hold it here
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del switch


def _parent(cfg: dict, dotted: str) -> tuple[dict | None, str]:
    *path, key = dotted.split(".")
    node: Any = cfg
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None, key
    return node, key


def _autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []
