"""Train any supported vision-language model on VisionZip tokens: projector | pretrain | finetune | lora.

Families: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; a few data defaults follow the family (below).

    deepspeed train/finetune.py --config configs/demo.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 train/finetune.py --config configs/demo.yaml
    python train/finetune.py --config configs/demo.yaml train.max_steps=20
    visionzip-train --config configs/demo.yaml     # installed; torchrun --no-python visionzip-train ...

Recipe: validate the config (every problem at once, before any weights load) -> build the
processor and check the data -> build the model and the DeepSpeed engine -> resume if a
checkpoint exists -> fit (log, evaluate, checkpoint) -> export ``final/`` -> plot ``metrics.png``.
Exit codes: 0 done (or already finished), 2 bad config, data or folder (another run holds it, or
resuming it would mix two runs), 3 the loss or grad norm became NaN/inf, 4 trained and exported,
but the requested ``eval.generate_accuracy`` failed while scoring the export (the run, its
checkpoints and ``final/`` are kept; score it with ``scripts/evaluate.py``), 74 no space left on disk, 75
stopped on request (preempted; resume by rerunning).

Preemption: the first SIGTERM or SIGINT (on any rank, or the launcher's death) lets every rank
finish the current optimizer step, write a checkpoint, flush metrics and wandb, and exit 75;
rerun the same command (``train.resume: auto``) to continue exactly. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from visionzip_core.training import distributed as dist

dist.set_env_defaults()  # before deepspeed is imported: it reads the accelerator and build dirs at import

import deepspeed  # noqa: E402
import torch  # noqa: E402

from visionzip_core.data import BadDataError, build_dataset  # noqa: E402
from visionzip_core.families import ImageTokenCount  # noqa: E402
from visionzip_core.training import auto_batch, checkpointing, output_lock, preemption, resume  # noqa: E402
from visionzip_core.training.checkpointing import NoSpaceLeft, TrainerState  # noqa: E402
from visionzip_core.training.config_loading import load_config  # noqa: E402
from visionzip_core.training.dataloaders import (  # noqa: E402
    batch_to_device,
    build_train_loader,
    build_val_loader,
    workers_note,
)
from visionzip_core.training.deepspeed_config import (  # noqa: E402
    fill_deepspeed_config,
    partitioned_loading,
    zero_stage,
)
from visionzip_core.training.export import export_final  # noqa: E402
from visionzip_core.training.export_scoring import EXIT_NOT_SCORED, ScoringFailed, score_export  # noqa: E402
from visionzip_core.training.hooks import TrainHooks  # noqa: E402
from visionzip_core.training.input_checks import check_global_batch  # noqa: E402
from visionzip_core.training.library_warnings import ignore_zero_collective_deprecation  # noqa: E402
from visionzip_core.training.metrics import MetricsLog, peak_memory_record  # noqa: E402
from visionzip_core.training.model_spec import ModelSpec, resolve_model_spec  # noqa: E402
from visionzip_core.training.modeling import (  # noqa: E402
    QUANTIZATION_NAMES,
    build_model,
    build_processor,
    count_parameters,
    dataset_inputs,
    param_groups,
    resolve_precision,
    seed_everything,
    torch_dtype,
)
from visionzip_core.training.nonfinite import (  # noqa: E402
    TrainingDiverged,
    count_nonfinite_step,
    skips_left,
    step_is_finite,
)
from visionzip_core.training.optimization import (  # noqa: E402
    build_optimizer,
    build_scheduler,
    group_hyperparameters,
    reapply_hyperparameters,
)
from visionzip_core.training.overlays import overlay_image_paths, token_overlays  # noqa: E402
from visionzip_core.training.plots import write_run_plot  # noqa: E402
from visionzip_core.training.repo_paths import find_config, resolve_repo_path  # noqa: E402
from visionzip_core.training.resume_check import check_resume  # noqa: E402
from visionzip_core.training.schema import ConfigError, Settings, config_keys_help  # noqa: E402
from visionzip_core.training.tracking import WandbTracker  # noqa: E402
from visionzip_core.weight_checks import WeightsError  # noqa: E402


class Preempted(RuntimeError):
    """Stopped on request (a signal on any rank): a checkpoint is written, exit 75."""


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup`."""

    settings: Settings
    spec: ModelSpec
    engine: object
    processor: object
    train_loader: object
    sampler: object
    val_loader: object | None
    state: TrainerState
    steps_per_epoch: int
    device: torch.device
    dtype: torch.dtype
    stage: int
    group_names: list[str]
    image_tokens: ImageTokenCount  # count((H, W)): ids per image
    nonce: str
    metrics: MetricsLog
    tracker: WandbTracker | None
    output_dir: Path
    history: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    hooks: TrainHooks = field(default_factory=TrainHooks)
    overlay_paths: list = field(default_factory=list)  # wandb.token_overlays: fixed validation images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="config keys (set in the YAML or as section.key=value; a number indexes a list, "
        "e.g. data.train.0.weight=0.5):\n\n" + config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help="training YAML (see configs/; configs/... also finds the shipped ones)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' own output: progress bars in logs, DeepSpeed's build notices",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10")
    return p.parse_intermixed_args(argv)


