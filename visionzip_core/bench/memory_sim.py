"""Peak GPU memory of one training step, simulated without allocating the model.

The model is built on the ``meta`` device (shapes, dtypes and strides, no storage). One training
step runs there under :class:`MetaTensorMemory`, which sums the bytes of every live storage the
step creates (activations saved for backward, temporaries, transient gradients) exactly as
:class:`~visionzip_core.bench.live_memory.LiveTensorMemory` does for real CPU tensors. The model
states that DeepSpeed ZeRO shards across GPUs (bf16 parameters, gradients, fp32 master weights and
Adam moments) are added analytically per GPU (:func:`zero_model_states`).

Units: bytes in code, GiB (``2**30`` bytes) in reports. Shapes: ``B`` samples per GPU, ``S``
padded sequence length, ``H`` LLM hidden size, ``V`` vocabulary.

What runs differently from a GPU step, and why:

- **Attention.** On meta, ``scaled_dot_product_attention`` always takes its math path and would
  store the ``(B, heads, S, S)`` probabilities of every layer. The model is switched to
  :data:`SIM_ATTENTION` (:func:`fused_attention`), which calls the fused CPU flash kernel
  explicitly (it has a meta kernel): ``O(S)`` saved state per head, as flash-attention on a GPU.
  Its mask function returns no mask: batches are right-padded, so causal attention alone gives
  every real token the same result (padded positions carry label -100).
- **Merging image features.** ``LlavaModel.forward`` checks that the image-token count equals the
  feature count with a data-dependent ``.all()``, which a meta tensor cannot answer.
  :func:`training_loss` runs the same parts in the same order instead: the token embedding,
  ``get_image_features`` (stock, or VisionZip's method on the instance), ``masked_scatter`` of the
  features into the image positions, then the model on ``inputs_embeds`` with labels. Only the
  check is left out; :func:`simulation_batch` checks the counts from shapes instead. LLaVA-NeXT's
  ``image_sizes`` stay on the CPU (read as Python sizes only).
- **ZeRO.** The meta step keeps every parameter whole and releases each gradient as soon as it is
  accumulated (:func:`release_grads_on_accumulate`), as ZeRO-2/3 move it into a reduce bucket and
  its partition. The peak above the resident parameters is the activation/temporary figure.
- **Optimizer step.** Measured on meta over one flat fp32 partition as DeepSpeed runs a client
  torch ``AdamW`` (:func:`optimizer_step_transient`): the bf16 gradient partition flattened and
  copied to fp32, then the foreach AdamW update with its square-root temporary.

Not modelled (see BENCHMARKS.md): CUDA kernel workspaces (cuBLAS, flash-attention), the caching
allocator's fragmentation and reserved-but-free blocks, NCCL buffers, DeepSpeed's bucket buffers,
the CUDA context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from visionzip_core.bench.budgets import budgets_for, image_plan, set_budget
from visionzip_core.bench.live_memory import LiveTensorMemory, model_tensors
from visionzip_core.bench.random_models import build_random_model
from visionzip_core.families import ModelFamily, family_for
from visionzip_core.families.clip_llama import BenchSize, VisionTowerShape
from visionzip_core.families.flops import LlamaShape

GIB = 2**30
SIM_ATTENTION = "memsim_fused"  # no "flash" in the name: transformers would look for a kernel package
# finetune: projector + LLM (LLaVA-1.5 stage 2); finetune_vision: + the CLIP layers that reach the
# features (llava-v1.6's recipe); lora: projector + LoRA adapters on the LLM; projector: the
# projector alone (the trainer's projector and pretrain modes; backward still runs through the LLM).
MODES = ("finetune", "lora", "finetune_vision", "projector")
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 128, 256, 0.05  # LLaVA-1.5's LoRA recipe
ADAM_BYTES_PER_PARAM = 12  # fp32 master weight + exp_avg + exp_avg_sq
ZERO3_SUB_GROUP = 1_000_000_000  # configs/deepspeed/zero3.json sub_group_size

# A model small enough to train for real on a CPU in well under a second: tests and calibration.
TINY_SIZE = BenchSize(
    name="tiny",
    vision=VisionTowerShape(hidden=64, intermediate=128, layers=3, heads=4, image_size=112, patch_size=14),
    llm=LlamaShape(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=4, vocab=32064),
    batch_size=1,
    text_tokens=(20, 40),
    dtype="float32",
    note="tiny: CLIP 3 layers x 64 (112 px, 64 patches) + Llama 2 layers x 256, vocab 32064, fp32, batch 1",
)
# Per image (LLaVA-1.5) or per crop (LLaVA-NeXT) for a 112 px tower: 64 patches stock, 12 + 4 compressed.
TINY_BUDGETS: dict[int, tuple[int, int] | None] = {64: None, 16: (12, 4)}


# --- attention ---------------------------------------------------------------------------------
def fused_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function that always runs the fused (flash) CPU kernel.

    Args:
        query: ``(B, heads, S, d)``; key, value: ``(B, kv_heads, S, d)``.
        attention_mask: additive or boolean ``(B, 1, S, S)``, or None (the causal flag decides).

    Returns:
        ``((B, S, heads, d), None)`` as transformers' SDPA function. The kernel saves the output
        and a ``(B, heads, S)`` float32 log-sum-exp for backward, not the attention probabilities.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout, causal, attn_mask=attention_mask, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Mask function of :data:`SIM_ATTENTION`: right padding needs none under causal attention."""
    return None


