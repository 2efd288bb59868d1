"""The paper's three uses of VisionZip, in miniature: the demo task on CPU, four rows, one table.

    python scripts/paper_table.py --out results/paper_table_demo.json      # about 10 min on 2 cores

Each row trains (or reuses) a model through the real entry point (``train/finetune.py`` with
``configs/demo.yaml``) and scores it with ``scripts/evaluate.py`` (exact match of the generated
first reply on ``data/demo/instruct_val.json``):

  (a) trained on all tokens (VisionZip off), scored with all tokens;
  (b) (a) with training-free VisionZip at a small budget (``--dominant`` + ``--contextual``);
  (c) efficient tuning: (a) with VisionZip at that budget and only the projector trained, on
      ``--fraction`` of the data (the paper: 1/10 of LLaVA-665k);
  (d) trained with VisionZip at that budget from the start.

Step time is the median ``step_time_s`` of the run that trained the row's model; memory is the
peak resident memory of that training process (on this tiny model mostly the libraries, so it
barely moves: the paper's memory claim is measured by ``bench_train.py`` and
``simulate_memory.py``). Writes ``--out`` (JSON rows), ``.md`` and ``.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file for the rows (.md and .png beside it)")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the runs (default: outputs/paper_table/<out's name>)",
    )
    p.add_argument("--dominant", type=int, default=6, help="small budget: dominant tokens, CLS included")
    p.add_argument("--contextual", type=int, default=2, help="small budget: contextual tokens")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the data row (c) tunes on")
    p.add_argument("--config", default="configs/demo.yaml", help="the training recipe of rows (a) and (d)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps per run, 5 validation samples")
    return p.parse_args(argv)


def _run(cmd: list[str], what: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}):\n{tail}")


def train(args, out: Path, overrides: list[str]) -> dict:
    """Train one row's model; ``{"step_time_s", "train_s", "peak_rss_mb"}`` from its metrics."""
    common = [
        f"train.output_dir={out}",
        "train.resume=never",
        "wandb.enabled=false",
        "eval.generate_accuracy=false",
        "data.num_workers=0",
    ]
    if args.quick:  # no validation loss either: the table scores the exports with evaluate.py
        common += ["train.max_steps=3", "train.logging_steps=1", "train.eval_steps=null", "data.val=[]"]
    cmd = [sys.executable, "train/finetune.py", "--config", args.config, *common, *overrides]
    print(f"  training {out.name}: {' '.join(overrides)}", flush=True)
    _run(cmd, f"training {out}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    return {
        "step_time_s": statistics.median(r["step_time_s"] for r in steps),
        "train_s": steps[-1]["elapsed_s"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in steps),
    }


def evaluate(args, model: Path, budget: str, out: Path) -> list[dict]:
    """One row per budget of the comma-separated ``budget`` (one model load for all of them)."""
    cmd = [
        sys.executable,
        "scripts/evaluate.py",
        "--model",
        str(model),
        "--data",
        "data/demo/instruct_val.json",
        "--image-folder",
        "data/demo/images",
        "--out",
        str(out),
        "--budgets",
        budget,
        "--max-new-tokens",
        "8",
    ] + (["--limit", "5"] if args.quick else [])
    _run(cmd, f"evaluating {model} at {budget}")
    return json.loads(out.read_text())


def run(args) -> list[dict]:
    work = args.work or REPO / "outputs" / "paper_table" / args.out.stem
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"error: --work {work} is not empty; pick another or remove it")
    work.mkdir(parents=True, exist_ok=True)
    small = f"{args.dominant}+{args.contextual}"
    vz = [f"visionzip.dominant={args.dominant}", f"visionzip.contextual={args.contextual}"]
    started = time.perf_counter()
    a = train(args, work / "a", ["visionzip.enabled=false"])
    d = train(args, work / "d", ["visionzip.enabled=true", *vz])
    weights = [f"data.train.{k}.weight={args.fraction}" for k in range(_train_sources(args.config))]
    c = train(
        args,
        work / "c",
        [f"model.name_or_path={work / 'a' / 'final'}", "train.mode=projector", "visionzip.enabled=true", *vz]
        + weights,
    )
    scores = dict(zip("ab", evaluate(args, work / "a" / "final", f"stock,{small}", work / "eval_ab.json")))
    scores["c"] = evaluate(args, work / "c" / "final", "recorded", work / "eval_c.json")[0]
    scores["d"] = evaluate(args, work / "d" / "final", "recorded", work / "eval_d.json")[0]
    what = {
        "a": ("trained on all tokens", a),
        "b": (f"(a) + training-free VisionZip {small}", None),
        "c": (f"(a) + VisionZip {small}, projector tuned on {args.fraction:g} of the data", c),
        "d": (f"trained with VisionZip {small} from the start", d),
    }
    rows = []
    for key, (label, trained) in what.items():
        s = scores[key]
        rows.append(
            {
                "row": key,
                "what": label,
                "tokens": s["tokens"],
                "accuracy": s["accuracy"],
                "correct": s["correct"],
                "samples": s["samples"],
                "ttft_s": s["ttft_s"],
                "step_time_s": trained["step_time_s"] if trained else None,
                "train_s": trained["train_s"] if trained else None,
                "peak_rss_mb": trained["peak_rss_mb"] if trained else None,
                "mistakes": s["mistakes"],
            }
        )
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def _train_sources(config: str) -> int:
    import yaml

    with open(REPO / config) as f:
        return len(yaml.safe_load(f)["data"]["train"])


def table(rows: list[dict]) -> str:
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (
        "| row | model | visual tokens / image | accuracy | step time (s) | training (s) | peak RSS (MB) |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| ({r['row']}) | {r['what']} | {r['tokens']} | {r['accuracy']:.2f} ({r['correct']}/{r['samples']}) "
        f"| {cell(r['step_time_s'], '.3f')} | {cell(r['train_s'], '.0f')} | {cell(r['peak_rss_mb'], '.0f')} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"({r['row']})\n{r['tokens']} tok" for r in rows]
    fig, (ax_a, ax_t) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_a.bar(labels, [r["accuracy"] for r in rows], color=["tab:gray", "tab:red", "tab:orange", "tab:green"])
    ax_a.set(ylim=(0, 1), ylabel="exact-match accuracy", title="answers on the demo's val split")
    trained = [r for r in rows if r["step_time_s"] is not None]
    ax_t.bar([f"({r['row']})" for r in trained], [r["step_time_s"] for r in trained], color="tab:blue")
    ax_t.set(ylabel="median step time (s)", title="training step time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    text = table(rows)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(text)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