def quiet_libraries(verbose: bool) -> None:
    """Progress bars are for terminals: written to a log or CI they cannot redraw and become one
    endless line, so outside a terminal the libraries' bars are off (our own progress is then one
    plain line per logged step)."""
    if verbose or sys.stderr.isatty():
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class Start:
    """Where this run starts: its folder, the checkpoint it resumes (or None), its settings record."""

    output_dir: Path
    resume_from: Path | None
    precision: str
    record: dict
    settings: Settings  # train.* auto taken from the resumed checkpoint's record
    spec: ModelSpec  # the model, resolved once from the settings


@dataclass
class Data:
    """The processor, the loaders and the schedule length they imply."""

    processor: object
    image_tokens: ImageTokenCount  # count((H, W)): ids per image
    train_loader: object
    sampler: object
    val_loader: object | None
    steps_per_epoch: int
    total_steps: int
    settings: Settings  # train.* auto resolved by the planner


def setup(settings: Settings, device: torch.device) -> Run:
    """Folder and resume check -> data (no weights yet) -> model and engine -> resume -> logging."""
    seed_everything(settings.train.seed)
    start = prepare_start(settings)
    data = prepare_data(start.settings, start)
    settings = data.settings
    engine, group_names, ds_config = prepare_engine(settings, start, data)
    state = resume_state(engine, start, data.total_steps)
    return assemble_run(settings, device, start, data, engine, group_names, ds_config, state)


