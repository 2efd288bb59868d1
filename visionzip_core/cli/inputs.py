"""What a command is shown besides the model: image files, videos as frame lists, the system
prompt. Each is checked from file headers only, before any weights load, and refused in one line
naming the flag and the file (:class:`~visionzip_core.cli.open_model.CommandError`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from visionzip_core.cli.open_model import CommandError


def add_system_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system",
        default=None,
        help="system prompt (default: the family's own, e.g. vicuna's for LLaVA; '' for none)",
    )


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read as an image (the error's class), else None."""
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:  # verify() raises SyntaxError too
        return type(err).__name__
    return None


def _size(path: str) -> tuple[int, int]:
    """``(height, width)`` from the header of a file :func:`_unreadable` passed."""
    with Image.open(path) as img:
        return img.height, img.width


def check_images(paths: list[str], flag: str = "--image") -> None:
    """Every file exists and reads as an image (headers only); missing ones are named together."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise CommandError(f"{flag} not found: {', '.join(missing)}")
    for path in paths:
        why = _unreadable(path)
        if why:
            raise CommandError(f"{flag} {path}: cannot read it as an image ({why})")


def video_frames(values: list[str], flag: str = "--video") -> list[list[str]]:
    """Each ``--video`` value (comma-separated frame files) as its frame list, checked: every frame
    exists, reads as an image, and all frames of a video have one size (as training refuses)."""
    videos = [[f for f in value.split(",") if f] for value in values]
    missing = [f for frames in videos for f in frames if not Path(f).is_file()]
    if missing or any(not frames for frames in videos):
        raise CommandError(f"{flag}: frame files not found: {', '.join(missing) or 'an empty list'}")
    for number, (value, frames) in enumerate(zip(values, videos), 1):
        which = f"{flag} {number} ({value})" if len(values) > 1 else f"{flag} {value}"
        for k, frame in enumerate(frames, 1):
            why = _unreadable(frame)
            if why:
                raise CommandError(f"{which}: frame {k} ({frame}) cannot be read as an image ({why})")
        sizes = [_size(frame) for frame in frames]
        odd = next((k for k, size in enumerate(sizes) if size != sizes[0]), None)
        if odd is not None:
            (h, w), (h0, w0) = sizes[odd], sizes[0]
            raise CommandError(
                f"{which}: the frames differ in size: frame {odd + 1} ({frames[odd]}) is {h}x{w}, "
                f"frame 1 ({frames[0]}) is {h0}x{w0} (height x width)"
            )
    return videos
