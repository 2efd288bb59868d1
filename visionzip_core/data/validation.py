"""The bad-sample policy: what counts as bad, how it is reported, and when skipping must stop.

Every problem has a *kind* (a stable key the trainer can log) and a one-line reason. Under
``on_bad_sample: error`` the first bad sample stops the run before training with
``<file>: sample <index> (id <id>): <reason>``; under ``skip`` bad samples are dropped, counted by
kind, and the run stops once more than ``max_skip_fraction`` of a split is bad.
"""

from __future__ import annotations

import os
from pathlib import Path

# Stable keys of the skip summary; one per way a sample can be bad.
BAD_SAMPLE_KINDS = (
    "missing_image",  # image file does not exist
    "unreadable_image",  # not an image, or corrupt (header, or full decode with check_images=decode)
    "empty_image",  # zero-byte file or 0-pixel image
    "placeholder_mismatch",  # number of <image> placeholders != number of images
    "empty_conversation",  # no turns at all
    "bad_roles",  # roles out of order (must alternate user/assistant, end on assistant)
    "unknown_role",  # a role outside user/assistant/system (human/gpt in LLaVA files)
    "non_string_content",  # a turn's text is a number, list, null, ...
    "bad_structure",  # turns/images of the wrong JSON type
    "too_long",  # cannot fit model_max_length without cutting an image or every reply
    "too_small",  # an image or video too small for a per-image VisionZip budget (ratio split)
    "bad_video",  # a video's frames differ in size
)


class BadDataError(ValueError):
    """A bad sample or file; the message is one line naming the file, the sample and the reason."""


class SampleError(Exception):
    """Raised while checking or encoding one sample; turned into a BadDataError or a skip count."""

    def __init__(self, kind: str, reason: str):
        assert kind in BAD_SAMPLE_KINDS, kind
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def describe_sample(path: str, index: int, sample_id: str | None) -> str:
    sid = f" (id {sample_id!r})" if sample_id is not None else ""
    return f"{path}: sample {index}{sid}"


def check_roles(turns: tuple[tuple[str, str], ...], template: str) -> None:
    """Raise ``SampleError("bad_roles")`` unless turns are [system] user assistant (user assistant)*."""
    roles = [r for r, _ in turns]
    if roles and roles[0] == "system":
        roles = roles[1:]
    if not roles:
        raise SampleError("empty_conversation", "no user or assistant turns")
    if "system" in roles:
        raise SampleError("bad_roles", "a system turn may only come first")
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise SampleError("bad_roles", f"turn order {roles}: expected {expected!r} at position {i}")
    if roles[-1] != "assistant":
        raise SampleError("bad_roles", "the conversation ends on a user turn (no reply to learn)")
    if template == "plain" and len(roles) != 2:
        raise SampleError(
            "bad_roles", f"the plain template takes one user and one assistant turn, got {len(roles)}"
        )


def resolve_image_path(image: str, image_folder: str | None) -> str:
    p = Path(os.path.expanduser(image))
    if not p.is_absolute() and image_folder is not None:
        p = Path(image_folder) / p
    return str(p)


def _orientation(img) -> int | None:
    """The EXIF orientation, or None. A file whose EXIF cannot be read (e.g. a PNG truncated
    before its eXIf chunk) counts as upright here: decoding it fails later, where it is reported."""
    try:
        return img.getexif().get(0x0112)
    except Exception:  # PIL raises OSError, SyntaxError, struct.error, ... on damaged metadata
        return None


def check_image_file(path: str, decode: bool) -> tuple[int, int]:
    """Cheap existence/size/header check (``decode`` also decodes every pixel); returns the upright
    ``(H, W)`` (EXIF rotation applied)."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise SampleError("missing_image", f"image file not found: {path}") from None
    except OSError as err:
        raise SampleError("unreadable_image", f"image file cannot be accessed: {path}: {err}") from None
    if size == 0:
        raise SampleError("empty_image", f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if decode:
                img.load()
            if _orientation(img) in (5, 6, 7, 8):  # a quarter turn: width and height swap
                w, h = h, w
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SampleError(
            "unreadable_image", f"image cannot be read: {path}: {' '.join(str(err).split())}"
        ) from None
    if w == 0 or h == 0:
        raise SampleError("empty_image", f"image has zero size {h}x{w} (height x width): {path}")
    return h, w


class SkipReport:
    """Counts of skipped samples by kind for one split, with the first example of each kind."""

    def __init__(self, split: str):
        self.split = split
        self.total = 0
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.text_only_dropped = 0  # good samples left out on purpose (projector-only training)
        self.dropped_leading_reply = 0  # kept samples that opened with an assistant turn, dropped

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.examples.setdefault(kind, where)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """Loggable summary: ``{"split", "total", "skipped", "fraction", "by_kind", "first_example",
        "dropped_leading_reply"}``."""
        return {
            "split": self.split,
            "total": self.total,
            "skipped": self.skipped,
            "fraction": self.skipped / self.total if self.total else 0.0,
            "by_kind": dict(sorted(self.counts.items())),
            "first_example": dict(sorted(self.examples.items())),
            "text_only_dropped": self.text_only_dropped,
            "dropped_leading_reply": self.dropped_leading_reply,
        }

    def enforce(self, max_fraction: float) -> None:
        if self.total and self.skipped / self.total > max_fraction:
            kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            first_kind = max(self.counts, key=self.counts.get)
            raise BadDataError(
                f"data.{self.split}: {self.skipped}/{self.total} samples are bad "
                f"({self.skipped / self.total:.2%} > max_skip_fraction {max_fraction:.2%}): {kinds}; "
                f"e.g. {self.examples[first_kind]}"
            )
