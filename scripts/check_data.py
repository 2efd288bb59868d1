"""Run the data preflight alone and list every bad sample (no model weights are loaded).

    python scripts/check_data.py --config configs/X.yaml --model path/to/llava-hf-folder [--image-tokens 64]

Reads the ``data:`` section of the training YAML, checks each train and val source exactly as
training would (same cache), prints one line per bad sample and a summary per split, and exits
with status 1 when training would stop under the configured policy.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import yaml


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training YAML with a data: section")
    parser.add_argument(
        "--model", required=True, help="folder with the tokenizer + image processor (llava-hf)"
    )
    parser.add_argument(
        "--image-tokens", type=int, default=None, help="K per <image> (default: from the model)"
    )
    parser.add_argument("--image-token", default="<image>")
    parser.add_argument("--max-lines", type=int, default=200, help="bad samples printed per source")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoProcessor

    from visionzip_core.config import num_image_tokens
    from visionzip_core.data import BadDataError, DataSettings
    from visionzip_core.data.dataset import run_preflight
    from visionzip_core.data.encode import Encoder
    from visionzip_core.data.sources import load_source
    from visionzip_core.data.validation import SkipReport, describe_sample

    with open(args.config) as f:
        raw = yaml.safe_load(f) or {}
    if "data" not in raw:
        print(f"{args.config}: no data: section", file=sys.stderr)
        return 2
    settings = DataSettings(**raw["data"]).resolve_paths()
    processor = AutoProcessor.from_pretrained(args.model)
    k = args.image_tokens or num_image_tokens(AutoConfig.from_pretrained(args.model))
    encoder = Encoder.from_settings(settings, processor.tokenizer, args.image_token, k)
    failed = False
    for split in ("train", "val"):
        report = SkipReport(split)
        for spec in getattr(settings, split):
            try:
                table, fmt = load_source(spec, settings.cache_dir)
            except BadDataError as err:
                print(err)
                failed = True
                continue
            checked = run_preflight(table, fmt, encoder, spec, settings)
            kinds = np.asarray(checked.data.column("kind").to_numpy(zero_copy_only=False))
            report.total += len(kinds)
            dropped = np.asarray(
                checked.data.column("dropped_turn").to_numpy(zero_copy_only=False), dtype=bool
            )
            report.dropped_leading_reply += int(dropped[kinds == ""].sum())
            for n, r in enumerate(np.flatnonzero(kinds != "")):
                rec = checked[int(r)]
                where = f"{describe_sample(spec.path, int(r), rec['sample_id'] or None)}: {rec['reason']}"
                report.add(rec["kind"], where)
                if n < args.max_lines:
                    print(f"[{rec['kind']}] {where}")
        summary = report.as_dict()
        print(json.dumps(summary))
        stops = summary["skipped"] and (
            settings.on_bad_sample == "error" or summary["fraction"] > settings.max_skip_fraction
        )
        failed = failed or bool(stops)
    print("training would stop on this data" if failed else "data OK for training")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
