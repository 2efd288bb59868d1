"""The training/validation dataset: preflight-checked, mixed by weight, decoded lazily per item.

``build_dataset`` does all checking before training starts (structure, roles, placeholders vs
images, image files, whether the sample fits), through ``datasets.map`` so that the result is
cached by fingerprint and can use several processes. Samples stay in memory-mapped arrow files;
the dataset itself holds only two small integer arrays (source, row) and the lengths.

An image that passed preflight but fails to decode later (a truncated file with a valid header,
or a file changed after the check) never reaches the model: under ``on_bad_sample: error`` the
worker raises :class:`BadDataError`; under ``skip`` the item is replaced by the next sample in
index order that decodes, a warning names the file, and loading stops with
:class:`BadDataError` once more than ``max_skip_fraction`` of the split's distinct samples
failed (counted once each, across epochs and the loader's worker processes of this rank). Use
``check_images: decode`` to catch such files in preflight instead.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from visionzip_core.data.encode import Encoder
from visionzip_core.data.images import ImageLayout, ImageTransform, SizeRule
from visionzip_core.data.settings import DatasetSource, DataSettings
from visionzip_core.data.sources import load_source, sample_id_of, to_conversation
from visionzip_core.data.validation import (
    BadDataError,
    SampleError,
    SkipReport,
    check_image_file,
    check_roles,
    describe_sample,
    resolve_image_path,
)

logger = logging.getLogger(__name__)

# Below this many rows a single process is faster than starting a pool.
_PARALLEL_PREFLIGHT_ROWS = 20_000


@dataclass
class _Source:
    spec: DatasetSource
    table: object  # datasets.Dataset, memory-mapped
    fmt: str


def preflight_row(
    row: dict,
    index: int,
    *,
    fmt: str,
    encoder: Encoder,
    image_folder: str | None,
    decode: bool,
    size_rule: SizeRule | None = None,
):
    """Check one raw row; returns ``{"kind", "reason", "length", "sample_id", "dropped_turn"}``
    (kind "" when good).

    ``length`` is the token count after image expansion, negative for text-only samples;
    ``dropped_turn`` is True when the sample opened with an assistant turn, which is dropped.
    """
    sample_id, dropped = None, False
    files: list[str] = []
    try:
        sample_id = sample_id_of(row)
        conv = to_conversation(row, fmt, encoder.image_token, encoder.video_token)
        dropped = conv.dropped_leading_reply
        files = [resolve_image_path(image, image_folder) for image in conv.images]
        frame_files = [[resolve_image_path(f, image_folder) for f in video] for video in conv.videos]
        check_roles(conv.turns, encoder.template)
        n_placeholders = sum(text.count(encoder.image_token) for _, text in conv.turns)
        if n_placeholders != len(conv.images):
            why = " left after dropping the opening assistant turn" if dropped else ""
            raise SampleError(
                "placeholder_mismatch",
                f"{n_placeholders} {encoder.image_token} placeholder(s){why} for {len(conv.images)} image(s)",
            )
        sizes = [check_image_file(path, decode) for path in files]
        if size_rule is not None:
            sizes = [size_rule(size) for size in sizes]
        video_sizes = [_video_size(video, decode, size_rule) for video in frame_files]
        ids, _ = encoder(conv.turns, len(conv.images), sizes, video_sizes)
        length = len(ids) if (conv.images or conv.videos) else -len(ids)
        files = files + [f for video in frame_files for f in video]
        result = {"kind": "", "reason": "", "length": length}
    except SampleError as err:
        result = {"kind": err.kind, "reason": err.reason, "length": 0}
    return result | {
        "sample_id": sample_id or "",
        "dropped_turn": dropped,
        "image_files": files,
        "image_stamps": file_stamps(files),
    }


def _video_size(frames: list[str], decode: bool, size_rule: SizeRule | None) -> tuple[int, int, int]:
    """``(T, H, W)`` of a video given as frame files, as the video processor will shape it."""
    sizes = [check_image_file(path, decode) for path in frames]
    odd = next((k for k, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is not None:
        raise SampleError(
            "bad_video",
            f"the frames of a video differ in size: frame {odd + 1} ({frames[odd]}) is "
            f"{sizes[odd][0]}x{sizes[odd][1]}, frame 1 is {sizes[0][0]}x{sizes[0][1]} (height x width)",
        )
    if size_rule is None or size_rule.video is None:
        raise SampleError("bad_structure", "a video, but this model's processor takes no video")
    return size_rule.video_size(len(frames), sizes[0])


def file_stamps(paths: list[str]) -> list[int]:
    """One number per file that changes when the file is replaced, edited, deleted or restored:
    a hash of (size, mtime in ns), or -1 when it cannot be stat-ed."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(-1)
            continue
        out.append(hash((st.st_size, st.st_mtime_ns)) & 0x7FFF_FFFF_FFFF_FFFF)
    return out


