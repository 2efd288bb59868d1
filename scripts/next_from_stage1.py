"""Turn a LLaVA-1.5 folder (a stage-1 export, ``output_dir/final``) into a LLaVA-NeXT folder for stage 2.

    .venv/bin/python scripts/next_from_stage1.py --stage1 outputs/pretrain/final --out outputs/next-init

LLaVA-NeXT's stage 1 is LLaVA-1.5's: the same tower, projector and LLM. The tensors carry over under
the same names, ``image_newline`` starts as LLaVA-NeXT initialises it, and the processor gains the
anyres tilings. Then train stage 2 with ``model.name_or_path: outputs/next-init`` (configs/llava-next-7b/).
Exit status: 0 written; 2 bad input (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visionzip_core.families import FAMILIES, stage1_family
from visionzip_core.model_folders import MODEL, check_model_folder
from visionzip_core.weight_checks import WeightsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1", required=True, help="a llava-1.5 folder (LlavaForConditionalGeneration)")
    parser.add_argument("--out", required=True, help="the LLaVA-NeXT folder to write (must not exist)")
    parser.add_argument(
        "--grid-pinpoints",
        default=None,
        help='JSON list of [H, W] tilings, e.g. "[[336,672],[672,336]]" (default: llava-v1.6\'s five)',
    )
    args = parser.parse_args(argv)
    stage1 = stage1_family()
    # The family whose stage 2 starts from the stage-1 family's export (LLaVA-NeXT).
    target = next(f for f in FAMILIES if f.reuses_stage1)

    out = Path(args.out)
    if out.exists():
        return _fail(f"--out: {out} exists; choose a new folder (nothing is overwritten)")
    config_file = Path(args.stage1) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as err:
        return _fail(f"--stage1: cannot read {config_file} ({' '.join(str(err).split())[:200]})")
    if model_type not in stage1.model_types:
        return _fail(f"--stage1: {args.stage1} is a '{model_type}' model; a {stage1.name} folder is needed")
    problems = check_model_folder(args.stage1, MODEL, "--stage1")
    if problems:
        return _fail("; ".join(problems))
    pinpoints = None
    if args.grid_pinpoints:
        try:
            pinpoints = json.loads(args.grid_pinpoints)
            assert all(len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p) for p in pinpoints)
        except (ValueError, TypeError, AssertionError):
            return _fail(
                f"--grid-pinpoints: a JSON list of [H, W] pairs of positive ints, got {args.grid_pinpoints!r}"
            )
    try:
        target.from_stage1(args.stage1, str(out), pinpoints)
    except (WeightsError, ValueError) as err:
        return _fail(str(err))
    print(f"wrote {out} ({target.name}; stage 2: model.name_or_path={out})")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
