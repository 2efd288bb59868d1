"""An entry point run with test hooks: ``debug.*=value`` arguments become a :class:`DebugHooks`.

    python tests/hooked_finetune.py train/finetune.py --config configs/demo.yaml debug.step_sleep_s=1.0 [...]

The entry point's path comes first (launchers may put their own arguments, e.g. ``--local_rank``,
before it), so the worker's command line still names ``train/finetune.py``.

``debug.log_samples=true``: write each step's sample indices to ``output_dir/debug/samples-rank<R>.jsonl``
(truncated to the resumed step, so a resumed run's file equals an unbroken run's);
``debug.nan_at_step=N``: make step N's loss NaN; ``debug.step_sleep_s=S``: pause after every step;
``debug.fail_scoring=true``: ``eval.generate_accuracy`` fails on the loaded export;
``debug.hold_until=PATH``: after each step, write ``PATH.waiting`` and wait (up to 600 s) until ``PATH``
exists, so a test can act while the run is known to be mid-way, however slow the machine;
``debug.hold_from_step=N``: hold only after step N and later (default 1). The hold comes before the
step's checkpoint is saved: to kill a run with checkpoint-2 complete, hold from step 3.
Everything else goes to the recipe's ``main`` (:mod:`visionzip_core.training.recipe`, what
``train/finetune.py`` runs) unchanged, the launchers' own arguments included.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from visionzip_core.training import recipe
from visionzip_core.training.hooks import TrainHooks
from visionzip_core.training.metrics import truncate_jsonl


class DebugHooks(TrainHooks):
    def __init__(
        self,
        log_samples: bool = False,
        nan_at_step: int | None = None,
        step_sleep_s: float = 0.0,
        fail_scoring: bool = False,
        hold_until: str | None = None,
        hold_from_step: int = 1,
    ):
        self.log_samples, self.nan_at_step, self.step_sleep_s = log_samples, nan_at_step, step_sleep_s
        self.fail_scoring = fail_scoring
        self.hold_until = Path(hold_until) if hold_until else None
        self.hold_from_step = hold_from_step
        self.path: Path | None = None

    def on_start(self, output_dir, rank, step):
        if self.log_samples:
            self.path = Path(output_dir) / "debug" / f"samples-rank{rank}.jsonl"
            truncate_jsonl(self.path, step)

    def on_micro_batch(self, step, sample_indices):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "samples": sample_indices}) + "\n")

    def loss(self, step, loss):
        return loss * float("nan") if step == self.nan_at_step else loss

    def after_step(self, step):
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if self.hold_until is not None and step >= self.hold_from_step and not self.hold_until.exists():
            Path(f"{self.hold_until}.waiting").write_text(str(step))
            deadline = time.monotonic() + 600
            while not self.hold_until.exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    def before_scoring(self, final):
        if self.fail_scoring:
            raise RuntimeError(f"debug.fail_scoring on {final}")


def split_debug(argv: list[str]) -> tuple[DebugHooks, list[str]]:
    values, rest = {}, []
    for arg in argv:
        if arg.startswith("debug."):
            key, _, value = arg[len("debug.") :].partition("=")
            values[key] = value
        else:
            rest.append(arg)
    hooks = DebugHooks(
        log_samples=values.pop("log_samples", "false").lower() == "true",
        nan_at_step=int(values.pop("nan_at_step")) if "nan_at_step" in values else None,
        step_sleep_s=float(values.pop("step_sleep_s", 0.0)),
        fail_scoring=values.pop("fail_scoring", "false").lower() == "true",
        hold_until=values.pop("hold_until", None),
        hold_from_step=int(values.pop("hold_from_step", 1)),
    )
    if values:
        raise SystemExit(f"hooked_finetune: unknown debug.* arguments {sorted(values)}")
    return hooks, rest


def main() -> int:
    hooks, argv = split_debug(sys.argv[1:])
    argv.remove(next(a for a in argv if a.endswith("finetune.py")))
    return recipe.main(argv, hooks=hooks)


if __name__ == "__main__":
    sys.exit(main())