def mixture_indices(
    valid_rows: list[np.ndarray], weights: list[float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(source, row)`` arrays: each source's valid rows ``floor(w)`` times plus a seeded subset of
    ``round(frac(w) * n)`` of them, so a weight of 2.5 gives every row twice and half of them thrice."""
    sources, rows = [], []
    for s, (valid, weight) in enumerate(zip(valid_rows, weights)):
        whole, frac = int(math.floor(weight)), weight - math.floor(weight)
        parts = [np.tile(valid, whole)]
        extra = int(round(frac * len(valid)))
        if extra:
            rng = np.random.default_rng([seed, s])
            parts.append(np.sort(rng.choice(valid, size=extra, replace=False)))
        picked = np.concatenate(parts).astype(np.int64)
        sources.append(np.full(len(picked), s, dtype=np.int32))
        rows.append(picked)
    return np.concatenate(sources), np.concatenate(rows)


class VisionLanguageDataset(torch.utils.data.Dataset):
    """``ds[i] -> {"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values"?: FloatTensor[n, 3, H, W],
    "image_sizes"?: LongTensor[images, 2]}``.

    ``pixel_values`` is absent for text-only samples; a tiling model's items hold every crop of
    their images and ``image_sizes``. ``lengths[i]`` is ``T`` (negative when text-only), the count
    after compression: each image's own count of ids. ``skip_report`` is the preflight
    summary (``SkipReport.as_dict()``) for logging.
    """

    def __init__(self, split, sources, source_of, row_of, lengths, encoder, transform, settings, report):
        self.split = split
        self.sources = sources
        self._source_of = source_of
        self._row_of = row_of
        self._lengths = lengths
        self.encoder = encoder
        self.transform = transform
        self.on_bad_sample = settings.on_bad_sample
        self.max_skip_fraction = settings.max_skip_fraction
        self.skip_report = report.as_dict()
        # Which items failed to decode, shared by the loader's worker processes and kept across
        # epochs: the skip limit counts distinct samples, not every retry of the same file.
        self._failed = torch.zeros(len(row_of), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self._row_of)

    @property
    def lengths(self) -> list[int]:
        return self._lengths.tolist()

    def describe(self, i: int) -> str:
        src = self.sources[self._source_of[i]]
        row = int(self._row_of[i])
        return describe_sample(src.spec.path, row, sample_id_of(src.table[row]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                return self._load(j)
            except _DecodeFailure as failure:
                if self.on_bad_sample == "error":
                    raise BadDataError(f"{self.describe(j)}: {failure}") from None
                if not self._failed[j]:
                    self._failed[j] = True
                    logger.warning("%s: %s; using the next sample instead", self.describe(j), failure)
                failed = int(self._failed.sum())
                if failed > max(1, self.max_skip_fraction * len(self)):
                    raise BadDataError(
                        f"data.{self.split}: {failed} of {len(self)} samples failed to decode, more than "
                        f"max_skip_fraction {self.max_skip_fraction:.2%}; last: {self.describe(j)}: {failure}"
                    ) from None
        raise BadDataError(f"data.{self.split}: no sample could be loaded")

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        src = self.sources[self._source_of[i]]
        row = src.table[int(self._row_of[i])]
        try:
            conv = to_conversation(row, src.fmt, self.encoder.image_token, self.encoder.video_token)
        except SampleError as err:  # only when the file changed after preflight
            raise BadDataError(f"{self.describe(i)}: {err.reason} (changed since preflight?)") from None
        item: dict[str, torch.Tensor] = {}
        sizes = None
        if conv.images:
            paths = [resolve_image_path(p, src.spec.image_folder) for p in conv.images]
            try:
                item = self.transform.load(paths)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
                raise _DecodeFailure(f"image failed to decode: {' '.join(str(err).split())[:200]}") from err
            if "image_sizes" in item:  # the count follows the size the processor saw
                sizes = [tuple(s) for s in item["image_sizes"].tolist()]
                if self.transform.native is not None:  # counting only: the Qwen model takes grid_thw
                    del item["image_sizes"]
        video_sizes: list = []
        if conv.videos:
            videos = [[resolve_image_path(f, src.spec.image_folder) for f in v] for v in conv.videos]
            try:
                loaded = self.transform.load_videos(videos)
            except Exception as err:
                raise _DecodeFailure(f"video failed to decode: {' '.join(str(err).split())[:200]}") from err
            video_sizes = [tuple(s) for s in loaded.pop("video_sizes").tolist()]
            item.update(loaded)
        try:
            ids, labels = self.encoder(conv.turns, len(conv.images), sizes, video_sizes)
        except SampleError as err:  # only when the file changed after preflight
            raise BadDataError(f"{self.describe(i)}: {err.reason} (changed since preflight?)") from None
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            **item,
        }


class _DecodeFailure(Exception):
    pass


@dataclass
class Preflight:
    """What the preflight found in one split, before the bad-sample policy is applied.

    ``bad`` lists every bad sample as ``(kind, "<file>: sample <i> (id ..): <reason>")``, in file
    order; ``valid_rows[s]`` and ``lengths[s]`` are per source ``s`` (lengths of every row).
    """

    split: str
    encoder: Encoder
    sources: list[_Source]
    valid_rows: list[np.ndarray]
    lengths: list[np.ndarray]
    report: SkipReport
    bad: list[tuple[str, str]]


def make_encoder(
    settings: DataSettings,
    tokenizer,
    image_tokens_per_image: int,
    image_token: str,
    video_token: str | None = None,
    video_tokens=None,
) -> Encoder:
    return Encoder.from_settings(
        settings, tokenizer, image_token, image_tokens_per_image, video_token, video_tokens
    )


def preflight_split(
    settings: DataSettings,
    split: str,
    encoder: Encoder,
    size_rule: SizeRule | None = None,
    sample_formats: tuple[str, ...] = ("llava", "messages"),
) -> Preflight:
    """Load and check every source of ``split`` (paths already absolute); no policy applied.
    ``size_rule`` maps image sizes to what the processor sees, when the token count needs them.
    A source in a format outside ``sample_formats`` (the model family's) is one
    :class:`BadDataError` naming it, before any sample is checked."""
    specs = getattr(settings, split)
    if not specs:
        raise ValueError(f"data.{split} is empty")
    report = SkipReport(split)
    found = Preflight(split, encoder, [], [], [], report, [])
    for k, spec in enumerate(specs):
        table, fmt = load_source(spec, settings.cache_dir)
        if fmt not in sample_formats:
            raise BadDataError(
                f"data.{split}[{k}] ({spec.path}): {fmt}-format samples, but this model is trained on "
                f"{' or '.join(sample_formats)} format: write each sample as "
                '{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}, '
                '...], "images": [...]} (see the README, data formats)'
            )
        checked = run_preflight(table, fmt, encoder, spec, settings, size_rule)
        kinds = np.asarray(checked.data.column("kind").to_numpy(zero_copy_only=False))
        bad = np.flatnonzero(kinds != "")
        report.total += len(kinds)
        for r in bad:
            rec = checked[int(r)]
            where = f"{describe_sample(spec.path, int(r), rec['sample_id'] or None)}: {rec['reason']}"
            report.add(rec["kind"], where)
            found.bad.append((rec["kind"], where))
        valid = np.flatnonzero(kinds == "")
        dropped = np.asarray(checked.data.column("dropped_turn").to_numpy(zero_copy_only=False), dtype=bool)
        report.dropped_leading_reply += int(dropped[valid].sum())
        found.sources.append(_Source(spec, table, fmt))
        found.valid_rows.append(valid)
        found.lengths.append(np.asarray(checked.data.column("length").to_numpy(), dtype=np.int64))
    return found


def apply_policy(found: Preflight, settings: DataSettings) -> None:
    """Raise :class:`BadDataError` where training stops: the first bad sample under ``error``,
    more than ``max_skip_fraction`` bad under ``skip``."""
    if found.bad and settings.on_bad_sample == "error":
        n = len(found.bad)
        more = f" (+{n - 1} more bad samples; scripts/check_data.py lists them)" if n > 1 else ""
        raise BadDataError(found.bad[0][1] + more)
    found.report.enforce(settings.max_skip_fraction)


def epoch_rows(
    found: Preflight, settings: DataSettings, images_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(source_of, row_of, length)`` of each sample of one epoch: the mixture of the valid rows
    (:func:`mixture_indices`), without the text-only ones under ``images_only`` (counted in
    ``found.report.text_only_dropped``). The trainer's dataset and ``scripts/check_data.py`` both
    count an epoch here. ``length`` is negative for a text-only sample.

    Raises :class:`BadDataError` when no sample (or, under ``images_only``, no image sample) is left.
    """
    split, specs = found.split, getattr(settings, found.split)
    source_of, row_of = mixture_indices(found.valid_rows, [s.weight for s in specs], settings.seed)
    if len(row_of) == 0:
        raise BadDataError(f"data.{split}: no usable samples")
    per_item = np.empty(len(row_of), dtype=np.int64)
    for s, lens in enumerate(found.lengths):
        mask = source_of == s
        per_item[mask] = lens[row_of[mask]]
    if images_only:
        keep = per_item > 0
        found.report.text_only_dropped = int((~keep).sum())
        source_of, row_of, per_item = source_of[keep], row_of[keep], per_item[keep]
        if len(row_of) == 0:
            raise BadDataError(f"data.{split}: no sample has an image")
    return source_of, row_of, per_item


def build_dataset(
    settings: DataSettings,
    split: str,
    tokenizer,
    image_processor,
    image_tokens_per_image: int,
    image_token: str = "<image>",
    base_dir: str | os.PathLike | None = None,
    images_only: bool = False,
    video_processor=None,
    video_token: str | None = None,
    video_tokens=None,
    sample_formats: tuple[str, ...] = ("llava", "messages"),
    image_layout: ImageLayout | None = None,
) -> VisionLanguageDataset:
    """Load, preflight-check and mix the ``split`` ("train" or "val") sources of ``settings``.

    Raises :class:`BadDataError` (one line) on the first bad sample under ``on_bad_sample: error``,
    or when skipped samples exceed ``max_skip_fraction``; ``ValueError`` for settings problems
    (missing files, a tokenizer without the image token or without a chat template).
    Relative paths resolve against ``base_dir`` (default: the current working directory).
    ``images_only`` drops text-only samples (they teach a projector nothing) and counts them in
    the summary as ``text_only_dropped``; they are not bad samples and do not count as skipped.
    A model that takes video gives ``video_processor``, its placeholder ``video_token`` and
    ``video_tokens``, ``(T, H, W) -> count`` (:class:`visionzip_core.families.counts.VideoTokenCount`).
    ``sample_formats``: the file formats the model family reads (a source in another is refused).
    ``image_layout``: how the family's processor lays out an image (default: one fixed-size crop).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    settings = settings.resolve_paths(base_dir)
    transform = ImageTransform(image_processor, settings.image_aspect_ratio, video_processor, image_layout)
    encoder = make_encoder(
        settings, tokenizer, image_tokens_per_image, image_token, video_token, video_tokens
    )
    size_rule = transform.size_rule if (encoder.needs_image_sizes or video_token) else None
    found = preflight_split(settings, split, encoder, size_rule, sample_formats)
    apply_policy(found, settings)
    report = found.report
    if report.skipped:
        logger.warning(
            "data.%s: skipped %d bad samples: %s", split, report.skipped, report.as_dict()["by_kind"]
        )
    if report.dropped_leading_reply:
        logger.warning(
            "data.%s: %d samples opened with an assistant turn; that turn was dropped (as the reference data loader does)",
            split,
            report.dropped_leading_reply,
        )
    source_of, row_of, per_item = epoch_rows(found, settings, images_only)
    if images_only and report.text_only_dropped:
        n = report.text_only_dropped
        logger.warning("data.%s: dropped %d text-only sample%s", split, n, "" if n == 1 else "s")
    return VisionLanguageDataset(
        split, found.sources, source_of, row_of, per_item, encoder, transform, settings, report
    )


def _preflight_features():
    import datasets

    return datasets.Features(
        {
            "kind": datasets.Value("string"),
            "reason": datasets.Value("string"),
            "length": datasets.Value("int64"),
            "sample_id": datasets.Value("string"),
            "dropped_turn": datasets.Value("bool"),
            "image_files": datasets.List(datasets.Value("string")),
            "image_stamps": datasets.List(datasets.Value("int64")),
        }
    )


def run_preflight(
    table, fmt: str, encoder: Encoder, spec: DatasetSource, settings: DataSettings, size_rule=None
):
    """``datasets.map`` of :func:`preflight_row` over one source, cached by the datasets fingerprint.

    The fingerprint covers the data file and the check's settings, not the images: a cached
    result is reused only while every image it checked still has the size and mtime it had
    (one ``stat`` per image), else the whole source is checked again.
    """
    num_proc = settings.preflight_num_proc
    if num_proc is None and len(table) >= _PARALLEL_PREFLIGHT_ROWS:
        num_proc = max(1, min(8, os.cpu_count() or 1))

    def check(fresh: bool):
        return table.map(
            preflight_row,
            with_indices=True,
            fn_kwargs={
                "fmt": fmt,
                "encoder": encoder,
                "image_folder": spec.image_folder,
                "decode": settings.check_images == "decode",
                "size_rule": size_rule,
            },
            remove_columns=table.column_names,
            features=_preflight_features(),
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            load_from_cache_file=not fresh,
            desc=f"preflight {spec.label}",
        )

    checked = check(fresh=False)
    changed = changed_images(checked)
    if changed:
        logger.warning(
            "%s: %d image(s) changed since the cached preflight (e.g. %s); checking again",
            spec.path,
            len(changed),
            changed[0],
        )
        checked = check(fresh=True)
    return checked


def changed_images(checked) -> list[str]:
    """Image files whose size/mtime differ from what the preflight recorded (deleted ones included)."""
    import pyarrow.compute as pc

    files = pc.list_flatten(checked.data.column("image_files")).to_pylist()
    recorded = pc.list_flatten(checked.data.column("image_stamps")).to_numpy(zero_copy_only=False)
    now = np.asarray(file_stamps(files), dtype=np.int64)
    return [files[i] for i in np.flatnonzero(now != recorded)]