def register_fused_attention() -> None:
    """Add :data:`SIM_ATTENTION` to transformers' attention registries (a new name; nothing that
    exists is replaced, so models that do not ask for it are unaffected)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SIM_ATTENTION, fused_attention)
    AttentionMaskInterface.register(SIM_ATTENTION, _no_mask)


# --- tracking ----------------------------------------------------------------------------------
class MetaTensorMemory(LiveTensorMemory):
    """:class:`LiveTensorMemory` for meta tensors: the bytes their storages would hold.

    A meta storage has a size (``untyped_storage().nbytes()``) and Python keeps one storage object
    per storage, freed exactly when the last tensor or view on it goes, so the weakref bookkeeping
    is the same. Real (CPU) tensors met in the step, e.g. LLaVA-NeXT's ``image_sizes`` or AdamW's
    step counters, are not GPU memory and are not counted.
    """

    def _counts(self, t: torch.Tensor) -> bool:
        return t.device.type == "meta"


@dataclass(frozen=True)
class StepMemory:
    """Live bytes around one training step.

    Attributes:
        resident: live before the step (parameters, buffers, existing gradients, optimizer state).
        forward: peak during forward (loss computed).
        backward: peak during backward.
        optimizer: peak during ``optimizer.step`` and ``zero_grad`` (``resident`` without one).
    """

    resident: int
    forward: int
    backward: int
    optimizer: int

    @property
    def peak(self) -> int:
        return max(self.forward, self.backward, self.optimizer)

    @property
    def activations(self) -> int:
        """Peak of forward and backward above ``resident``: saved activations, temporaries and,
        unless released, gradients."""
        return max(self.forward, self.backward) - self.resident


# --- the model and its step --------------------------------------------------------------------
def build_training_model(
    size: BenchSize,
    family: str,
    mode: str,
    grad_ckpt: bool,
    device: str | torch.device = "meta",
    seed: int = 0,
    whole_model_ckpt: bool = False,
) -> nn.Module:
    """A random model of ``family`` and ``size`` on ``device``, set up for ``mode``.

    Trainable: ``finetune``: projector + LLM; ``finetune_vision``: + the vision layers that reach
    the features; ``lora``: projector + rank-128 adapters on the LLM's linears (peft, projector in
    ``modules_to_save``, wrapped after checkpointing is enabled, as the trainer does).

    Gradient checkpointing (transformers' non-reentrant) is enabled on the LLM and on the vision
    tower separately, which is what LLaVA's code amounts to: its tower runs under ``no_grad`` and
    only the LLM's input embeddings are made to require grad. ``whole_model_ckpt`` instead calls
    ``activation_checkpointing_enable`` on the whole model and keeps the input-grad hooks it adds
    (``build_model`` removes them); in transformers 5.23 those make the CLIP patch embeddings'
    output require grad, so a frozen tower keeps its checkpointed layer inputs and is
    back-propagated through.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed {MODES}")
    if not family_for(family).vision_runs_on_meta and mode == "finetune_vision":
        raise ValueError(f"mode={mode!r}: the simulation runs {family}'s vision tower frozen only")
    register_fused_attention()
    model = build_random_model(size, device, seed=seed, family=family)
    model.set_attn_implementation(SIM_ATTENTION)
    fam = family_for(model)
    unused = fam.unused_vision_params(model) | fam.unused_params(model)
    for name, p in model.named_parameters():
        group = fam.module_group(name)
        if name in unused or mode == "lora":
            p.requires_grad_(mode == "lora" and group == "projector")
        elif mode == "finetune":
            p.requires_grad_(group != "vision")
        elif mode == "projector":
            p.requires_grad_(group == "projector")
        else:
            p.requires_grad_(True)
    model.config.use_cache = False
    if grad_ckpt and whole_model_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif grad_ckpt:
        # Per part: the whole-model call also hooks every submodel's input embeddings to require
        # grad, the CLIP patch embedding included, so a frozen tower would record its graph.
        inner = _inner_model(model)
        inner.language_model.activation_checkpointing_enable({"use_reentrant": False})
        tower = getattr(inner, "vision_tower", None) or inner.visual  # Qwen2.5-VL names it visual
        tower.activation_checkpointing_enable({"use_reentrant": False})
        if hasattr(tower, "_require_grads_hook"):
            # Qwen2.5-VL's tower is a PreTrainedModel with input embeddings (its patch embedding),
            # hooked to require grad as the whole-model call does; the trainer drops the hook
            # (training.modeling.drop_input_grad_hooks), so a frozen tower records no graph.
            tower.disable_input_require_grads()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=fam.lora_target_regex(fam.lora_targets),
            modules_to_save=fam.projector_modules(),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model.train()


def simulation_batch(
    model: nn.Module,
    size: BenchSize,
    family: str,
    tokens: int,
    budgets: dict | None = None,
    device: str | torch.device = "meta",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The benchmarks' synthetic batch at budget ``tokens``, on ``device`` (``image_sizes`` on the CPU).

    Returns ``(batch, info)``; ``info`` has ``image_tokens`` per image, ``crops`` per image and the
    padded ``seq_len``. The image-token count per sample is checked against the plan here, since
    the meta step cannot check it against the features.
    """
    config = model.config
    plan = image_plan(config, family, tokens, budgets)
    fam = family_for(family)
    cpu = fam.bench_batch(size, config, plan, "cpu", seed=seed)
    counts = (cpu["input_ids"] == config.image_token_id).sum(dim=1)
    if not bool((counts == plan.llm).all()):
        raise RuntimeError(f"batch has {counts.tolist()} image tokens per sample, the plan {plan.llm}")
    if fam.vision_runs_on_meta:
        batch = {k: v if k == "image_sizes" else v.to(device) for k, v in cpu.items()}
    else:
        # The frozen tower and the compression are stood in (ModelFamily.stand_in_vision), the
        # tower's working set by its measured bytes per pixel row.
        batch = {k: cpu[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        batch.update({k: v.to(device) for k, v in fam.stand_in_vision(config, cpu, plan).items()})
        batch["vision_working_set"] = vision_working_bytes(fam, config, cpu["pixel_values"])  # bytes, an int
    info = {"image_tokens": plan.llm, "crops": plan.crops, "seq_len": int(cpu["input_ids"].shape[1])}
    return batch, info


# Bytes per pixel row of a frozen tower's forward, by (family, vision config, dtype): measured once.
_WORKING_BYTES_PER_ROW: dict[tuple[str, str, str], float] = {}


def vision_working_bytes(family: ModelFamily, config, pixel_values: torch.Tensor) -> int:
    """Bytes a frozen vision tower that does not run on meta holds at once during its forward over
    ``pixel_values`` (``(T, D)`` rows of the micro-batch).

    The tower runs without a graph (frozen weights, pixels need no gradient), so only one block's
    tensors are live at a time, and with a fused attention kernel that is linear in ``T``. The
    bytes per row are measured on real CPU tensors, on the family's small tower of the same widths
    (:meth:`~visionzip_core.families.ModelFamily.vision_probe`) under :class:`LiveTensorMemory`, its
    input rows included, with the simulation's fused attention, and scaled to ``T``.
    """
    dtype = pixel_values.dtype
    key = (family.name, config.vision_config.to_json_string(), str(dtype))
    if key not in _WORKING_BYTES_PER_ROW:
        register_fused_attention()
        tower, pixels, kwargs, rows = family.vision_probe(config, dtype, SIM_ATTENTION)
        with LiveTensorMemory([*tower.parameters(), *tower.buffers(), pixels]) as t:
            out = tower(pixels, **kwargs)
            del out
            _WORKING_BYTES_PER_ROW[key] = (t.peak - t.start + pixels.numel() * pixels.element_size()) / rows
    return math.ceil(_WORKING_BYTES_PER_ROW[key] * pixel_values.shape[0])


def set_simulated_budget(model: nn.Module, family: str, tokens: int, budgets: dict) -> None:
    """:func:`set_budget`, except for a family whose tower does not run on meta: its budget the meta
    batch carries (:meth:`~visionzip_core.families.ModelFamily.stand_in_vision`), since its
    compression runs inside the tower's forward, which the meta step does not run."""
    if family_for(family).vision_runs_on_meta:
        set_budget(model, tokens, budgets)


def _inner_model(model: nn.Module) -> nn.Module:
    """The inner model (``language_model``, the vision tower) of a possibly peft-wrapped model."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return inner.model


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], merge: str = "split") -> torch.Tensor:
    """The training loss of ``batch``; only the scalar is kept, as a trainer keeps it for backward.

    ``merge="stock"``: ``model(**batch)``, the model's own forward (real tensors only).
    ``merge="split"``: the same parts in the same order without the data-dependent count check,
    so that it also runs on meta (the family's ``simulation_loss``): token embeddings, image
    features, ``masked_scatter`` of the features into the image positions, then the model on
    ``inputs_embeds``.
    """
    if merge == "stock":
        return model(**batch).loss
    if merge != "split":
        raise ValueError(f"merge={merge!r}; 'split' or 'stock'")
    return family_for(model).simulation_loss(model, batch)


def release_grads_on_accumulate(model: nn.Module) -> list:
    """Drop every gradient as soon as it is accumulated (handles returned; ``.remove()`` undoes).

    ZeRO-2 and ZeRO-3 copy each gradient into a reduce bucket and keep only this rank's partition,
    which :func:`zero_model_states` counts; the full-size gradient lives only until then.
    """

    def release(p: torch.Tensor) -> None:
        p.grad = None

    return [p.register_post_accumulate_grad_hook(release) for p in model.parameters() if p.requires_grad]


def measure_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    tracker: type[LiveTensorMemory],
    optimizer: torch.optim.Optimizer | None = None,
    merge: str = "split",
) -> StepMemory:
    """Live bytes of one step (forward, backward, then ``optimizer.step()`` and ``zero_grad`` when
    given) under ``tracker`` (:class:`LiveTensorMemory` for real tensors, :class:`MetaTensorMemory`
    for meta), each phase's peak separately."""
    with tracker(model_tensors(model, optimizer)) as t:
        loss = training_loss(model, batch, merge)
        forward, t.peak = t.peak, t.current
        loss.backward()
        del loss
        backward, t.peak = t.peak, t.current
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return StepMemory(t.start, forward, backward, t.peak)


# --- model states under ZeRO -------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model (elements, not bytes).

    Attributes:
        total, trainable: all parameters, and those with ``requires_grad``.
        largest_group: trainable parameters of the largest optimizer group (projector, vision,
            llm), the flat partition one optimizer step works on.
        largest_layer: the largest repeated block (a decoder or encoder layer) or single module
            outside one (embedding, LM head), what ZeRO-3 gathers at once.
        persistent: parameters at or under ZeRO-3's persistence threshold, kept whole on every GPU.
        hidden: the LLM's hidden size (sets DeepSpeed's bucket sizes).
        bytes_per_param: of the working dtype (2 for bf16).
        quantizable: frozen weights of the LLM's linear layers, what ``model.quantization``
            stores in 4 or 8 bits (embeddings, norms, lm_head and the vision side stay as they are).
    """

    total: int
    trainable: int
    largest_group: int
    largest_layer: int
    persistent: int
    hidden: int
    bytes_per_param: int
    quantizable: int = 0


def parameter_counts(model: nn.Module) -> ParameterCounts:
    fam = family_for(model)
    hidden = fam.llm_hidden_size(model.config)
    params = list(model.parameters())
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[fam.module_group(name)] = groups.get(fam.module_group(name), 0) + p.numel()
    in_layers: set[int] = set()
    largest = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block_params = list(block.parameters())
                in_layers.update(id(p) for p in block_params)
                largest = max(largest, sum(p.numel() for p in block_params))
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in in_layers]
        largest = max(largest, sum(p.numel() for p in own))
    threshold = 10 * hidden  # stage3_param_persistence_threshold as the trainer fills it
    return ParameterCounts(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        largest_group=max(groups.values(), default=0),
        largest_layer=largest,
        persistent=sum(p.numel() for p in params if p.numel() <= threshold),
        hidden=hidden,
        bytes_per_param=params[0].element_size(),
        quantizable=sum(
            m.weight.numel()
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and "language_model" in name and not m.weight.requires_grad
        ),
    )


# Bytes per weight as bitsandbytes stores it: NF4/FP4 pack two per byte and, with double
# quantization, add 0.127 bits of constants (QLoRA, Dettmers et al. 2023); int8 adds one fp32
# scale per row, negligible at 4096 columns.
QUANTIZED_BYTES_PER_PARAM = {"nf4": (4 + 0.127) / 8, "fp4": (4 + 0.127) / 8, "int8": 1.0}


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of the model states under one ZeRO stage.

    Attributes:
        params: working-dtype parameters (ZeRO-3: this GPU's shard, ``gathered`` included).
        gathered: ZeRO-3 only: parameters gathered whole at one time (in ``params``).
        grads: this GPU's partition of the working-dtype gradients.
        optimizer: this GPU's partition of fp32 master weights, exp_avg and exp_avg_sq.
    """

    params: int
    gathered: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def zero_model_states(
    counts: ParameterCounts,
    stage: int,
    gpus: int,
    *,
    grad_bytes: int | None = None,
    quantization: str = "none",
) -> ModelStates:
    """Model states per GPU for ZeRO ``stage`` (2 or 3) over ``gpus`` data-parallel GPUs.

    ZeRO-2 keeps every parameter whole on each GPU and shards gradients and optimizer states.
    ZeRO-3 also shards parameters and gathers them module by module; its working set is assumed to
    be the largest layer (:attr:`ParameterCounts.largest_layer`) plus the prefetch bucket
    (``0.9 * H**2`` elements, as ``deepspeed_config`` fills it) plus the persistent small parameters.
    ``stage3_max_live_parameters`` (1e9 in configs/deepspeed/zero3.json) would allow up to 2 GB of
    bf16 parameters to stay gathered; DeepSpeed releases a module's parameters after its use, so
    the simulation assumes about one layer.
    """
    b = counts.bytes_per_param
    # grad_bytes: 4 when bf16 gradients accumulate in fp32 (the trainer's deepspeed_config does so).
    grads = (grad_bytes or b) * counts.trainable // gpus
    optimizer = ADAM_BYTES_PER_PARAM * counts.trainable // gpus
    if quantization != "none":
        # ``model.quantization``: the frozen LLM linears in 4/8 bits, on every GPU (not with ZeRO-3).
        if stage == 3:
            raise ValueError("quantization: ZeRO-3 cannot partition bitsandbytes weights; use stage 2")
        quantized = int(QUANTIZED_BYTES_PER_PARAM[quantization] * counts.quantizable)
        params = b * (counts.total - counts.quantizable) + quantized
        return ModelStates(params=params, gathered=0, grads=grads, optimizer=optimizer)
    if stage == 2:
        return ModelStates(params=b * counts.total, gathered=0, grads=grads, optimizer=optimizer)
    if stage != 3:
        raise ValueError(f"ZeRO stage {stage}; 2 or 3")
    prefetch = int(0.9 * counts.hidden * counts.hidden)
    gathered = b * (counts.largest_layer + prefetch + counts.persistent)
    return ModelStates(
        params=b * counts.total // gpus + gathered, gathered=gathered, grads=grads, optimizer=optimizer
    )


def optimizer_step_transient(numel: int, grad_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes above the resident state while torch's AdamW steps one flat fp32 partition of ``numel``.

    As DeepSpeed ZeRO-2/3 step a client torch optimizer: the partition's gradients (``grad_dtype``,
    already resident) are flattened into one tensor and copied to fp32 as the master weights'
    gradient, then ``AdamW(foreach=True)`` (CUDA's default) updates in place, with a temporary for
    ``sqrt(exp_avg_sq)``. Measured on meta: 0 bytes are allocated.
    """
    if numel == 0:
        return 0
    master = torch.zeros(numel, device="meta", requires_grad=True)
    optimizer = torch.optim.AdamW([master], lr=1e-5, foreach=True)
    master.grad = torch.zeros_like(master)
    optimizer.step()  # creates exp_avg and exp_avg_sq
    master.grad = None
    half = numel // 2  # the partition arrives as several views; two are enough for the flatten copy
    grads = [
        torch.zeros(half, device="meta", dtype=grad_dtype),
        torch.zeros(numel - half, device="meta", dtype=grad_dtype),
    ]
    states = [v for v in optimizer.state[master].values() if isinstance(v, torch.Tensor)]
    with MetaTensorMemory([master, *states, *grads]) as t:
        master.grad = torch.cat(grads).to(torch.float32)
        optimizer.step()
        master.grad = None
        return t.peak - t.start


# --- the simulation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One family's simulated training setup.

    Attributes:
        size: model shapes, dtype and the per-GPU micro-batch (``batch_size``).
        family: a family name (``visionzip_core.bench.sizes.benchmarked_families``).
        budgets: visual-token budgets (per image; per crop for LLaVA-NeXT) to their splits.
        batch_note: where the micro-batch comes from.
    """

    size: BenchSize
    family: str
    budgets: dict[int, tuple[int, int] | None]
    batch_note: str


def workload(
    size: BenchSize, family: str, micro_batch: int, batch_note: str, budgets: dict | None = None
) -> Workload:
    return Workload(replace(size, batch_size=micro_batch), family, budgets or budgets_for(family), batch_note)


def simulate(
    work: Workload,
    modes: Iterable[str],
    grad_ckpt: Iterable[bool] = (True, False),
    stages: Iterable[int] = (2, 3),
    gpus: int = 8,
    seed: int = 0,
    whole_model_ckpt: bool = False,
    log=print,
    quantization: str = "none",
) -> list[dict]:
    """One row per (mode, gradient checkpointing, budget, ZeRO stage): per-GPU bytes of each part.

    Each (mode, checkpointing, budget) is one meta step; the ZeRO stages share its activation
    figure (the per-GPU micro-batch is the same) and differ in the model states.
    ``quantization`` (``nf4`` | ``fp4`` | ``int8``) counts the frozen LLM linears as bitsandbytes
    stores them (:data:`QUANTIZED_BYTES_PER_PARAM`); the step itself is measured unquantized, so a
    layer's weight dequantized for its matmul (one layer at a time) is not counted.
    """
    rows = []
    stages = list(stages)
    for mode in modes:
        for ckpt in grad_ckpt:
            start = time.perf_counter()
            model = build_training_model(work.size, work.family, mode, ckpt, "meta", seed, whole_model_ckpt)
            counts = parameter_counts(model)
            handles = release_grads_on_accumulate(model)
            # ZeRO-2 steps each group's whole partition; ZeRO-3 in sub-groups of at most ZERO3_SUB_GROUP.
            partition = counts.largest_group // gpus
            step_transients = {
                stage: optimizer_step_transient(partition if stage == 2 else min(partition, ZERO3_SUB_GROUP))
                for stage in stages
            }
            for tokens, split in work.budgets.items():
                set_simulated_budget(model, work.family, tokens, work.budgets)
                batch, info = simulation_batch(
                    model, work.size, work.family, tokens, work.budgets, "meta", seed
                )
                step = measure_step(model, batch, MetaTensorMemory)
                for stage in stages:
                    states = zero_model_states(counts, stage, gpus, quantization=quantization)
                    transient = step_transients[stage]
                    rows.append(
                        {
                            "family": work.family,
                            "size": work.size.name,
                            "mode": mode,
                            "zero_stage": stage,
                            "quantization": quantization,
                            "gpus": gpus,
                            "grad_ckpt": ckpt,
                            "tokens": tokens,
                            "split": list(split) if split else None,
                            "image_tokens": info["image_tokens"],
                            "crops_per_image": info["crops"],
                            "micro_batch": work.size.batch_size,
                            "seq_len": info["seq_len"],
                            "params_total": counts.total,
                            "params_trainable": counts.trainable,
                            "params_gib": states.params / GIB,
                            "gathered_gib": states.gathered / GIB,
                            "grads_gib": states.grads / GIB,
                            "optimizer_gib": states.optimizer / GIB,
                            "activations_gib": step.activations / GIB,
                            "forward_peak_gib": (step.forward - step.resident) / GIB,
                            "backward_peak_gib": (step.backward - step.resident) / GIB,
                            "optimizer_step_transient_gib": transient / GIB,
                            "total_gib": (states.total + max(step.activations, transient)) / GIB,
                        }
                    )
            for h in handles:
                h.remove()
            log(
                f"  {work.family} {mode} grad_ckpt={'on' if ckpt else 'off'}: "
                f"{len(work.budgets)} budgets in {time.perf_counter() - start:.1f}s"
            )
    for row in rows:
        stock = next(
            r
            for r in rows
            if r["split"] is None
            and all(r[k] == row[k] for k in ("family", "mode", "zero_stage", "grad_ckpt"))
        )
        row["stock_over_this"] = stock["total_gib"] / row["total_gib"]
    return rows


# --- calibration -------------------------------------------------------------------------------
def calibrate(
    size: BenchSize,
    family: str,
    tokens: int,
    budgets: dict | None = None,
    mode: str = "finetune",
    grad_ckpt: bool = False,
    seed: int = 0,
) -> dict:
    """The same step on real CPU tensors (:class:`LiveTensorMemory`) and on meta (:class:`MetaTensorMemory`).

    Two steps run on each model, in this order:

    - ``zero``: the simulation's own setting (gradients released as accumulated, no optimizer),
      both merged by :func:`training_loss`'s split path: the activation figure of the ZeRO rows;
    - ``full``: forward, backward (gradients kept) and a torch AdamW step, whose state is created
      inside the step; the real run uses the model's own forward (``merge="stock"``), the meta run
      the split path, so the workaround is compared too.

    Returns bytes per run (:class:`StepMemory` fields) and ``diff_pct`` = (meta - real) / real in %.
    """
    budgets = budgets or budgets_for(family)
    out: dict = {"family": family, "size": size.name, "mode": mode, "grad_ckpt": grad_ckpt, "tokens": tokens}
    steps: dict[str, StepMemory] = {}
    for device in ("cpu", "meta"):
        model = build_training_model(size, family, mode, grad_ckpt, device, seed)
        set_budget(model, tokens, budgets)
        batch, info = simulation_batch(model, size, family, tokens, budgets, device, seed)
        out["seq_len"] = info["seq_len"]
        tracker = LiveTensorMemory if device == "cpu" else MetaTensorMemory
        handles = release_grads_on_accumulate(model)
        steps[f"zero_{device}"] = measure_step(model, batch, tracker, None, "split")
        for h in handles:
            h.remove()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        merge = "stock" if device == "cpu" else "split"
        steps[f"full_{device}"] = measure_step(model, batch, tracker, optimizer, merge)
    for kind in ("zero", "full"):
        real, meta = steps[f"{kind}_cpu"], steps[f"{kind}_meta"]
        out[kind] = {
            "real": {**real.__dict__, "peak": real.peak, "activations": real.activations},
            "meta": {**meta.__dict__, "peak": meta.peak, "activations": meta.activations},
            "diff_pct": {
                "peak": 100 * (meta.peak - real.peak) / real.peak,
                "activations": 100 * (meta.activations - real.activations) / real.activations,
            },
        }
    return out
