"""Host-device syncs per forward, the stock model against VisionZip, at batch 2 and 8, per family.

Counted on the families' tiny models by ``visionzip_core.testing.host_syncs.HostSyncCounter`` (``.item()``,
``int()``/``bool()`` of a tensor, ``.tolist()``, ``nonzero``, boolean-mask indexing,
``torch.unique``, ...), one forward without grad, one image per row of alternating sizes. On a CPU
every host read counts, including reads of tensors a GPU run keeps on the host: compare the two
columns, not the figures with zero. Prints a Markdown table (the one in BENCHMARKS.md).

    python scripts/count_syncs.py
    python scripts/count_syncs.py --family qwen2.5-vl --batch 2 8 32
    python scripts/count_syncs.py --device cuda     # on a GPU: torch.cuda.set_sync_debug_mode counts
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from visionzip_core.testing.sync_counts import FAMILIES, SETTINGS, forward_sync_counts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--batch", nargs="+", type=int, default=[2, 8])
    parser.add_argument(
        "--device", default="cpu", help="cpu: count host reads; cuda: count torch's sync debug mode reports"
    )
    args = parser.parse_args(argv)
    print("| family | VisionZip settings | batch | stock | VisionZip | added |")
    print("|---|---|---:|---:|---:|---:|")
    for family in args.family:
        settings = ", ".join(f"{k}={v}" for k, v in SETTINGS[family].items())
        for count in forward_sync_counts(family, tuple(args.batch), device=args.device):
            print(
                f"| {family} | {settings} | {count.batch} | {count.stock} | {count.visionzip} | {count.added:+d} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
