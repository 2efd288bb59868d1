"""Compare training runs: loss, validation loss and learning rate against step, one line per run.

    python scripts/plot_metrics.py outputs/demo outputs/demo2 --out compare.png

Each RUN_DIR is a ``train.output_dir`` (it holds ``metrics.jsonl``); the legend names runs by their
folder. The trainer draws the same figure for its own run as ``output_dir/metrics.png``.
Needs matplotlib (``pip install 'visionzip-core[bench]'``).
"""

from __future__ import annotations

import argparse
import sys

from visionzip_core.training.plots import plot_runs, read_metrics, run_names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="train.output_dir of a run")
    parser.add_argument("--out", required=True, help="PNG to write")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    runs = {}
    for name, run_dir in zip(run_names(args.run_dirs), args.run_dirs):
        try:
            runs[name] = read_metrics(run_dir)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: matplotlib is not installed (pip install 'visionzip-core[bench]')", file=sys.stderr)
        return 2
    out = plot_runs(runs, args.out)
    print(f"{out}: {len(runs)} run(s): {', '.join(runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
