"""wandb at each evaluation: the kept-token overlay of a few fixed validation images and the budget.

pytest -m slow tests/test_wandb_overlays.py      # ~40 s on 2 cores (offline wandb, no network)
"""

from __future__ import annotations

import re

import pytest
from PIL import Image
from test_train_e2e import REPO

from visionzip_core.training.config_loading import load_config
from visionzip_core.training.overlays import overlay_image_paths


def test_overlay_images_are_the_first_validation_images_and_one_key_turns_them_off():
    val = "data.val=[{path: data/demo/instruct_val.json, image_folder: data/demo/images}]"
    on = overlay_image_paths(load_config(REPO / "configs/demo.yaml", [val, "wandb.token_overlays=3"]))
    assert len(on) == 3 and len(set(on)) == 3 and all(p.is_file() for p in on)
    assert on == overlay_image_paths(load_config(REPO / "configs/demo.yaml", [val, "wandb.token_overlays=3"]))
    assert overlay_image_paths(load_config(REPO / "configs/demo.yaml", [val, "wandb.token_overlays=0"])) == []


@pytest.mark.slow
def test_offline_run_logs_the_overlays_and_token_counts_at_each_evaluation(wandb_offline_run):
    out, _ = wandb_offline_run  # 2 steps, validated after each, 2 overlays (shared with test_train_e2e.py)
    [run] = list((out / "wandb").glob("offline-run-*"))
    images = sorted((run / "files/media/images").glob("val_tokens_*.png"))
    assert len(images) == 2 * 2  # two images at each of two evaluations
    with Image.open(images[0]) as picture:
        assert picture.width >= 448  # the drawn overlay, not a thumbnail of the input
    logged = _history_values(next(run.glob("*.wandb")).read_bytes())
    # Each evaluation's values (the file holds them as history and as summary updates).
    assert set(logged["val_tokens/kept_per_image"]) == {"16"}  # the demo's 12 dominant + 4 contextual
    assert set(logged["val_tokens/tower_per_crop"]) == {"64"} and set(logged["val_tokens/dominant"]) == {"12"}
    assert len(logged["val_tokens/kept_per_image"]) >= 2


def _history_values(data: bytes) -> dict[str, list[str]]:
    """``{key: [value_json, ...]}`` of the history items in a run's ``.wandb`` file.

    Offline runs write no summary file; each item there is a protobuf message whose ``key``
    (field 2) is followed by its ``value_json`` (field 16, tag bytes 0x82 0x01).
    """
    found: dict[str, list[str]] = {}
    for m in re.finditer(rb"\x12(.)(val_tokens/[a-z_]+)\x82\x01(.)", data, re.S):
        if m.group(1)[0] != len(m.group(2)):
            continue
        start = m.end()
        found.setdefault(m.group(2).decode(), []).append(data[start : start + m.group(3)[0]].decode())
    return found
