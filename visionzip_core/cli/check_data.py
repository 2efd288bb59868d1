"""Check a training config's data exactly as training would, and list every bad sample (no weights load).

    visionzip-check-data --config configs/X.yaml [section.key=value ...] [--processes N]

``python scripts/check_data.py`` takes the same arguments. Runs the trainer's own path:
``load_config`` (with the same overrides and file checks as ``train/finetune.py``) ->
``build_processor`` (the configured VisionZip token count) -> what the model family gives the data
pipeline (``dataset_inputs``: its placeholders, the sample formats it reads, its video processor;
text-only samples left out in projector and pretrain modes) -> the dataset preflight (same cache) ->
the bad-sample policy -> the mixture and the batch check. Works on every family training takes.
Prints one line per bad sample, a summary per split, and what training would do. Exit status: 0
training would start, 1 it would stop on the data, 2 the config itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from visionzip_core.data import BadDataError
from visionzip_core.data.dataset import apply_policy, epoch_rows, make_encoder, preflight_split
from visionzip_core.data.images import ImageTransform
from visionzip_core.training.config_loading import load_config
from visionzip_core.training.input_checks import check_global_batch
from visionzip_core.training.model_spec import resolve_model_spec
from visionzip_core.training.modeling import build_processor, dataset_inputs
from visionzip_core.training.schema import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training YAML (see configs/)")
    parser.add_argument("--processes", type=int, default=1, help="processes training would use (batch check)")
    parser.add_argument("--max-lines", type=int, default=200, help="bad samples printed per split")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for train/finetune.py")
    args = parser.parse_intermixed_args(argv)

    try:
        settings = load_config(args.config, args.overrides, check_files=True, warn=print)
        spec = resolve_model_spec(settings)
        processor, image_tokens = build_processor(settings, spec)
        inputs = dataset_inputs(settings, spec, processor)  # what the trainer's dataset is given
    except (ConfigError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    data = settings.data.resolve_paths()
    encoder = make_encoder(
        data,
        processor.tokenizer,
        image_tokens,
        inputs["image_token"],
        inputs.get("video_token"),
        inputs.get("video_tokens"),
    )
    try:
        transform = ImageTransform(
            processor.image_processor,
            data.image_aspect_ratio,
            inputs.get("video_processor"),
            inputs["image_layout"],
        )
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    size_rule = transform.size_rule if (encoder.needs_image_sizes or inputs.get("video_token")) else None
    print(
        f"visual tokens per image: {image_tokens.describe()} (template {data.template}, max length {data.model_max_length})"
    )

    stop = None
    for split in ("train", "val"):
        if not getattr(data, split):
            continue
        try:
            found = preflight_split(data, split, encoder, size_rule, inputs["sample_formats"])
        except BadDataError as err:
            print(err)
            stop = stop or str(err)
            continue
        for kind, where in found.bad[: args.max_lines]:
            print(f"[{kind}] {where}")
        if len(found.bad) > args.max_lines:
            print(f"... {len(found.bad) - args.max_lines} more")
        print(json.dumps(found.report.as_dict()))
        try:
            apply_policy(found, data)
        except BadDataError as err:
            stop = stop or str(err)
            continue
        lengths = np.concatenate([lens[valid] for lens, valid in zip(found.lengths, found.valid_rows)])
        with_images = int((lengths > 0).sum()) if len(lengths) else 0
        try:
            _, rows, _ = epoch_rows(found, data, inputs["images_only"])
        except BadDataError as err:
            print(
                f"data.{split}: 0 samples per epoch ({with_images} of {len(lengths)} valid rows with images)"
            )
            stop = stop or str(err)
            continue
        dropped = found.report.text_only_dropped
        dropped = f", {dropped} text-only left out in {settings.train.mode} mode" if dropped else ""
        print(
            f"data.{split}: {len(rows)} samples per epoch after mixing ({with_images} of {len(lengths)} valid rows "
            f"with images{dropped}), longest {int(np.abs(lengths).max()) if len(lengths) else 0} tokens"
        )
        if split == "train":
            try:
                check_global_batch(len(rows), settings.train, args.processes, warn=print)
            except ConfigError as err:
                stop = stop or "; ".join(err.problems)
    if stop:
        print(f"training would stop: {stop}")
        return 1
    print("data OK for training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
