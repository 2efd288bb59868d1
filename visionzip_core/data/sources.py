"""Reading sample files through `datasets` (memory-mapped arrow) and normalising samples to turns.

Two on-disk formats are accepted and reduced to one in-memory shape, a :class:`Conversation`:

- LLaVA: ``{"id", "image"?: str | [str], "conversations": [{"from": "human"|"gpt"|"system", "value": str}]}``
- HF messages: ``{"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}],
  "images"?: [str], "videos"?: [[str]]}`` where a content part is ``{"type": "text", "text": ...}``,
  ``{"type": "image"}`` or ``{"type": "video"}``. An image part becomes the family's image
  placeholder at that position and takes the next path of ``images``; a video part becomes the
  video placeholder and takes the next frame list of ``videos`` (a video is a list of frame files).
  A part may carry its own path instead, as Qwen users write it: ``{"type": "image", "image": "a.jpg"}``,
  ``{"type": "video", "video": ["f1.jpg", "f2.jpg"]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionzip_core.data.settings import DatasetSource
from visionzip_core.data.validation import BadDataError, SampleError

_CONVERSATION_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    """A sample reduced to roles and text; ``images`` are paths in placeholder order, ``videos``
    frame-path lists in video-placeholder order."""

    turns: tuple[tuple[str, str], ...]  # (role in {"system", "user", "assistant"}, text with placeholders)
    images: tuple[str, ...]
    sample_id: str | None
    dropped_leading_reply: bool = False  # an opening assistant turn was dropped (LLaVA does the same)
    videos: tuple[tuple[str, ...], ...] = ()


def drop_leading_reply(turns: tuple[tuple[str, str], ...]) -> tuple[tuple[tuple[str, str], ...], bool]:
    """LLaVA's ``preprocess_v1``: a conversation that opens with the assistant (ShareGPT-derived
    samples of mix665k do) loses that turn and trains on the rest. A leading system turn stays.

    Returns ``(turns, dropped)``.
    """
    head = 1 if turns and turns[0][0] == "system" else 0
    if len(turns) > head and turns[head][0] == "assistant":
        return turns[:head] + turns[head + 1 :], True
    return turns, False


def load_source(source: DatasetSource, cache_dir: str | None = None):
    """Load one JSON/JSONL file as a memory-mapped ``datasets.Dataset`` and detect its format.

    Returns ``(dataset, format)`` with format ``"llava"`` or ``"messages"``. Malformed JSON raises
    :class:`BadDataError` naming the file, line and column (arrow's own message names neither).
    """
    import datasets

    path = source.path
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
    except Exception as exc:  # arrow's errors carry a byte offset at best; find line/column ourselves
        located = locate_json_error(path)
        if located is not None:
            raise BadDataError(f"{path}: malformed JSON at {located}") from exc
        if "corresponds to no data" in str(exc) or not _one_line(exc):  # datasets' words for an empty file
            raise BadDataError(f"{path}: holds no samples (empty file or empty list)") from exc
        raise BadDataError(f"{path}: could not be read as JSON/JSONL: {_one_line(exc)}") from exc
    columns = set(ds.column_names)
    fmt = source.format
    if fmt == "auto":
        if "conversations" in columns:
            fmt = "llava"
        elif "messages" in columns:
            fmt = "messages"
        else:
            raise BadDataError(
                f"{path}: cannot tell the format: no 'conversations' or 'messages' column "
                f"(columns: {sorted(columns)}); set format explicitly"
            )
    needed = "conversations" if fmt == "llava" else "messages"
    if needed not in columns:
        raise BadDataError(f"{path}: format {fmt!r} needs a {needed!r} field, columns are {sorted(columns)}")
    return ds, fmt


def locate_json_error(path: str | Path) -> str | None:
    """``"line L, column C: reason"`` for the first syntax error in a JSON or JSONL file, else None."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}, column {err.colno}: {err.msg}"
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {lineno}, column {err.colno}: {err.msg}"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def sample_id_of(row: dict[str, Any]) -> str | None:
    sid = row.get("id")
    return None if sid is None else str(sid)


def to_conversation(
    row: dict[str, Any], fmt: str, image_token: str, video_token: str | None = None
) -> Conversation:
    """Normalise one raw row; raises :class:`SampleError` (kind + reason) on structural problems.

    ``video_token``: the placeholder a video part becomes (None: the model takes no video, and a
    video part is a bad sample)."""
    videos: Any = None
    if fmt == "llava":
        turns_raw, images = row.get("conversations"), row.get("image")
        role_key, text_key, roles = "from", "value", _CONVERSATION_ROLES
    else:
        turns_raw, images = row.get("messages"), row.get("images")
        videos = row.get("videos")
        role_key, text_key, roles = "role", "content", _MESSAGE_ROLES
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise SampleError("bad_structure", "images must be a path or a list of non-empty paths")
    videos = [] if videos is None else videos
    if not isinstance(videos, list) or not all(_is_frame_list(v) for v in videos):
        raise SampleError(
            "bad_structure", "videos must be a list of videos, each a non-empty list of frame paths"
        )
    media = _MediaCursor(list(images), [tuple(v) for v in videos])
    if turns_raw is None or (isinstance(turns_raw, list) and not turns_raw):
        raise SampleError("empty_conversation", "no conversation turns")
    if not isinstance(turns_raw, list):
        raise SampleError("bad_structure", f"turns must be a list, got {type(turns_raw).__name__}")

    turns = []
    for t, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise SampleError("bad_structure", f"turn {t} is a {type(turn).__name__}, not an object")
        role = turn.get(role_key)
        if role not in roles:
            raise SampleError(
                "unknown_role", f"turn {t} has unknown role {role!r} (expected one of {sorted(roles)})"
            )
        text = turn.get(text_key)
        if fmt == "messages" and isinstance(text, list):
            text = _join_parts(text, t, image_token, video_token, media)
        if not isinstance(text, str):
            raise SampleError(
                "non_string_content", f"turn {t} content is {type(text).__name__}, not a string"
            )
        turns.append((roles[role], text))

    turns, dropped = drop_leading_reply(tuple(turns))
    images_out, videos_out = media.result()
    return Conversation(
        turns=turns,
        images=tuple(images_out),
        sample_id=sample_id_of(row),
        dropped_leading_reply=dropped,
        videos=tuple(videos_out),
    )


def _is_frame_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(p, str) and p for p in v)


