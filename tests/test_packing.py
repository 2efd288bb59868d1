"""Packing (``data.packing``) and token-budget batches (``data.batch_tokens``): packed rows change
nothing but speed (same summed loss and gradients as the samples run unpacked), resume is exact
after kill -9, and both run under ZeRO-2/ZeRO-3 with two processes.

pytest tests/test_packing.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import warm_python
from test_train_e2e import pretrain_overrides

from visionzip_core.data import DataCollator, build_dataset
from visionzip_core.data.collate import PackingCollator, pack_rows
from visionzip_core.data.sampler import TokenBudgetBatchSampler, token_budget_batches
from visionzip_core.training.config_loading import load_config
from visionzip_core.training.model_spec import resolve_model_spec
from visionzip_core.training.modeling import build_model, build_processor
from visionzip_core.training.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]


# --- rows --------------------------------------------------------------------------------------


def _first_fit_decreasing(lengths, capacity):
    loads = []
    for n in sorted(lengths, reverse=True):
        for r, load in enumerate(loads):
            if load + n <= capacity:
                loads[r] += n
                break
        else:
            loads.append(n)
    return loads


@pytest.mark.parametrize("seed", range(20))
def test_pack_rows_places_every_sample_once_in_as_few_rows_as_first_fit_and_evens_them(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(200, 600))
    lengths = rng.integers(20, capacity + 1, size=int(rng.integers(1, 40))).tolist()
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert max(loads) <= capacity
    ffd = _first_fit_decreasing(lengths, capacity)
    assert len(rows) <= len(ffd)
    assert max(loads) <= max(ffd)  # padded to the longest row: never worse than plain first-fit
    assert all(row == sorted(row) for row in rows)
    assert pack_rows(lengths, capacity) == rows


def test_pack_rows_balances_where_first_fit_would_not():
    # FFD: [100, 100] and [50, 50]; the longest row is 200. Balanced: 150 and 150.
    rows = pack_rows([100, 100, 50, 50], 200)
    assert sorted(sum([100, 100, 50, 50][i] for i in row) for row in rows) == [150, 150]


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="300 tokens does not fit a row of 256"):
        pack_rows([10, 300], 256)


def _item(n, image=None, first=1):
    ids = torch.arange(first, first + n)
    item = {"input_ids": ids, "labels": ids.clone()}
    if image is not None:
        item["pixel_values"] = torch.full((1, 3, 2, 2), float(image))
    return item


def test_packing_collator_restarts_positions_ignores_first_labels_and_orders_images():
    items = [_item(5, image=0, first=10), _item(3, image=1, first=20), _item(4, first=30), _item(6, image=3)]
    batch = PackingCollator(pad_token_id=0, max_tokens_per_row=9)(items)
    assert "attention_mask" not in batch and int(batch["num_tokens"]) == 18
    rows = pack_rows([5, 3, 4, 6], 9)
    assert batch["input_ids"].shape == (len(rows), max(sum([5, 3, 4, 6][i] for i in r) for r in rows))
    images = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(items[i]["input_ids"])
            assert batch["input_ids"][r, at : at + n].tolist() == items[i]["input_ids"].tolist()
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            assert batch["labels"][r, at] == -100
            assert batch["labels"][r, at + 1 : at + n].tolist() == items[i]["labels"][1:].tolist()
            if "pixel_values" in items[i]:
                images.append(int(items[i]["pixel_values"][0, 0, 0, 0]))
            at += n
        assert (batch["labels"][r, at:] == -100).all() and (batch["input_ids"][r, at:] == 0).all()
        assert batch["position_ids"][r, at:].tolist() == list(range(batch["input_ids"].shape[1] - at))
    assert batch["pixel_values"][:, 0, 0, 0].long().tolist() == images


# --- token budgets -----------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_batches_fit_the_budget_cover_the_epoch_and_depend_only_on_seed(packed):
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 300, size=500) * np.where(rng.random(500) < 0.1, -1, 1)
    batches = token_budget_batches(lengths, 1024, packed, num_replicas=2, seed=3, epoch=1)
    size = np.abs(lengths)
    for b in batches:
        cost = size[b].sum() if packed else size[b].max() * len(b)
        assert cost <= 1024
        assert len({bool(lengths[i] > 0) for i in b}) == 1  # one modality per micro-batch
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen.tolist()))
    assert len(batches) % 2 == 0 and len(seen) > 0.95 * len(lengths)
    again = token_budget_batches(lengths, 1024, packed, num_replicas=2, seed=3, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = token_budget_batches(lengths, 1024, packed, num_replicas=2, seed=3, epoch=2)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_shorter_samples_make_bigger_micro_batches():
    long_ = token_budget_batches(np.full(400, 700), 4096, True, 1, seed=0, epoch=0)
    short = token_budget_batches(np.full(400, 200), 4096, True, 1, seed=0, epoch=0)
    assert len(long_[0]) == 5 and len(short[0]) == 20


def test_token_budget_sampler_shards_ranks_evenly_and_resumes_mid_epoch():
    lengths = np.random.default_rng(1).integers(50, 250, size=300)
    ranks = [TokenBudgetBatchSampler(lengths, 800, True, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == ranks[0].batches_in_epoch(1)
    assert not set(sum(a, [])) & set(sum(b, []))
    ranks[0].set_start(4)
    assert list(ranks[0]) == a[4:]


# --- packed == unpacked ------------------------------------------------------------------------


def _model_and_items(model_dir, overrides=(), n=7):
    """``(model, n encoded samples, pad id)`` of the demo config with packing on; ``model_dir`` None
    leaves the model to ``overrides`` (stage 1's two folders)."""
    model = [] if model_dir is None else [f"model.name_or_path={model_dir}"]
    settings = load_config(REPO / "configs/demo.yaml", [*model, "data.packing=true", *overrides])
    spec = resolve_model_spec(settings)
    processor, image_tokens = build_processor(settings, spec)
    dataset = build_dataset(
        settings.data.resolve_paths(REPO),
        "train",
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
        image_tokens_per_image=image_tokens,
        image_layout=spec.family.image_layout(processor.image_processor),
    )
    torch.manual_seed(0)
    model = build_model(settings, spec, torch.float32, processor).train()
    return model, [dataset[i] for i in range(n)], processor.tokenizer.pad_token_id


def _summed_loss_and_grads(model, batch):
    batch = {k: v for k, v in batch.items() if k != "num_tokens"}
    model.zero_grad(set_to_none=True)
    n = (batch["labels"][:, 1:] != -100).sum()
    summed = model(**batch).loss * n
    summed.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return summed.detach(), int(n), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("visionzip", [True, False])
def test_packed_batch_has_the_unpacked_summed_loss_and_gradients(tiny_llava_dir, attn, visionzip):
    model, items, pad = _model_and_items(tiny_llava_dir, [f"visionzip.enabled={str(visionzip).lower()}"])
    model.model.language_model.set_attn_implementation(attn)
    assert model.model.language_model.config._attn_implementation == attn
    lengths = [len(i["input_ids"]) for i in items]
    row = sum(sorted(lengths)[-3:])  # about three samples a row, so rows hold several
    packed = PackingCollator(pad_token_id=pad, max_tokens_per_row=row)(items)
    assert packed["input_ids"].shape[0] < len(items)
    unpacked = DataCollator(pad_token_id=pad)(items)
    loss_u, n_u, grads_u = _summed_loss_and_grads(model, unpacked)
    loss_p, n_p, grads_p = _summed_loss_and_grads(model, packed)
    assert n_u == n_p
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    assert grads_u.keys() == grads_p.keys() and len(grads_u) > 10
    for k in grads_u:
        torch.testing.assert_close(grads_p[k], grads_u[k], rtol=1e-5, atol=1e-5, msg=k)
    # The one-row layout flash-attention needs holds the same samples: under SDPA/eager, same loss.
    flat = PackingCollator(pad_token_id=pad, max_tokens_per_row=row, one_row=True)(items)
    assert flat["input_ids"].shape == (1, sum(lengths))
    loss_f, n_f, grads_f = _summed_loss_and_grads(model, flat)
    assert n_f == n_u
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-5)
    for k in grads_u:
        torch.testing.assert_close(grads_f[k], grads_u[k], rtol=1e-5, atol=1e-5, msg=k)
    # The test can fail: the same rows read as one long sequence each give another loss.
    crossed = {k: v for k, v in packed.items() if k not in ("position_ids", "num_tokens")}
    crossed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    loss_x, _, _ = _summed_loss_and_grads(model, crossed)
    assert abs(float(loss_x - loss_u)) > 1e-3


