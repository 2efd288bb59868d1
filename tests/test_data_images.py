"""Image decoding: colour modes, EXIF orientation, pad vs resize with the processor's mean colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visionzip_core.data.images import ImageTransform, mean_colour, open_rgb
from visionzip_core.families.llava import clip_image_processor


@pytest.fixture(scope="module")
def proc():
    return clip_image_processor(112)


@pytest.mark.parametrize(
    "mode,make",
    [
        ("RGBA", lambda: Image.new("RGBA", (20, 10), (255, 0, 0, 255))),
        ("LA", lambda: Image.new("LA", (20, 10), (76, 255))),
        ("L", lambda: Image.new("L", (20, 10), 76)),
        ("P", lambda: Image.new("RGB", (20, 10), (255, 0, 0)).convert("P")),
        ("CMYK", lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0))),
        ("I;16", lambda: Image.fromarray(np.tile(np.arange(20, dtype=np.uint16) * 3000, (10, 1)))),
    ],
)
def test_modes_convert_to_rgb(tmp_path, mode, make):
    img = make()
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    out = open_rgb(str(path))
    assert out.mode == "RGB" and out.size == (20, 10)
    if mode in ("RGBA", "P", "CMYK"):
        assert out.getpixel((5, 5)) == (255, 0, 0)
    if mode == "I;16":  # rescaled, not clipped to white
        assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((19, 0)) == (255, 255, 255)


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    img.save(tmp_path / "t.png")
    assert open_rgb(str(tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = open_rgb(str(tmp_path / "r.jpg"))
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 2))  # red band now along the top
    assert r > 200 and b < 60


def test_pad_fills_with_processor_mean_and_resize_keeps_everything(tmp_path, proc):
    Image.new("RGB", (224, 112), (255, 0, 0)).save(tmp_path / "wide.png")
    pad = ImageTransform(proc, "pad")([str(tmp_path / "wide.png")])
    resize = ImageTransform(proc, "resize")([str(tmp_path / "wide.png")])
    assert pad.shape == resize.shape == (1, 3, 112, 112)
    # padding is the mean colour, which normalises to ~0; the centre is the red image
    assert pad[0, :, 2, 56].abs().max() < 0.02
    assert pad[0, 0, 56, 56] > 1.5
    assert mean_colour(proc) == (123, 117, 104)
    # resize stretches: red everywhere, no padding and nothing cropped
    assert (resize[0, 0] > 1.5).all()


def test_crop_is_the_processors_own_resize_and_centre_crop(tmp_path, proc):
    # left half green, right half blue: a centre crop of the 2:1 image keeps the middle only
    img = Image.new("RGB", (224, 112), (0, 255, 0))
    img.paste((0, 0, 255), (112, 0, 224, 112))
    img.save(tmp_path / "halves.png")
    crop = ImageTransform(proc, "crop")([str(tmp_path / "halves.png")])
    assert crop.shape == (1, 3, 112, 112)
    own = proc(images=[Image.open(tmp_path / "halves.png").convert("RGB")], return_tensors="pt")
    assert torch.equal(crop, own["pixel_values"])
    # no padding: the mean colour (~0 after normalisation) appears nowhere
    assert (crop[0].abs().amax(0) > 0.5).all()