class _MediaCursor:
    """The sample's image paths and videos in placeholder order.

    A part with its own path keeps it; a part without one takes the next entry of the row's
    ``images``/``videos`` list. Row entries no part took (placeholders written into plain text)
    follow in order, so a count mismatch is left to the placeholder check, which names both counts.
    """

    def __init__(self, images: list[str], videos: list[tuple[str, ...]]):
        self.row_images, self.row_videos = images, videos
        self.images: list[str | None] = []  # None: the next row entry
        self.videos: list[tuple[str, ...] | None] = []

    def result(self) -> tuple[list[str], list[tuple[str, ...]]]:
        return self._fill(self.images, self.row_images), self._fill(self.videos, self.row_videos)

    @staticmethod
    def _fill(taken: list, row: list) -> list:
        row = list(row)
        out = []
        for item in taken:
            if item is None and row:
                out.append(row.pop(0))
            elif item is not None:
                out.append(item)
        return out + row


def _join_parts(parts: list, t: int, image_token: str, video_token: str | None, media: _MediaCursor) -> str:
    out = []
    for k, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "image":
            path = p.get("image")
            if path is not None and not (isinstance(path, str) and path):
                raise SampleError("bad_structure", f"turn {t} part {k}: 'image' must be a non-empty path")
            media.images.append(path)
            out.append(image_token)
        elif kind == "video":
            if video_token is None:
                raise SampleError(
                    "bad_structure", f"turn {t} part {k}: a video part, but this model takes no video"
                )
            frames = p.get("video")
            if frames is not None and not _is_frame_list(frames):
                raise SampleError(
                    "bad_structure", f"turn {t} part {k}: 'video' must be a non-empty list of frame paths"
                )
            media.videos.append(None if frames is None else tuple(frames))
            out.append(video_token)
        elif kind == "text" and isinstance(p.get("text"), str):
            out.append(p["text"])
        else:
            raise SampleError(
                "non_string_content", f"turn {t} has a content part that is not text, image or video"
            )
    return "".join(out)