def test_packed_next_batch_has_the_unpacked_summed_loss(tiny_llava_next_dir):
    model, items, pad = _model_and_items(
        tiny_llava_next_dir, ["data.image_aspect_ratio=anyres", "data.model_max_length=1024"], n=5
    )
    lengths = [len(i["input_ids"]) for i in items]
    packed = PackingCollator(pad_token_id=pad, max_tokens_per_row=sum(sorted(lengths)[-2:]))(items)
    assert packed["input_ids"].shape[0] < len(items)
    loss_u, _, grads_u = _summed_loss_and_grads(model, DataCollator(pad_token_id=pad)(items))
    loss_p, _, grads_p = _summed_loss_and_grads(model, packed)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for k in grads_u:
        torch.testing.assert_close(grads_p[k], grads_u[k], rtol=1e-5, atol=1e-5, msg=k)


def test_packed_onevision_batch_has_the_unpacked_summed_loss(tiny_llava_onevision_dir):
    """LLaVA-OneVision's Qwen2 LLM takes 1-D positions: packed rows (positions restarting per
    sample) give the unpacked loss and gradients, and reading each row as one sequence does not."""
    model, items, pad = _model_and_items(
        tiny_llava_onevision_dir,
        ["data.template=chat_template", "data.image_aspect_ratio=anyres", "data.model_max_length=1024"],
        n=5,
    )
    lengths = [len(i["input_ids"]) for i in items]
    packed = PackingCollator(pad_token_id=pad, max_tokens_per_row=sum(sorted(lengths)[-2:]))(items)
    assert packed["input_ids"].shape[0] < len(items)
    loss_u, _, grads_u = _summed_loss_and_grads(model, DataCollator(pad_token_id=pad)(items))
    loss_p, _, grads_p = _summed_loss_and_grads(model, packed)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    assert len(grads_u) > 10
    for k in grads_u:
        torch.testing.assert_close(grads_p[k], grads_u[k], rtol=1e-5, atol=1e-5, msg=k)
    crossed = {k: v for k, v in packed.items() if k not in ("position_ids", "num_tokens")}
    crossed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    loss_x, _, _ = _summed_loss_and_grads(model, crossed)
    assert abs(float(loss_x - loss_u)) > 1e-3


