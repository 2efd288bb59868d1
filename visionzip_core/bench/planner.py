"""The fastest training setting that fits: ZeRO stage, gradient checkpointing and micro-batch for
each visual-token budget, from the memory simulation and the FLOP model.

Compression barely moves the memory of a checkpointed 7B full fine-tune (the sharded states
dominate), but it makes checkpointing unnecessary and the micro-batch larger. The saving of
training on fewer visual tokens is therefore compression x no recomputation x fewer micro-steps,
and this module turns it into a setting:

- **Memory.** Every candidate's per-GPU peak is what :func:`visionzip_core.bench.memory_sim.simulate`
  reports as ``total_gib`` for that setting (its pieces, with the meta model built once per
  checkpointing setting instead of once per micro-batch; a test holds the two equal), with every sample of
  the micro-batch at the longest text length of the data: a length-grouped or unlucky micro-batch
  pads to it, and the run's peak is its worst micro-batch.
- **Fits.** The peak must stay under the usable memory: the GPU's memory less
  :attr:`Hardware.reserve_gib` (CUDA context, cuBLAS and NCCL workspaces, DeepSpeed's buckets)
  and less :attr:`Hardware.fragmentation` of it (the caching allocator's reserved-but-free blocks).
- **Time.** Matmul FLOPs of the optimizer step (the family's ``step_flops``, e.g.
  :func:`visionzip_core.families.clip_llama.llava_step_flops`, forward + backward, plus the forward
  again where checkpointing recomputes it) at the mean text
  length, over ``peak TFLOPS x utilisation``; plus ZeRO's collectives over the interconnect
  (:func:`zero_comm_bytes`), not overlapped with compute. Both assumptions are stated in every
  plan (:meth:`Hardware.describe`) and in BENCHMARKS.md.

Units: bytes and FLOPs in code, GiB (``2**30``) and seconds in rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from visionzip_core.bench.budgets import budgets_for, image_plan, stock_budget
from visionzip_core.bench.memory_sim import (
    GIB,
    LORA_RANK,
    TINY_BUDGETS,
    TINY_SIZE,
    ZERO3_SUB_GROUP,
    MetaTensorMemory,
    build_training_model,
    calibrate,
    measure_step,
    optimizer_step_transient,
    parameter_counts,
    release_grads_on_accumulate,
    set_simulated_budget,
    simulation_batch,
    zero_model_states,
)
from visionzip_core.bench.random_models import bench_config
from visionzip_core.bench.sizes import benchmarked_families, sizes_for
from visionzip_core.bench.synthetic import mix665k_like_text_lengths
from visionzip_core.families import FAMILIES, ModelFamily, family_for
from visionzip_core.families.flops import TrainableParts


def simulated_families() -> list[str]:
    """The families the memory simulation runs (``ModelFamily.simulation``)."""
    return [f.name for f in FAMILIES if f.simulation is not None]


def folder_families() -> list[str]:
    """The simulated families whose model folders the planner reads (``bench_size_from_config``);
    the others are planned by their size names."""
    return [
        f.name
        for f in FAMILIES
        if f.simulation is not None
        and type(f).bench_size_from_config is not ModelFamily.bench_size_from_config
    ]


# Planner modes -> the simulation's modes. projector/pretrain train the projector only, which the
# simulation does not model separately; their memory is at most LoRA's (no adapters), so they are
# planned as lora would be, which errs on the safe side.
PLAN_MODES = {
    "finetune": "finetune",
    "lora": "lora",
    "projector": "lora",
    "pretrain": "lora",
    "finetune_vision": "finetune_vision",  # finetune with train.tune_vision_tower
}
ZERO_STAGES = (2, 3)


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's dense bf16 tensor-core peak (vendor data sheet, no sparsity), in TFLOPS."""

    name: str
    bf16_tflops: float


GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("NVIDIA A100 SXM", 312.0),
    "h100": GpuSpec("NVIDIA H100 SXM", 989.0),
    "h200": GpuSpec("NVIDIA H200 SXM", 989.0),
    "l40s": GpuSpec("NVIDIA L40S", 362.0),
    "rtx4090": GpuSpec("NVIDIA RTX 4090", 165.0),
    "rtx3090": GpuSpec("NVIDIA RTX 3090", 71.0),
}
DEFAULT_GPU = "a100"  # LLaVA-1.5 and the paper trained on 8 x A100
# Model FLOPs utilisation of a bf16 fine-tune at these sizes with flash-attention: 35-50% is
# what such runs report; 40% is stated, not measured here.
DEFAULT_UTILISATION = 0.40
# Effective bus bandwidth of one collective (nccl-tests' "busbw"), in gigabits per second. An 8 x
# A100 NVLink node measures about 1800 Gb/s (230 GB/s) on all-reduce; 800 Gb/s (100 GB/s) leaves
# room for contention and smaller messages. PCIe-only nodes are nearer 100-200 Gb/s.
DEFAULT_INTERCONNECT_GBPS = 800.0
DEFAULT_RESERVE_GIB = 1.0  # CUDA context (~0.5 GiB), cuBLAS / NCCL workspaces, DeepSpeed buckets
# The caching allocator's blocks reserved but not allocated at the peak: PyTorch's allocator keeps
# it to a few percent for a training loop of fixed shapes; variable lengths fragment more.
DEFAULT_FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Hardware:
    """The GPUs a plan is for, and the stated assumptions about them."""

    gpus: int
    memory_gib: float
    tflops: float = GPUS[DEFAULT_GPU].bf16_tflops
    utilisation: float = DEFAULT_UTILISATION
    interconnect_gbps: float = DEFAULT_INTERCONNECT_GBPS
    reserve_gib: float = DEFAULT_RESERVE_GIB
    fragmentation: float = DEFAULT_FRAGMENTATION
    gpu_name: str = GPUS[DEFAULT_GPU].name

    @property
    def usable_gib(self) -> float:
        """What the simulated peak may reach: the rest is headroom."""
        return self.memory_gib * (1 - self.fragmentation) - self.reserve_gib

    def describe(self) -> str:
        return (
            f"{self.gpus} x {self.memory_gib:g} GiB ({self.gpu_name}, bf16 peak {self.tflops:g} TFLOPS at "
            f"{self.utilisation:.0%} utilisation); headroom {self.fragmentation:.0%} + {self.reserve_gib:g} GiB "
            f"-> {self.usable_gib:.1f} GiB usable; interconnect {self.interconnect_gbps:g} Gb/s, not overlapped"
        )


@dataclass(frozen=True)
class TextLengths:
    """Text tokens per sample (besides the image's): the longest sizes memory, the mean sizes time."""

    longest: int
    mean: float
    source: str

    @classmethod
    def from_lengths(cls, lengths: list[int], source: str) -> TextLengths:
        if not lengths:
            raise ValueError(f"{source}: no lengths")
        return cls(int(max(lengths)), sum(lengths) / len(lengths), source)

    @classmethod
    def parse(cls, text: str) -> TextLengths:
        """``665k`` (the benchmarks' LLaVA-665k-like mix, 20,000 draws), ``LO,HI`` (uniform),
        ``N`` (every sample), or a JSON file holding a list of lengths."""
        if text == "665k":
            return cls.from_lengths(mix665k_like_text_lengths(20_000), "665k-like mix (20,000 draws)")
        if text.endswith(".json"):
            try:
                values = json.loads(Path(text).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"--text-tokens: cannot read {text} ({e})") from None
            if not isinstance(values, list) or not all(isinstance(v, int) and v >= 0 for v in values):
                raise ValueError(f"--text-tokens: {text} must hold a JSON list of token counts")
            return cls.from_lengths(values, text)
        try:
            parts = [int(v) for v in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) == 1 and parts[0] >= 0:
            return cls(parts[0], float(parts[0]), f"{parts[0]} tokens")
        if len(parts) == 2 and 0 <= parts[0] <= parts[1]:
            return cls(parts[1], (parts[0] + parts[1]) / 2, f"uniform {parts[0]}-{parts[1]}")
        raise ValueError(f"--text-tokens: {text!r}; use 665k, LO,HI, N, or a .json list of lengths")


