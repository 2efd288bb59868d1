"""Loader throughput: samples/s through DataLoader + collator at 336 px, and the collator alone.

    OMP_NUM_THREADS=1 python scripts/bench_loader.py [--images 96] [--batch-size 16] [--repeats 3]

Writes synthetic photo-like JPEGs (640x480, noisy, as COCO-sized inputs) and a LLaVA-format JSON
to a temporary folder, builds the dataset with a CLIP-336 image processor and the tiny tokenizer
(K = 64 image tokens per image, vicuna_v1), then reports the median over ``--repeats`` epochs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visionzip_core.data import DataCollator, DataSettings, LengthGroupedSampler, build_dataset
from visionzip_core.testing.tokenizers import build_tiny_tokenizer


def write_data(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    rows = []
    for i in range(n):
        base = rng.integers(0, 255, size=(1, 1, 3))
        noise = rng.integers(-40, 40, size=(480, 640, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
            folder / "images" / f"{i}.jpg", quality=90
        )
        rows.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the picture in detail, please."},
                    {"from": "gpt", "value": "a picture with noise of one colour. " * (1 + i % 8)},
                ],
            }
        )
    path = folder / "train.json"
    path.write_text(json.dumps(rows))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="synthetic samples to load per run")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per batch")
    parser.add_argument("--repeats", type=int, default=3, help="passes per setting; the median is reported")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts to compare"
    )
    args = parser.parse_args(argv)

    from transformers import CLIPImageProcessorPil

    tok = build_tiny_tokenizer()
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write_data(folder, args.images)
        settings = DataSettings(
            train=[{"path": str(path), "image_folder": str(folder / "images")}],
            cache_dir=str(folder / "cache"),
            model_max_length=1024,
        )
        t0 = time.perf_counter()
        ds = build_dataset(settings, "train", tok, proc, image_tokens_per_image=64)
        print(f"preflight: {args.images} samples in {time.perf_counter() - t0:.2f} s (first run, no cache)")
        collate = DataCollator(pad_token_id=tok.pad_token_id)
        sampler = LengthGroupedSampler(ds.lengths, batch_size=args.batch_size, seed=0)

        t0 = time.perf_counter()
        for i in range(8):
            ds[i]
        print(
            f"one item (decode + pad + CLIP-336 + tokenise), main process: {(time.perf_counter() - t0) / 8 * 1e3:.1f} ms"
        )

        results = {}
        for workers in args.workers:
            loader = torch.utils.data.DataLoader(
                ds, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                num_workers=workers, persistent_workers=True, prefetch_factor=4,
            )  # fmt: skip
            next(iter(loader))  # start the workers outside the timing
            rates = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                n = sum(len(batch["input_ids"]) for batch in loader)
                rates.append(n / (time.perf_counter() - t0))
            results[workers] = statistics.median(rates)
            print(f"num_workers={workers}: {results[workers]:.1f} samples/s (median of {args.repeats})")
            del loader

        items = [ds[i] for i in range(args.batch_size)]
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            collate(items)
            times.append(time.perf_counter() - t0)
        print(
            f"collator alone: {statistics.median(times) * 1e3:.2f} ms per batch of {args.batch_size} (median of 50)"
        )


if __name__ == "__main__":
    main()