# --- config ------------------------------------------------------------------------------------


def test_packing_keys_that_contradict_are_all_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(
            REPO / "configs/demo.yaml",
            ["data.max_tokens_per_row=512", "data.batch_tokens=100", "data.model_max_length=256"],
        )
    text = str(err.value)
    assert "data.max_tokens_per_row: only used with data.packing=true" in text
    assert "data.batch_tokens: 100 is below data.model_max_length (256)" in text
    with pytest.raises(ConfigError, match="data.max_tokens_per_row: 128 is below data.model_max_length"):
        load_config(REPO / "configs/demo.yaml", ["data.packing=true", "data.max_tokens_per_row=128"])


# --- the entry point ---------------------------------------------------------------------------

PACKED = ["data.packing=true", "data.max_tokens_per_row=512", "data.batch_tokens=1024"]


@pytest.mark.slow
def test_packed_token_budget_run_logs_padding_and_resumes_exactly_after_sigkill(tiny_llava_dir, tmp_path):
    from test_train_e2e import _cmd, _env, final_weights, metrics, train

    def args(out):
        return [
            f"model.name_or_path={tiny_llava_dir}",
            f"train.output_dir={out}",
            "eval.generate_accuracy=false",  # scoring the export is test_train_e2e.py's
            *PACKED,
        ]

    common = ["train.max_steps=6", "train.save_steps=3", "train.logging_steps=1", "debug.log_samples=true"]
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    proc = train(args(unbroken) + common)
    assert "micro-batch <= 1024 tokens" in proc.stdout
    records = [r for r in metrics(unbroken) if "loss" in r]
    assert all(0 <= r["padding_fraction"] < 0.2 for r in records)
    # The budget sets the count: 1024 tokens hold about ten of the demo's ~90-token samples.
    steps = [line for line in (unbroken / "debug/samples-rank0.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and all(line.count(",") >= 8 for line in steps)
    cmd = _cmd(
        "python", args(killed) + common + [f"debug.hold_until={tmp_path / 'never'}", "debug.hold_from_step=4"]
    )
    victim = warm_python.popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not (killed / "checkpoint-3" / "COMPLETE").is_file():
        assert victim.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = train(args(killed) + common)
    assert f"resumed from {killed}/checkpoint-3" in resumed.stdout
    a, b = final_weights(unbroken), final_weights(killed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert (unbroken / "debug/samples-rank0.jsonl").read_text() == (
        killed / "debug/samples-rank0.jsonl"
    ).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_packed_runs_with_two_processes_under_zero(tiny_llava_dir, tmp_path, zero):
    from test_train_e2e import metrics, train

    out = tmp_path / zero
    train(
        [
            f"model.name_or_path={tiny_llava_dir}",
            f"train.output_dir={out}",
            f"deepspeed.config=configs/deepspeed/{zero}.json",
            "train.max_steps=3",
            "train.logging_steps=1",
            "eval.generate_accuracy=false",
            *PACKED,
        ],
        launcher="ranks2",
    )
    records = [r for r in metrics(out) if "loss" in r]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert (out / "final" / "model.safetensors").is_file()


def _pretrain_overrides(tiny_pretrain_dirs):
    return pretrain_overrides(
        *tiny_pretrain_dirs, val="[{path: data/demo/pretrain_val.json, image_folder: data/demo/images}]"
    )


def test_packed_pretrain_batch_has_the_unpacked_summed_loss(tiny_pretrain_dirs):
    """Stage 1 assembles LLaVA from two folders: the language model keeps its own config, and a
    cache left on there makes transformers skip reading packed bounds from position_ids."""
    model, items, pad = _model_and_items(None, _pretrain_overrides(tiny_pretrain_dirs), n=6)
    assert not any(getattr(m.config, "use_cache", False) for m in model.modules() if hasattr(m, "config")), (
        "a module of the assembled model would build a KV cache in training"
    )
    lengths = [len(i["input_ids"]) for i in items]
    packed = PackingCollator(pad_token_id=pad, max_tokens_per_row=sum(sorted(lengths)[-3:]))(items)
    assert packed["input_ids"].shape[0] < len(items)
    loss_u, n_u, grads_u = _summed_loss_and_grads(model, DataCollator(pad_token_id=pad)(items))
    loss_p, n_p, grads_p = _summed_loss_and_grads(model, packed)
    assert n_u == n_p
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for k in grads_u:
        torch.testing.assert_close(grads_p[k], grads_u[k], rtol=1e-5, atol=1e-5, msg=k)


# --- what transformers recognises as packed, per attention implementation ----------------------


def _nameable_attn_implementations():
    import typing

    from visionzip_core.training.schema import ModelSettings

    annotation = ModelSettings.model_fields["attn_implementation"].annotation  # Literal[...] | None
    names = [a for arm in typing.get_args(annotation) for a in (typing.get_args(arm) or [arm])]
    return [None if a is type(None) else a for a in names]


@pytest.mark.parametrize("attn", _nameable_attn_implementations())
def test_packed_batches_are_recognised_as_packed_by_transformers_for_every_attention(attn):
    """transformers reads packed samples' bounds from position_ids: SDPA and eager in any row
    (``find_packed_sequence_indices``), flash-attention only from a one-row batch
    (``_is_packed_sequence``). Several rows under flash-attention would attend across samples."""
    from types import SimpleNamespace

    from transformers.masking_utils import find_packed_sequence_indices
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    from visionzip_core.training.config_rules import PACKED_LAYOUT, packing_problem
    from visionzip_core.training.dataloaders import make_collator

    assert packing_problem(attn) is None and attn in PACKED_LAYOUT
    lengths = [9, 5, 7, 3, 6, 8]
    items = [
        {"input_ids": torch.full((n,), 10 + i), "labels": torch.full((n,), 10 + i)}
        for i, n in enumerate(lengths)
    ]
    data = SimpleNamespace(packing=True, row_tokens=16)
    batch = make_collator(data, pad_token_id=0, attn_implementation=attn)(items)
    ids, positions = batch["input_ids"], batch["position_ids"]
    if attn is not None and attn.startswith("flash_attention"):
        assert ids.shape[0] == 1
        assert bool(_is_packed_sequence(positions, batch_size=ids.shape[0]))
        (cu_seq_lens, _), _ = prepare_fa_kwargs_from_position_ids(positions)
        # Each varlen segment is one sample, whole: the sample ids are constant inside each.
        bounds = cu_seq_lens.tolist()
        segments = [ids[0, a:b].unique().tolist() for a, b in zip(bounds, bounds[1:])]
        assert sorted(len(ids[0, a:b]) for a, b in zip(bounds, bounds[1:])) == sorted(lengths)
        assert all(len(s) == 1 for s in segments)
    else:
        assert ids.shape[0] > 1  # rows of at most 16 tokens
        segment = find_packed_sequence_indices(positions)
        assert segment is not None
        for r in range(ids.shape[0]):
            for s in segment[r].unique():
                held = ids[r][segment[r] == s].unique()
                assert len(held) == 1  # one sample (or the trailing padding) per segment
        real = ids[ids != 0]
        assert sorted(real.bincount()[10:].tolist()) == sorted(lengths)


def test_packing_with_an_unchecked_attention_is_refused_in_one_line():
    from visionzip_core.training.config_rules import packing_problem

    problem = packing_problem("flex_attention")
    assert problem is not None and "\n" not in problem
    assert problem.startswith("data.packing:") and "model.attn_implementation=flex_attention" in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusal")
def test_flash_attention_without_cuda_is_refused_in_one_line_before_weights_load():
    with pytest.raises(ConfigError) as err:
        load_config(
            REPO / "configs/demo.yaml", ["data.packing=true", "model.attn_implementation=flash_attention_2"]
        )
    lines = [line for line in str(err.value).splitlines() if "attn_implementation" in line]
    assert len(lines) == 1 and "flash_attention_2 needs a CUDA GPU" in lines[0]