def prepare_start(settings: Settings) -> Start:
    """Resolve the checkpoint to resume and check it against this config, before anything is
    removed or loaded. ALL RANKS must call this."""
    t = settings.train
    output_dir = Path(t.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = dist.broadcast_object(checkpointing.resolve_resume(t.resume, output_dir, warn=dist.print0))
    precision = resolve_precision(t.precision)
    spec = resolve_model_spec(settings)
    settings, kept = auto_batch.keep_from_checkpoint(settings, resume_from)
    if kept:
        dist.print0(kept)
    record = check_resume(settings, spec, output_dir, resume_from, precision)
    if dist.is_main():
        for stale in checkpointing.remove_incomplete(output_dir):
            dist.print0(f"removed incomplete checkpoint {stale} (interrupted save)")
    dist.barrier()
    return Start(output_dir, resume_from, precision, record, settings, spec)


def prepare_data(settings: Settings, start: Start) -> Data:
    """Processor, datasets and loaders. Data comes before the model: it needs only the tokenizer
    and image processor, so bad data stops the run before any weights load. ALL RANKS must call this."""
    t, rank, world = settings.train, dist.rank(), dist.world_size()
    # Rank 0 preflights first; the others then read its cache. (builtin:* test models are also
    # built by rank 0 alone, before the others read them.)
    if not dist.is_main():
        dist.barrier()
    processor, image_tokens = build_processor(settings, start.spec)
    family_inputs = dataset_inputs(settings, start.spec, processor)
    datasets = {
        split: build_dataset(
            settings.data,
            split,
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
            image_tokens_per_image=image_tokens,
            **family_inputs,
        )
        for split in ("train", "val")
        if getattr(settings.data, split)
    }
    if dist.is_main():
        dist.barrier()
    settings = plan_auto_batch(settings, start, datasets["train"], image_tokens)
    t = settings.train
    if settings.data.batch_tokens is None:  # a token budget sizes its own micro-batches
        check_global_batch(len(datasets["train"]), t, world, warn=dist.print0)
    pad_id, attn = processor.tokenizer.pad_token_id, settings.model.attn_implementation
    if note := workers_note(settings.data.num_workers):
        dist.print0(note)
    train_loader, sampler = build_train_loader(
        datasets["train"], settings.data, t.per_device_batch_size, rank, world, pad_id, attn
    )
    val_loader = (
        build_val_loader(datasets["val"], settings.data, t.per_device_batch_size, rank, world, pad_id, attn)
        if "val" in datasets
        else None
    )
    steps_per_epoch = sampler.batches_in_epoch(0) // t.grad_accum_steps
    if steps_per_epoch == 0:
        per_micro = (
            f"data.batch_tokens={settings.data.batch_tokens}"
            if settings.data.batch_tokens is not None
            else str(t.per_device_batch_size)
        )
        raise BadDataError(
            f"data.train: {len(datasets['train'])} samples make no full optimizer step of "
            f"{per_micro} x {t.grad_accum_steps} x {world} processes"
        )
    # A token budget can cut each epoch into a different number of micro-batches.
    total_steps = t.max_steps or sum(
        sampler.batches_in_epoch(e) // t.grad_accum_steps for e in range(t.epochs)
    )
    start.record["derived"]["data.train_samples"] = len(datasets["train"])
    if start.resume_from is not None:
        check_resume(settings, start.spec, start.output_dir, start.resume_from, start.precision, start.record)
        if not resume.check_step_target(
            start.resume_from, total_steps, start.output_dir, settings.export.enabled
        ):
            dist.print0(
                f"{start.resume_from}: all {total_steps} steps were trained but final/ is missing: export only"
            )
    return Data(
        processor, image_tokens, train_loader, sampler, val_loader, steps_per_epoch, total_steps, settings
    )


def plan_auto_batch(settings: Settings, start: Start, train_set, image_tokens) -> Settings:
    """``train.*: auto`` resolved by the planner for this GPU and this data (one start line), and
    recorded for resume. ALL RANKS must call this (every rank plans alike: same inputs)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    memory = None if device is None else torch.cuda.get_device_properties(device).total_memory
    ds_json = json.loads(resolve_repo_path(settings.deepspeed.config).read_text())
    lengths = auto_batch.text_lengths(train_set.lengths, image_tokens, start.spec.family.bench_image)
    settings, line = auto_batch.resolve(
        settings, start.spec, lengths, dist.world_size(), memory, zero_stage(ds_json)
    )
    if line:
        dist.print0(line)
        start.record["settings"]["train"].update({k: getattr(settings.train, k) for k in auto_batch.KEYS})
    return settings


def prepare_engine(settings: Settings, start: Start, data: Data):
    """``(engine, optimizer group names, DeepSpeed config)``. ALL RANKS must call this."""
    t, world = settings.train, dist.world_size()
    ds_config = fill_deepspeed_config(settings, world, start.precision, start.spec.llm_hidden_size)
    # ZeRO-3: each rank loads only its shard. Not for pretrain, whose LLaVA skeleton is built on
    # the meta device (transformers' ZeRO-3 weight init cannot run there), nor lora, where peft
    # deep-copies the projector for modules_to_save and a copy of a partitioned parameter is
    # empty: those two load whole weights on every rank, then DeepSpeed partitions them.
    with partitioned_loading(ds_config, enabled=t.mode in ("projector", "finetune")):
        model = build_model(settings, start.spec, torch_dtype(start.precision), data.processor)
    groups, group_names = param_groups(model, settings)
    optimizer = build_optimizer(groups, settings.optim, ds_config, fused=torch.cuda.is_available())
    scheduler = build_scheduler(optimizer, data.total_steps, settings.optim)
    ignore_zero_collective_deprecation()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    trainable, total = count_parameters(engine.module)
    if settings.model.quantization != "none":
        dist.print0(
            f"the LLM is loaded in {QUANTIZATION_NAMES[settings.model.quantization]} (bitsandbytes); "
            "the vision tower and the projector are not quantized"
        )
    dist.print0(
        f"mode={t.mode} precision={start.precision} zero={zero_stage(ds_config)} processes={world} "
        f"visual tokens/image={data.image_tokens.describe()} trainable={trainable:,}/{total:,} steps={data.total_steps} "
        f"({data.steps_per_epoch}/epoch) {batch_description(settings, ds_config)}"
    )
    return engine, group_names, ds_config


def batch_description(settings: Settings, ds_config: dict) -> str:
    d, t = settings.data, settings.train
    packed = f", packed in rows of {d.row_tokens} tokens" if d.packing else ""
    if d.batch_tokens is not None:
        return f"micro-batch <= {d.batch_tokens} tokens x {t.grad_accum_steps} x {dist.world_size()}{packed}"
    return f"global batch={ds_config['train_batch_size']}{packed}"


def resume_state(engine, start: Start, total_steps: int) -> TrainerState:
    """A fresh state, or the checkpoint's (weights, optimizer and schedule loaded into ``engine``,
    this run's learning rates re-applied). ALL RANKS must call this."""
    state = TrainerState(world_size=dist.world_size(), total_steps=total_steps)
    if start.resume_from is None:
        return state
    hyperparameters = group_hyperparameters(engine.lr_scheduler)
    state = checkpointing.load_checkpoint(engine, start.resume_from)
    reapply_hyperparameters(engine.lr_scheduler, hyperparameters)
    dist.print0(f"resumed from {start.resume_from}: step {state.step}, epoch {state.epoch}")
    if state.total_steps != total_steps:
        dist.print0(f"note: the schedule now has {total_steps} steps (checkpoint: {state.total_steps})")
        state.total_steps = total_steps
    return state


def assemble_run(settings, device, start: Start, data: Data, engine, group_names, ds_config, state) -> Run:
    """Tracking and metrics, then the :class:`Run`; the resumed RNG state is restored last."""
    tracker = None
    if dist.is_main():
        tracker = WandbTracker(
            settings.wandb, start.output_dir, settings.model_dump(mode="json"), state.wandb_run_id
        )
        state.wandb_run_id = tracker.run_id
    run = Run(
        settings=settings,
        spec=start.spec,
        engine=engine,
        processor=data.processor,
        train_loader=data.train_loader,
        sampler=data.sampler,
        val_loader=data.val_loader,
        state=state,
        steps_per_epoch=data.steps_per_epoch,
        device=device,
        dtype=torch_dtype(start.precision),
        stage=zero_stage(ds_config),
        group_names=group_names,
        image_tokens=data.image_tokens,
        nonce=dist.broadcast_object(uuid.uuid4().hex[:8]),
        metrics=MetricsLog(start.output_dir / "metrics.jsonl", data.total_steps, state.step, dist.is_main()),
        tracker=tracker,
        output_dir=start.output_dir,
        record=start.record,
        # The same list on every rank (the overlays' tower forward is a collective under ZeRO-3).
        overlay_paths=overlay_image_paths(settings)
        if dist.broadcast_object(bool(tracker and tracker.run))
        else [],
    )
    if start.resume_from is not None:
        checkpointing.restore_rng(start.resume_from)  # last: nothing after this may draw random numbers
    return run


def step_batches(run: Run):
    """Yield ``((epoch, micro-batches consumed this epoch, samples consumed), micro_batches)`` for
    each optimizer step, from the run's saved position; leftover micro-batches at an epoch's end
    are dropped."""
    t, state = run.settings.train, run.state
    accum = t.grad_accum_steps
    epoch, samples = state.epoch, state.samples_in_epoch
    # Checkpoints written before batches were counted hold only samples (fixed-size batches).
    consumed = state.batches_in_epoch
    if consumed is None:
        consumed = samples // t.per_device_batch_size
    while True:
        usable = run.sampler.batches_in_epoch(epoch) // accum * accum
        if consumed >= usable:
            if usable == 0:
                raise BadDataError(f"data.train: epoch {epoch} makes no full optimizer step")
            epoch, consumed, samples = epoch + 1, 0, 0
            continue
        run.sampler.set_epoch(epoch)
        run.sampler.set_start(consumed)
        batches = iter(run.train_loader)
        while consumed < usable:
            micro = [next(batches) for _ in range(accum)]
            consumed += accum
            samples += sum(len(b["sample_index"]) for b in micro)
            yield (epoch, consumed, samples), micro
        del batches


def real_token_count(batch: dict) -> int:
    """Non-padding tokens of a batch (popping a packed batch's ``num_tokens``, which the model
    does not take)."""
    packed = batch.pop("num_tokens", None)
    return int(packed) if packed is not None else int(batch["attention_mask"].sum())


def train_step(run: Run, micro_batches: list[dict]) -> dict:
    """Forward/backward over the micro-batches, then one optimizer step.

    ``updated`` says whether the weights moved: DeepSpeed (ZeRO 1-3, fp32 and bf16) skips the
    update itself when the grad norm is NaN/inf. A NaN/inf loss with no skips left stops before
    the step; with skips left, the step runs so that DeepSpeed discards the gradients."""
    engine, step = run.engine, run.state.step + 1
    tokens = slots = samples = 0.0
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)  # read once, after the loop
    lrs = run.engine.lr_scheduler.get_last_lr()
    for i, batch in enumerate(micro_batches):
        ids = batch.pop("sample_index")
        run.hooks.on_micro_batch(step, ids)
        real_tokens = real_token_count(batch)
        batch = batch_to_device(batch, run.device, run.dtype)
        loss = run.hooks.loss(step, engine(**batch).loss)
        loss_sum += loss.detach().double()
        tokens += real_tokens
        slots += batch["input_ids"].numel()
        samples += len(ids)
        engine.backward(loss)
        if i < len(micro_batches) - 1:
            engine.step()
    # One all-reduce and one host read per optimizer step, for the loss and the counts together.
    loss_sum, n, tokens, slots, samples = dist.sum_over_ranks(
        [loss_sum], [len(micro_batches), tokens, slots, samples]
    )
    loss = loss_sum / n
    skipped_before, stop = (
        engine.skipped_steps,
        not math.isfinite(loss) and not skips_left(run.state, run.settings.train.max_nonfinite_steps),
    )
    if not stop:
        engine.step()  # the accumulation boundary: the update (and the scheduler step) happens here
    grad_norm = engine.get_global_grad_norm()
    return {
        "updated": not stop and engine.skipped_steps == skipped_before,
        "loss": loss,
        "tokens": tokens,
        "slots": slots,
        "samples": samples,
        "lr": dict(zip(run.group_names, lrs)),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
    }


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Token-weighted validation loss over the whole val split. ALL RANKS must call this."""
    if run.val_loader is None:
        return None
    run.engine.eval()
    n_tokens = 0.0
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)  # read once, after the loop
    for batch in run.val_loader:
        batch.pop("sample_index")
        batch.pop("num_tokens", None)
        n = int((batch["labels"][:, 1:] != -100).sum())  # counted on the host, before the copy
        batch = batch_to_device(batch, run.device, run.dtype)
        loss = run.engine(**batch).loss  # every rank runs the same number of forwards (ZeRO-3)
        if n:  # a batch of padding repeats only has no tokens to count (its mean loss is NaN)
            loss_sum += loss.detach().double() * n
            n_tokens += n
    run.engine.train()
    loss_sum, n_tokens = dist.sum_over_ranks([loss_sum], [n_tokens])
    val_loss = loss_sum / max(n_tokens, 1)
    record = {"step": run.state.step, "val_loss": val_loss}
    run.metrics.write(record)
    run.metrics.note(f"step {run.state.step}: val_loss {val_loss:.4f}")
    if run.tracker:
        run.tracker.log(record)
    log_token_overlays(run)
    run.history.setdefault("val_loss", []).append(val_loss)
    return val_loss


def log_token_overlays(run: Run) -> None:
    """``wandb.token_overlays``: what the model keeps of a few fixed validation images. ALL RANKS
    must call this (under ZeRO-3 the tower's forward is a collective); rank 0 logs."""
    if not run.overlay_paths:
        return
    pictures, counts = token_overlays(
        run.engine.module, run.processor.image_processor, run.settings, run.overlay_paths
    )
    if dist.is_main() and run.tracker:
        run.tracker.log_images(run.state.step, "val_tokens", pictures, counts)


def save_checkpoint(run: Run) -> None:
    path = checkpointing.save_checkpoint(
        run.engine, run.state, run.output_dir, run.nonce, run.settings.train.save_total_limit, run.record
    )
    run.metrics.note(f"step {run.state.step}: saved {path}")


def log_step(run: Run, stats: dict, window: dict) -> None:
    record = {
        "step": run.state.step,
        "epoch": run.state.epoch,
        "loss": stats["loss"],
        "lr": stats["lr"],
        "grad_norm": stats["grad_norm"],
        "step_time_s": round(window["seconds"] / window["steps"], 4),
        "elapsed_s": round(time.perf_counter() - window["started"], 1),
        "samples_per_s": window["samples"] / window["seconds"],
        "tokens_per_s": window["tokens"] / window["seconds"],
        # Token slots the model ran on that held padding (rows are padded to the longest one).
        "padding_fraction": round(1.0 - window["tokens"] / max(window["slots"], 1.0), 4),
        "visual_tokens_per_image": run.image_tokens.describe(),
        **peak_memory_record(per_rank=dist.gather_per_rank),  # a collective on GPUs: ALL RANKS log
        "nonfinite_steps": run.state.nonfinite_steps,
    }
    run.metrics.write(record)
    if run.tracker:
        run.tracker.log(record)
    run.history.setdefault("loss", []).append(stats["loss"])


def fit(run: Run, stop: preemption.StopRequest) -> None:
    t, state = run.settings.train, run.state
    batches = step_batches(run)
    began = time.perf_counter()  # elapsed_s counts from here (a resumed run: from the resume)

    def fresh_window() -> dict:
        return {"samples": 0.0, "tokens": 0.0, "slots": 0.0, "seconds": 0.0, "steps": 0, "started": began}

    window = fresh_window()
    run.engine.train()
    saved = state.step  # step 0 has nothing to lose; a resumed run's step has its checkpoint
    while state.step < state.total_steps:
        if stop.agreed():  # ALL RANKS, before every step: a signal on any rank stops them all here
            if state.step != saved:
                save_checkpoint(run)
            run.metrics.close()
            kept = f"checkpoint-{state.step} saved" if state.step else "nothing trained yet"
            raise Preempted(
                f"stopped at step {state.step}/{state.total_steps} ({stop.reason or 'on another rank'}); {kept}"
            )
        start = time.perf_counter()
        position, micro = next(batches)
        stats = train_step(run, micro)
        if not step_is_finite(stats, run.dtype):  # raises once train.max_nonfinite_steps are used up
            count_nonfinite_step(stats, state, t.max_nonfinite_steps, run.output_dir, run.metrics.note)
        state.step += 1
        state.epoch, state.batches_in_epoch, state.samples_in_epoch = position
        window = window | {k: window[k] + stats[k] for k in ("samples", "tokens", "slots")}
        window["seconds"] += time.perf_counter() - start
        window["steps"] += 1
        run.metrics.advance(stats["loss"])
        run.hooks.after_step(state.step)
        if state.step % t.logging_steps == 0 or state.step == state.total_steps or state.step == 1:
            log_step(run, stats, window)
            window = fresh_window()
        if t.eval_steps and state.step % t.eval_steps == 0 and state.step < state.total_steps:
            evaluate(run)
        if state.step % t.save_steps == 0 or state.step == state.total_steps:
            save_checkpoint(run)  # the last step too: a rerun of a finished run then has nothing to do
            saved = state.step
    run.metrics.close()
    evaluate(run)


def export(run: Run) -> dict[str, Path]:
    s = run.settings
    if not s.export.enabled:
        return {}
    paths = export_final(run.engine, s, run.spec, run.processor, run.stage, run.dtype)
    if run.tracker and s.wandb.log_artifact != "none":
        kind = s.wandb.log_artifact
        chosen = paths.get(kind) or (paths.get("model") if kind == "model" else None)
        run.tracker.log_artifact(f"{Path(s.train.output_dir).name}-{kind}", kind, [chosen] if chosen else [])
    return paths


def plot_metrics(run: Run) -> Path | None:
    """``output_dir/metrics.png`` (rank 0); a missing matplotlib or a plotting error is one line, never a failure."""
    if not dist.is_main():
        return None
    return write_run_plot(run.output_dir)


def report(
    run: Run,
    paths: dict[str, Path],
    seconds: float,
    plot: Path | None = None,
    accuracy: str | None = None,
) -> None:
    losses = run.history.get("loss", [])
    val = run.history.get("val_loss", [])
    dist.print0(f"\ndone: step {run.state.step}/{run.state.total_steps} in {seconds:.1f} s")
    if losses:
        dist.print0(f"  loss:    {losses[0]:.4f} (first logged) -> {losses[-1]:.4f} (last)")
    if val:
        dist.print0(f"  val:     {val[-1]:.4f}")
    if accuracy is not None:
        dist.print0(f"  answers: {accuracy}")
    for kind, p in paths.items():
        label = f"{kind}:"
        dist.print0(f"  {label:<8} {p}")  # a space after the label, however long ("projector:")
    dist.print0(f"  metrics: {run.metrics.path}")
    if plot is not None:
        dist.print0(f"  plot:    {plot}")
    dist.print0(f"  wandb:   {run.tracker.location if run.tracker else 'disabled'}")


def _print_rank0(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # before the process group exists
        print(line, file=sys.stderr, flush=True)


def train_and_export(run: Run, stop: preemption.StopRequest, started: float) -> int:
    """fit (unless trained before) -> export ``final/`` -> score it -> report; the exit code."""
    run.hooks.on_start(run.output_dir, dist.rank(), run.state.step)
    if run.state.step < run.state.total_steps:
        fit(run, stop)
    else:  # trained before; only final/ is missing
        run.metrics.close()
    paths = export(run)
    try:
        accuracy, failed = score_export(run.settings, paths, run.device, run.hooks), None
    except ScoringFailed as err:
        accuracy, failed = f"not scored: {err}", err
    report(run, paths, time.perf_counter() - started, plot_metrics(run), accuracy)
    if failed is None:
        return 0
    print(
        f"error: eval.generate_accuracy: could not score {paths['model']} ({failed}); the run and "
        f"its export are kept (exit {EXIT_NOT_SCORED})",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_NOT_SCORED


def main(argv=None, hooks: TrainHooks | None = None) -> int:
    """The entry point: config -> process group -> claim the folder -> :func:`setup` ->
    :func:`train_and_export`; each failure is one line and an exit code (module docstring).
    ``hooks`` lets tests observe the loop (:mod:`visionzip_core.training.hooks`)."""
    args = parse_args(argv)
    try:
        settings = load_config(find_config(args.config), args.overrides, check_files=True, warn=_print_rank0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    quiet_libraries(args.verbose)
    stop = preemption.StopRequest().install()
    preemption.watch_launcher(stop)
    device = dist.init(
        args.local_rank,
        quiet=not args.verbose,
        timeout=timedelta(minutes=settings.train.collective_timeout_min),
    )
    dist.apply_backend_settings(tf32=settings.train.tf32)
    run, lock, started, code = None, None, time.perf_counter(), 0
    try:
        lock = output_lock.claim(Path(settings.train.output_dir))
        run = setup(settings, device)
        if hooks is not None:
            run.hooks = hooks
        code = train_and_export(run, stop, started)
    except resume.RunFinished as e:
        dist.print0(str(e))
    except (resume.ResumeError, output_lock.OutputDirLocked) as e:  # the same on every rank
        dist.print0(f"error: {e}", file=sys.stderr)
        code = 2
    except (
        ConfigError,
        BadDataError,
        FileNotFoundError,
        checkpointing.CheckpointError,
        WeightsError,
        auto_batch.AutoBatchError,
    ) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except TrainingDiverged as e:
        if run is not None:
            run.metrics.close()
        dist.print0(f"error: {e}", file=sys.stderr)
        code = 3
    except Preempted as e:
        dist.print0(
            f"{e}; rerun the same command to resume (exit {preemption.EXIT_PREEMPTED})", file=sys.stderr
        )
        code = preemption.EXIT_PREEMPTED
    except OSError as e:
        if not isinstance(e, NoSpaceLeft) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if run is not None:
            run.metrics.close()
        message = (
            e.strerror if isinstance(e, NoSpaceLeft) else f"no space left writing {e.filename or 'a file'}"
        )
        dist.print0(f"error: {message}", file=sys.stderr)
        code = 74  # EX_IOERR (sysexits.h)
    finally:
        if run is not None and run.tracker is not None:
            run.tracker.finish()
        dist.shutdown(run.engine if run is not None else None)
        if lock is not None:
            lock.release()
    return code


if __name__ == "__main__":
    sys.exit(main())
