"""Evidence you can see: the token overlay (scripts/show_tokens.py) and the metrics plot
(visionzip_core/training/plots.py, scripts/plot_metrics.py).

The overlay test rebuilds, from nothing but the drawn map, the tokens the model's own forward
feeds its projector: the dominant patches must be exactly the gathered tokens and every
contextual group exactly the tokens merged into its contextual token.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from visionzip_core import visionzip, visionzip_processor
from visionzip_core.algorithm import DOMINANT, DROPPED
from visionzip_core.config import read_visionzip_config
from visionzip_core.data.images import mean_colour, open_rgb, pad_to_square
from visionzip_core.families import family_for
from visionzip_core.token_overlay import (
    budget_line,
    select_image,
    select_video_group,
    selection_line,
    token_map,
)
from visionzip_core.training import plots

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "data/demo/images/val_0000.png"  # 129 x 184: padding and tiling both matter


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _forward_tokens(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, projector_input)`` of the model's own forward: the feature layer's output
    ``(crops, N, C)`` and what the projector received ``(crops, D + K, C)``."""
    inner = model.model
    tower = inner.vision_tower
    layer = model.config.vision_feature_layer
    index = layer if layer >= 0 else len(tower.encoder.layers) + 1 + layer
    seen = {}

    def keep_hidden(_m, _i, out):
        seen["hidden"] = out[0] if isinstance(out, tuple) else out

    def keep_projector_input(_m, args):
        seen["projected"] = args[0]

    handles = [
        tower.encoder.layers[index - 1].register_forward_hook(keep_hidden),
        inner.multi_modal_projector.register_forward_pre_hook(keep_projector_input),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen["hidden"], seen["projected"]


def _expected_from_map(tokens, hidden: torch.Tensor, merge: str) -> torch.Tensor:
    """The projector input the map describes, per crop: CLS and dominant patches in raster order,
    then per group its target plus the mean of the other patches in it (paper) or the group's mean."""
    crops = []
    for c in range(tokens.n_crops):
        codes = tokens.patches[c].flatten()
        dominant = ([0] if tokens.cls[c] == DOMINANT else []) + [
            int(p) + 1 for p in (codes == DOMINANT).nonzero().flatten()
        ]
        rows = [hidden[c, dominant]]
        for k, target in enumerate(tokens.targets[c].tolist()):
            assert codes[target] == k, "a target must be shaded in its own group"
            members = [int(p) + 1 for p in (codes == k).nonzero().flatten() if p != target]
            merged = hidden[c, members].sum(0) if members else torch.zeros_like(hidden[c, 0])
            if merge == "paper":
                rows.append((hidden[c, target + 1] + merged / max(len(members), 1))[None])
            else:
                rows.append(((hidden[c, target + 1] + merged) / (len(members) + 1))[None])
        crops.append(torch.cat(rows))
    return torch.stack(crops)


@pytest.mark.parametrize(
    "split",
    [
        dict(dominant=12, contextual=4),  # the demo's
        dict(dominant=20, contextual=7, keep_cls=False, merge="mean"),  # CLS dropped
        dict(dominant=9, contextual=0),  # the rest discarded
    ],
    ids=["demo", "no-cls-mean", "no-contextual"],
)
def test_overlay_marks_exactly_the_tokens_the_model_compresses(tiny_llava_dir, split):
    family = family_for("llava")
    model = visionzip(family.load(str(tiny_llava_dir)).eval(), **split)
    processor = visionzip_processor(family.load_processor(str(tiny_llava_dir)), model.config)
    image = select_image(model, processor.image_processor, str(IMAGE), "pad")
    tokens = token_map(image)

    # The model's own forward on the image as its processor prepares it (padded, as the demo trains).
    padded = pad_to_square(open_rgb(str(IMAGE)), mean_colour(processor.image_processor))
    inputs = processor(images=[padded], text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt")
    assert torch.equal(image.crops, inputs["pixel_values"]), "the overlay must show what the tower sees"
    hidden, projected = _forward_tokens(model, inputs)

    vz = model.config.visionzip
    assert projected.shape[1] == vz["dominant"] + vz["contextual"]
    assert tokens.patches.shape == (1, 8, 8) and tokens.targets.shape == (1, vz["contextual"])
    assert int((tokens.patches == DOMINANT).sum()) == vz["dominant"] - int(vz["keep_cls"])
    if vz["contextual"] == 0:
        assert int((tokens.patches == DROPPED).sum()) == 64 - vz["dominant"] + 1
    torch.testing.assert_close(
        _expected_from_map(tokens, hidden, vz["merge"]), projected, atol=1e-5, rtol=1e-5
    )


def test_llava_next_overlay_is_per_crop_and_matches_its_forward(tiny_llava_next_dir):
    family = family_for("llava_next")
    model = visionzip(family.load(str(tiny_llava_next_dir)).eval(), dominant=12, contextual=4)
    processor = visionzip_processor(family.load_processor(str(tiny_llava_next_dir)), model.config)
    image = select_image(model, processor.image_processor, str(IMAGE), "anyres")
    tokens = token_map(image)

    inputs = processor(
        images=[open_rgb(str(IMAGE))], text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt"
    )
    rows, cols = tokens.grid
    assert tokens.n_crops == 1 + rows * cols > 1
    assert torch.equal(image.crops, inputs["pixel_values"][0, : tokens.n_crops])
    hidden, projected = _forward_tokens(model, inputs)
    torch.testing.assert_close(_expected_from_map(tokens, hidden, "paper"), projected, atol=1e-5, rtol=1e-5)


def _qwen_llm_inputs(model, inputs, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged, fed)`` of the Qwen model's own forward: the merger's uncompressed outputs
    ``(N, H)`` and the embeddings its language model received on the ``token_id`` run ``(n_kept, H)``."""
    inner = model.model
    seen = {}

    def keep_merged(_m, _i, out):
        seen["merged"] = out.pooler_output  # raster order (Qwen2.5-VL's merger runs in window order)

    def keep_llm_input(_m, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handles = [
        inner.visual.register_forward_hook(keep_merged),
        inner.language_model.register_forward_pre_hook(keep_llm_input, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen["merged"], seen["embeds"][inputs["input_ids"] == token_id]


def _qwen_expected_from_map(tokens, merged: torch.Tensor) -> torch.Tensor:
    """What the map says the LLM gets: merged tokens in raster order, a dominant unit as itself, a
    contextual target as itself plus the mean of the other units shaded in its group (paper merge),
    every other unit nothing."""
    codes = tokens.patches[0].flatten()
    targets = tokens.targets[0].tolist()
    rows = []
    for p, code in enumerate(codes.tolist()):
        if code == DOMINANT:
            rows.append(merged[p])
        elif p in targets:
            assert code == targets.index(p), "a target must be shaded in its own group"
            members = [int(q) for q in (codes == code).nonzero().flatten() if q != p]
            rows.append(merged[p] + (merged[members].mean(0) if members else 0))
    return torch.stack(rows)


def _qwen_prompt(processor, kind: str) -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "What?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("variant", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_overlay_marks_exactly_the_merge_units_the_model_feeds_its_llm(variant, request):
    folder = request.getfixturevalue(f"tiny_{variant}_dir")
    family = family_for(variant)
    model = visionzip(family.load(str(folder)).eval(), dominant_ratio=0.3, contextual_ratio=0.1)
    processor = visionzip_processor(family.load_processor(str(folder)), model.config)
    image = select_image(model, processor.image_processor, str(IMAGE), "native")
    tokens = token_map(image)

    inputs = processor(
        images=[open_rgb(str(IMAGE))], text=_qwen_prompt(processor, "image"), return_tensors="pt"
    )
    _, h, w = inputs["image_grid_thw"][0].tolist()
    merge, patch = processor.image_processor.merge_size, processor.image_processor.patch_size
    assert tokens.cls is None and tokens.patches.shape == (1, h // merge, w // merge)
    # The picture is the image as the processor resized it (normalised), not a re-derivation.
    resized = open_rgb(str(IMAGE)).resize((w * patch, h * patch), Image.Resampling.BICUBIC)
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    pixels = (torch.tensor(list(resized.getdata())).T.reshape(3, h * patch, w * patch) / 255 - mean) / std
    torch.testing.assert_close(image.crops[0], pixels, atol=1e-4, rtol=1e-4)

    merged, fed = _qwen_llm_inputs(model, inputs, model.config.image_token_id)
    n = (h // merge) * (w // merge)
    assert fed.shape[0] == int(0.3 * n) + int(0.1 * n) < n
    torch.testing.assert_close(_qwen_expected_from_map(tokens, merged), fed, atol=1e-5, rtol=1e-5)


def test_qwen_video_overlay_is_one_frame_group_as_the_model_compresses_it(tiny_qwen2_5_vl_dir, tmp_path):
    family = family_for("qwen2_5_vl")
    model = visionzip(family.load(str(tiny_qwen2_5_vl_dir)).eval(), dominant=5, contextual=2)
    processor = visionzip_processor(family.load_processor(str(tiny_qwen2_5_vl_dir)), model.config)
    frames = []
    for i in range(4):  # two frame groups whose pictures differ
        path = tmp_path / f"f{i}.png"
        img = Image.new("RGB", (112, 84), "white")
        img.paste((200, 30 + 50 * i, 30), (10 * i, 10, 10 * i + 40, 60))
        img.save(path)
        frames.append(str(path))
    groups = [select_video_group(model, processor, frames, g) for g in (0, 1)]
    with pytest.raises(ValueError, match="frame group 2"):
        select_video_group(model, processor, frames, 2)
    assert not torch.equal(groups[0].crops, groups[1].crops)

    inputs = processor(
        videos=[[open_rgb(f) for f in frames]], text=_qwen_prompt(processor, "video"), return_tensors="pt"
    )
    merged, fed = _qwen_llm_inputs(model, inputs, model.config.video_token_id)
    n = merged.shape[0] // 2
    assert fed.shape[0] == 2 * 7
    for g, image in enumerate(groups):
        expected = _qwen_expected_from_map(token_map(image), merged[g * n : (g + 1) * n])
        torch.testing.assert_close(expected, fed[g * 7 : (g + 1) * 7], atol=1e-5, rtol=1e-5)


def test_budget_line():
    from visionzip_core import VisionZipConfig

    assert budget_line(VisionZipConfig(dominant=12, contextual=4), 65, 1) == (
        "12 dominant (CLS + 11 patches) + 4 contextual = 16 of 64+1"
    )
    assert budget_line(VisionZipConfig(dominant=12, contextual=4), 65, 5).endswith("; 5 crops = 80 tokens")


def test_show_tokens_writes_the_png_with_recorded_or_given_settings(tiny_llava_dir, tmp_path, capsys):
    show = _script("show_tokens")
    out = tmp_path / "tokens.png"
    args = ["--model", str(tiny_llava_dir), "--image", str(IMAGE), "--out", str(out)]
    assert show.main([*args, "--dominant", "12", "--contextual", "4", "--aspect-ratio", "pad"]) == 0
    assert "12 dominant (CLS + 11 patches) + 4 contextual = 16 of 64+1" in capsys.readouterr().out
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width >= 448

    # An export records its split: no flags needed.
    family = family_for("llava")
    export = tmp_path / "final"
    visionzip(family.load(str(tiny_llava_dir)), dominant=9, contextual=3).save_pretrained(export)
    family.load_processor(str(tiny_llava_dir)).save_pretrained(export)
    assert show.main(["--model", str(export), "--image", str(IMAGE), "--out", str(tmp_path / "e.png")]) == 0
    assert "9 dominant (CLS + 8 patches) + 3 contextual = 12 of 64+1" in capsys.readouterr().out


def test_show_tokens_bad_input_is_one_line_naming_the_path(tiny_llava_dir, tmp_path, capsys):
    show = _script("show_tokens")
    out = str(tmp_path / "x.png")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    cases = [
        (["--model", str(tiny_llava_dir), "--image", str(tmp_path / "missing.png")], "missing.png"),
        (["--model", str(tmp_path), "--image", str(IMAGE)], str(tmp_path)),  # a folder, not a model
        (["--model", str(tmp_path / "nowhere"), "--image", str(IMAGE)], "nowhere"),
        (["--model", str(tiny_llava_dir), "--image", str(not_an_image)], str(not_an_image)),
        (["--model", str(tiny_llava_dir), "--image", str(IMAGE), "--aspect-ratio", "anyres"], "anyres"),
    ]
    for argv, named in cases:
        assert show.main([*argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err, err
    assert not Path(out).exists()


# --- metrics plot ---------------------------------------------------------------------------------


def _write_run(folder: Path, scale: float = 1.0) -> Path:
    folder.mkdir(parents=True)
    records = []
    for step in range(1, 11):
        lr = {"projector": 1e-3 * step / 10, "llm": 2e-4 * step / 10}
        records.append({"step": step, "loss": scale * 3.0 / step, "lr": lr, "grad_norm": 1.0})
        if step % 5 == 0:
            records.append({"step": step, "val_loss": scale * 3.5 / step})
    records.append({"step": 11, "loss": "nan", "lr": lr})  # a non-finite step, stored as a string
    lines = [json.dumps(r) for r in records]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 12, "lo')  # torn by a kill
    return folder


def test_run_plot_is_written_from_metrics_jsonl(tmp_path):
    run = _write_run(tmp_path / "run")
    assert plots.series(plots.read_metrics(run), "lr")["projector"][0] == list(range(1, 12))
    path = plots.write_run_plot(run)
    assert path == run / "metrics.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
    assert path.stat().st_size < 200_000


def test_run_plot_never_fails_the_run(tmp_path, monkeypatch):
    notes = []
    run = _write_run(tmp_path / "run")
    monkeypatch.setattr(plots, "plot_runs", lambda *a, **k: 1 / 0)
    assert plots.write_run_plot(run, notes.append) is None
    assert len(notes) == 1 and notes[0].startswith("warning: metrics.png not written (ZeroDivisionError")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # not installed
    assert plots.write_run_plot(run, notes.append) is None
    assert (
        notes[1] == "metrics.png skipped: matplotlib is not installed (pip install 'visionzip-core[bench]')"
    )
    assert not (run / "metrics.png").exists()


def test_plot_metrics_compares_runs_and_names_a_missing_folder(tmp_path, capsys):
    plot_metrics = _script("plot_metrics")
    a, b = _write_run(tmp_path / "a" / "run"), _write_run(tmp_path / "b" / "run", 0.5)
    c = _write_run(tmp_path / "lr-half", 0.8)
    out = tmp_path / "compare.png"
    assert plot_metrics.main([str(a), str(b), str(c), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{a}, {b}, lr-half" in printed  # same folder names: told apart by path
    with Image.open(out) as png:
        assert png.format == "PNG"

    empty = tmp_path / "empty"
    empty.mkdir()
    for missing, why in ((tmp_path / "nope", "no such folder"), (empty, "no metrics.jsonl")):
        assert plot_metrics.main([str(a), str(missing), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {missing}: {why} (expected a train.output_dir)"
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("family", "split", "expected"),
    [
        # SigLIP, no CLS: 8 x 8 patches per crop, the image tiled into several crops.
        (
            "llava-onevision",
            dict(dominant=12, contextual=4),
            r"^per crop: 12 dominant \+ 4 contextual = 16 of 64 patches \(8 x 8, rows x cols\); \d+ crops = \d+ tokens$",
        ),
        # Qwen: the merger's outputs, one per 2 x 2 patches, one crop.
        (
            "qwen2.5-vl",
            dict(dominant_ratio=0.3, contextual_ratio=0.1),
            r"^\d+ dominant \+ \d+ contextual = \d+ of \d+ merged tokens \(\d+ x \d+, rows x cols\), ratios 0.3 \+ 0.1$",
        ),
    ],
)
def test_selection_line_speaks_the_family_s_unit(family, split, expected, family_dirs):
    """``show_tokens``' summary names what the family selects from (``selected_tokens``) and counts a
    tiled image per crop, on the model's own selection."""
    fam = family_for(family)
    folder = str(family_dirs[family])
    model = visionzip(fam.load(folder).eval(), **split)
    processor = visionzip_processor(fam.load_processor(folder), model.config)
    image = select_image(model, processor.image_processor, str(IMAGE), fam.inference_aspect_ratio)
    vz = read_visionzip_config(model.config)
    line = selection_line(vz, image, fam.tower_tokens(model.config), fam.selected_tokens)
    assert re.match(expected, line), line
