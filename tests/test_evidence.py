"""Evidence you can see: the token overlay (scripts/show_tokens.py) and the metrics plot
(visionzip_core/training/plots.py, scripts/plot_metrics.py).

The overlay test rebuilds, from nothing but the drawn map, the tokens the model's own forward
feeds its projector: the dominant patches must be exactly the gathered tokens and every
contextual group exactly the tokens merged into its contextual token.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from visionzip_core import visionzip, visionzip_processor
from visionzip_core.algorithm import DOMINANT, DROPPED
from visionzip_core.data.images import mean_colour, open_rgb, pad_to_square
from visionzip_core.families import family_for
from visionzip_core.token_overlay import budget_line, select_image, token_map
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