@dataclass(frozen=True)
class PlanModel:
    """What the planner needs of a model: its family, shapes and budget table."""

    name: str
    family: str
    size: Any  # one of the family's ``bench_sizes`` (its layout's shapes)
    budgets: dict = field(default_factory=dict)


def known_models() -> dict[str, str]:
    """Size names the planner knows -> family: each benchmarked family's real sizes, named
    ``<family>-<size>`` in its table (``llava-1.5-7b``)."""
    return {
        name: family
        for family in benchmarked_families()
        for name in sizes_for(family)
        if name.startswith(family + "-")
    }


def resolve_model(name_or_folder: str) -> PlanModel:
    """A size name (:func:`known_models`) or a model folder, read from its ``config.json`` alone."""
    known = known_models()
    if name_or_folder in known:
        family = known[name_or_folder]
        if family_for(family).simulation is None:
            raise ValueError(
                f"--model {name_or_folder}: the memory simulation does not run {family} yet "
                f"(it runs {', '.join(simulated_families())})"
            )
        return PlanModel(name_or_folder, family, sizes_for(family)[name_or_folder], dict(budgets_for(family)))
    folder = Path(name_or_folder)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"--model {name_or_folder}: not a known size ({', '.join(known)}) nor a folder with a config.json"
        )
    try:
        data = json.loads((folder / "config.json").read_text())
        fam = family_for(data.get("model_type", ""))
    except (json.JSONDecodeError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {folder}/config.json: {e}") from None
    return model_from_config(fam.config_from_file(str(folder / "config.json")), folder.name)


def model_from_config(config, name: str) -> PlanModel:
    """A :class:`PlanModel` from a model folder's config (no weights), by its family's
    ``bench_size_from_config``."""
    fam = family_for(config)
    if fam.name not in folder_families():
        sizes = ", ".join(n for n in known_models() if known_models()[n] == fam.name)
        raise ValueError(
            f"{name}: the planner reads {', '.join(folder_families())} folders; "
            f"plan {fam.name} by its size name ({sizes})"
        )
    size, table = fam.bench_size_from_config(config, name)
    return PlanModel(name, fam.name, size, table)


def budget_split(tokens: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for a budget not in the family's table: the paper's 54 : 10."""
    contextual = max(1, round(tokens * 10 / 64)) if tokens > 1 else 0
    return tokens - contextual, contextual


def default_budgets(model: PlanModel) -> str:
    """``--budgets`` when none is given: the family's benchmark budgets, in the form they are typed
    (token counts; fractions kept for a family that takes ratios)."""
    fam = family_for(model.family)
    keys = [k for k, split in fam.bench_budgets.items() if split is not None]
    return ",".join(["stock", *(f"{k / 100:g}" if fam.takes_ratios else str(k) for k in keys)])


def ratio_budget(item: str) -> tuple[int, tuple[float, float]]:
    """The ratio form of a family that takes ratios (e.g. Qwen2.5-VL): ``"0.45+0.05"`` (dominant + contextual fractions of each image's
    merged tokens) or ``"0.5"`` (kept in all, 0.05 of it contextual as the authors' defaults) ->
    ``(percent key, (dominant, contextual))``."""
    try:
        parts = [float(v) for v in item.split("+")]
    except ValueError:
        raise ValueError(
            f"--budgets: {item!r} is not 'stock', a ratio (0.5) or dominant+contextual (0.45+0.05)"
        ) from None
    if len(parts) == 1:
        contextual = 0.05 if parts[0] > 0.1 else 0.0
        parts = [parts[0] - contextual, contextual]
    if len(parts) != 2 or parts[0] <= 0 or parts[1] < 0 or sum(parts) >= 1:
        raise ValueError(f"--budgets: {item!r}; the kept fractions must be > 0 and sum to under 1")
    dominant, contextual = round(parts[0], 4), round(parts[1], 4)
    return round(100 * (dominant + contextual)), (dominant, contextual)


def parse_budgets(text: str, model: PlanModel) -> list[int]:
    """``"stock,64,128"`` -> budget keys of ``model.budgets`` (missing ones added with the paper's
    split); for a family that takes ratios (e.g. Qwen2.5-VL) ``"stock,0.5,0.45+0.05"`` -> percent
    keys (:func:`ratio_budget`). The stock budget always comes first."""
    stock = stock_budget(model.budgets)
    ratios = family_for(model.family).takes_ratios
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if item == "stock":
            key = stock
        elif ratios:
            key, split = ratio_budget(item)
            model.budgets[key] = split
        else:
            try:
                key = int(item)
            except ValueError:
                raise ValueError(f"--budgets: {item!r} is not 'stock' or a token count") from None
            if not 0 < key <= stock:
                raise ValueError(f"--budgets: {key} is not between 1 and the stock {stock} tokens")
            if key not in model.budgets:
                model.budgets[key] = budget_split(key)
        if key not in out:
            out.append(key)
    return [stock] + [k for k in out if k != stock]


def check_mode(model: PlanModel, mode: str) -> None:
    """A one-line error for a mode the simulation cannot plan for ``model``."""
    if mode not in PLAN_MODES:
        raise ValueError(f"--mode {mode!r}; allowed {list(PLAN_MODES)}")
    if not family_for(model.family).vision_runs_on_meta and PLAN_MODES[mode] == "finetune_vision":
        raise ValueError(f"--mode {mode}: the simulation runs {model.family}'s vision tower frozen only")


def micro_batches(global_batch: int, gpus: int) -> list[int]:
    """Micro-batches that make up ``global_batch`` over ``gpus`` with a whole accumulation, largest first."""
    if global_batch % gpus:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --gpus {gpus}")
    per_gpu = global_batch // gpus
    return [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0]


QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


def check_quantization(mode: str, quantization: str) -> None:
    """``ValueError`` for a quantization the trainer would refuse (as ``model.quantization``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: one of {', '.join(QUANTIZATIONS)} (got '{quantization}')")
    if quantization != "none" and mode not in ("lora", "projector"):
        raise ValueError(
            f"quantization: {quantization} trains with mode lora or projector (mode is '{mode}')"
        )


def trainable_parts(mode: str, family: str) -> TrainableParts:
    """What ``mode`` trains, LoRA on ``family``'s targets, as the simulation builds it."""
    if mode == "finetune_vision":
        return TrainableParts(vision=True, llm="full")
    llm = {"finetune": "full", "lora": "lora"}.get(mode, "none")
    if llm == "lora":
        targets = family_for(family).lora_targets
        return TrainableParts(llm="lora", lora_rank=LORA_RANK, lora_targets=targets)
    return TrainableParts(llm=llm)


def step_flops(
    model: PlanModel, mode: str, tokens: int, samples: int, text_tokens: float, ckpt: bool
) -> float:
    """Matmul FLOPs of ``samples`` samples at budget ``tokens`` and ``text_tokens`` text each, the
    forward recomputed once more where checkpointing is on (the LLM, and a trained tower)."""
    parts = trainable_parts(mode, model.family)
    fam = family_for(model.family)
    config = bench_config(model.size, fam)
    plan = image_plan(config, model.family, tokens, model.budgets)
    flops = fam.step_flops(
        model.size,
        config,
        parts,
        plan,
        model.budgets[tokens],
        samples=samples,
        seq_len=round(fam.bench_prompt_tokens + plan.llm + text_tokens),
    )
    if flops is None:
        raise ValueError(f"{model.family}: no FLOP model (ModelFamily.step_flops) to time a plan with")
    total = flops["total"].total
    if ckpt:
        total += flops["llm"].forward + (flops["vision"].forward if parts.vision else 0)
    return float(total)


def zero_comm_bytes(stage: int, gpus: int, total_params: int, trainable: int, grad_accum: int) -> float:
    """Bytes each GPU moves through the interconnect in one optimizer step (bf16, ring collectives
    move ``(n - 1) / n`` of the data per GPU).

    ZeRO-2: the trainable gradients are reduce-scattered every micro-step, the updated parameters
    all-gathered once per step. ZeRO-3: every micro-step all-gathers all parameters for forward
    and again for backward (and the recomputed forward, which runs inside it), and
    reduce-scatters the gradients.
    """
    if gpus == 1:
        return 0.0
    ring = (gpus - 1) / gpus
    if stage == 2:
        return ring * 2 * (trainable * grad_accum + trainable)
    return ring * 2 * grad_accum * (2 * total_params + trainable)


@dataclass(frozen=True)
class Candidate:
    """One setting of one budget, simulated and timed."""

    tokens: int
    image_tokens: int
    zero_stage: int
    gradient_checkpointing: bool
    micro_batch: int
    grad_accum: int
    memory_gib: float
    compute_s: float
    comm_s: float
    fits: bool

    @property
    def step_time_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True)
class SettingMemory:
    """Per-GPU bytes of one setting, as :func:`visionzip_core.bench.memory_sim.simulate` adds them."""

    states: int
    activations: int
    optimizer_transient: int

    @property
    def total(self) -> int:
        return self.states + max(self.activations, self.optimizer_transient)


class SettingSimulator:
    """The simulation's pieces for one (mode, checkpointing): the meta model is built once and
    stepped per (budget, micro-batch); the ZeRO stages share each step, as in ``simulate``."""

    def __init__(
        self,
        size: Any,
        family: str,
        mode: str,
        ckpt: bool,
        budgets: dict,
        gpus: int,
        stages,
        quantization: str = "none",
    ):
        self.size, self.family, self.budgets, self.gpus = size, family, budgets, gpus
        self.quantization = quantization
        self.model = build_training_model(size, family, mode, ckpt, "meta")
        self.counts = parameter_counts(self.model)
        self.handles = release_grads_on_accumulate(self.model)
        partition = self.counts.largest_group // gpus
        self.transient = {
            s: optimizer_step_transient(partition if s == 2 else min(partition, ZERO3_SUB_GROUP))
            for s in stages
        }
        self.steps: dict[tuple[int, int], tuple[int, int]] = {}

    def _step(self, tokens: int, micro_batch: int) -> tuple[int, int]:
        """``(activation bytes, image tokens per sample)`` of one meta step."""
        key = (tokens, micro_batch)
        if key not in self.steps:
            set_simulated_budget(self.model, self.family, tokens, self.budgets)
            size = replace(self.size, batch_size=micro_batch)
            batch, info = simulation_batch(self.model, size, self.family, tokens, self.budgets, "meta")
            step = measure_step(self.model, batch, MetaTensorMemory)
            self.steps[key] = (step.activations, info["image_tokens"])
        return self.steps[key]

    def image_tokens(self, tokens: int) -> int:
        """Visual tokens per sample in the LLM at budget ``tokens`` (per image, all crops)."""
        return next(count for (k, _), (_, count) in self.steps.items() if k == tokens)

    def memory(self, tokens: int, micro_batch: int, stage: int) -> SettingMemory:
        activations, _ = self._step(tokens, micro_batch)
        states = zero_model_states(self.counts, stage, self.gpus, quantization=self.quantization)
        return SettingMemory(states.total, activations, self.transient[stage])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def plan(
    model: PlanModel,
    hardware: Hardware,
    mode: str,
    budgets: list[int],
    global_batch: int,
    text: TextLengths,
    stages: tuple[int, ...] = ZERO_STAGES,
    checkpointing: tuple[bool, ...] = (False, True),
    micro_batch: int | None = None,
    log=lambda line: None,
    quantization: str = "none",
) -> list[dict]:
    """One row per budget: the fastest setting whose simulated peak fits, or the smallest-memory
    one with ``fits`` false and the reason. ``micro_batch`` fixes the micro-batch (else searched).

    ``quantization`` (``nf4`` | ``fp4`` | ``int8``, as ``model.quantization``) counts the frozen
    LLM linears at bitsandbytes' size; only ZeRO-2 is searched then (the trainer refuses ZeRO-3 with
    quantized weights), and the step time is the bf16 one (dequantization is not modelled).

    For each checkpointing setting and budget the micro-batches are tried smallest first, up to
    the first that fits under no ZeRO stage (a larger one needs more memory still).
    """
    check_mode(model, mode)
    check_quantization(mode, quantization)
    if quantization != "none":
        stages = tuple(s for s in stages if s != 3)
    sim_mode = PLAN_MODES[mode]
    size = replace(model.size, text_tokens=(text.longest, text.longest))
    sizes = [micro_batch] if micro_batch else micro_batches(global_batch, hardware.gpus)
    per_gpu = global_batch // hardware.gpus
    found: dict[int, list[Candidate]] = {k: [] for k in budgets}
    for ckpt in checkpointing:
        sim = SettingSimulator(
            size, model.family, sim_mode, ckpt, model.budgets, hardware.gpus, stages, quantization
        )
        for tokens in budgets:
            # Ascending: peak memory grows with the micro-batch, so the first one that fits no
            # stage ends the search (and a budget where micro-batch 1 does not fit costs one step).
            for mb in sorted(sizes):
                accum = max(1, per_gpu // mb)
                compute = step_flops(model, sim_mode, tokens, mb * accum, text.mean, ckpt) / (
                    hardware.tflops * 1e12 * hardware.utilisation
                )
                fitted = False
                for stage in stages:
                    memory = sim.memory(tokens, mb, stage).total / GIB
                    comm = zero_comm_bytes(
                        stage, hardware.gpus, sim.counts.total, sim.counts.trainable, accum
                    )
                    fitted |= memory <= hardware.usable_gib
                    found[tokens].append(
                        Candidate(
                            tokens=tokens,
                            image_tokens=sim.image_tokens(tokens),
                            zero_stage=stage,
                            gradient_checkpointing=ckpt,
                            micro_batch=mb,
                            grad_accum=accum,
                            memory_gib=memory,
                            compute_s=compute,
                            comm_s=comm * 8 / (hardware.interconnect_gbps * 1e9),
                            fits=memory <= hardware.usable_gib,
                        )
                    )
                if not fitted:
                    break
            log(f"  {tokens} tokens, grad_ckpt={'on' if ckpt else 'off'}: micro-batch up to {mb} simulated")
        sim.close()
    rows = [_row(model, k, found[k], hardware) for k in budgets]
    stock = rows[0]
    for row in rows:
        row["speedup_vs_stock"] = stock["step_time_s"] / row["step_time_s"]
    return rows


def _row(model: PlanModel, tokens: int, candidates: list[Candidate], hardware: Hardware) -> dict:
    fitting = [c for c in candidates if c.fits]
    if fitting:
        # Ties (one GPU: no communication) go to the larger micro-batch: fewer, fuller kernels.
        best = min(fitting, key=lambda c: (round(c.step_time_s, 6), -c.micro_batch, c.memory_gib))
        reason = _why(best, candidates)
    else:
        best = min(candidates, key=lambda c: (c.memory_gib, c.step_time_s))
        reason = (
            f"nothing fits: the smallest peak is {best.memory_gib:.1f} GiB against "
            f"{hardware.usable_gib:.1f} GiB usable of {hardware.memory_gib:g} GiB"
        )
    split = model.budgets[tokens]
    return {
        "visual_tokens": tokens,
        # A ratio-taking family's budgets are percent of each image's tokens; the others' are
        # tokens per image (per crop for a tiled family).
        "budget_kind": "percent" if family_for(model.family).takes_ratios else "tokens",
        "image_tokens": best.image_tokens,
        "stock": split is None,
        "zero_stage": best.zero_stage,
        "gradient_checkpointing": best.gradient_checkpointing,
        "micro_batch": best.micro_batch,
        "grad_accum": best.grad_accum,
        "memory_gib": best.memory_gib,
        "step_time_s": best.step_time_s,
        "compute_s": best.compute_s,
        "comm_s": best.comm_s,
        "speedup_vs_stock": 1.0,
        "fits": best.fits,
        "reason": reason,
    }


def _why(best: Candidate, candidates: list[Candidate]) -> str:
    """One line: what the chosen setting won by, against the nearest alternatives."""
    parts = []
    if not best.gradient_checkpointing:
        parts.append("checkpointing off (no recomputed forward)")
    else:
        off = [c for c in candidates if not c.gradient_checkpointing]
        smallest = min((c.memory_gib for c in off), default=None)
        parts.append(
            "checkpointing on"
            + (
                f" (off needs >= {smallest:.1f} GiB)"
                if smallest is not None and not any(c.fits for c in off)
                else ""
            )
        )
    other = [
        c
        for c in candidates
        if c.fits
        and c.zero_stage != best.zero_stage
        and c.gradient_checkpointing == best.gradient_checkpointing
    ]
    if other:
        alt = min(other, key=lambda c: c.step_time_s)
        parts.append(
            f"ZeRO-{best.zero_stage} ({alt.step_time_s - best.step_time_s:+.2f} s as ZeRO-{alt.zero_stage})"
        )
    else:
        parts.append(f"ZeRO-{best.zero_stage}")
    parts.append(f"micro-batch {best.micro_batch} x accumulation {best.grad_accum}")
    return "; ".join(parts)


def find_budget(
    model: PlanModel, hardware: Hardware, mode: str, global_batch: int, text: TextLengths, micro_batch: int
) -> dict:
    """The largest budget of the family's table (and the stock model) whose plan fits at ``micro_batch``."""
    budgets = sorted(model.budgets, reverse=True)
    rows = plan(model, hardware, mode, budgets, global_batch, text, micro_batch=micro_batch)
    fitting = [r for r in rows if r["fits"]]
    best = max(fitting, key=lambda r: r["image_tokens"]) if fitting else None
    return {"largest_fitting_budget": best["visual_tokens"] if best else None, "rows": rows}


def calibrated_families() -> list[str]:
    """The simulated families whose meta step a real CPU step checks (``simulation["calibrate"]``)."""
    return [f.name for f in FAMILIES if f.simulation is not None and f.simulation["calibrate"] is not None]


def calibrate_planner(family: str | None = None, mode: str = "finetune") -> list[dict]:
    """The planner's activation bytes (:class:`SettingSimulator`, meta) against a real CPU step of
    the tiny model (:func:`visionzip_core.bench.memory_sim.calibrate`'s ZeRO setting: gradients released
    as accumulated), per budget and checkpointing, for ``family`` (default: the first calibrated one).
    ``diff_pct`` = (planner - real) / real in %."""
    family = family or calibrated_families()[0]
    rows = []
    for ckpt in (False, True):
        sim = SettingSimulator(TINY_SIZE, family, mode, ckpt, TINY_BUDGETS, 1, (2,))
        for tokens in TINY_BUDGETS:
            real = calibrate(TINY_SIZE, family, tokens, TINY_BUDGETS, mode=mode, grad_ckpt=ckpt)["zero"][
                "real"
            ]
            mine = sim.memory(tokens, TINY_SIZE.batch_size, 2).activations
            rows.append(
                {
                    "family": family,
                    "mode": mode,
                    "tokens": tokens,
                    "grad_ckpt": ckpt,
                    "real_bytes": real["activations"],
                    "planner_bytes": mine,
                    "diff_pct": 100 * (mine - real["activations"]) / real["activations"],
                }
            )
        sim.close()
    return rows


def _budget_label(row: dict) -> str:
    if row.get("budget_kind") == "percent":
        return f"{row['visual_tokens']}% = {row['image_tokens']}/image"
    return str(row["visual_tokens"])


def table(rows: list[dict]) -> str:
    """The plan as a Markdown table."""
    head = (
        "| visual tokens | fits | ZeRO | grad ckpt | micro-batch x accum | memory GiB | step s "
        "| compute s | comm s | speed-up vs stock | why |\n"
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---|\n"
    )
    lines = [
        f"| {_budget_label(r)}{' (stock)' if r['stock'] else ''} | {'yes' if r['fits'] else 'NO'} "
        f"| {r['zero_stage']} | {'on' if r['gradient_checkpointing'] else 'off'} "
        f"| {r['micro_batch']} x {r['grad_accum']} | {r['memory_gib']:.1f} | {r['step_time_s']:.2f} "
        f"| {r['compute_s']:.2f} | {r['comm_s']:.2f} | {r['speedup_vs_stock']:.2f}x | {r['reason']} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


__all__ = [
    "GPUS",
    "Hardware",
    "PlanModel",
    "TextLengths",
    "find_budget",
    "micro_batches",
    "model_from_config",
    "parse_budgets",
    "plan",
    "resolve_model",
    "step_flops",
    "table",
    "zero_comm_bytes",
]
