"""Weights & Biases, on rank 0, never able to stop or crash a run.

- ``wandb.mode: auto`` is online when an API key is configured, offline otherwise (a local run
  that ``wandb sync`` uploads later). ``WANDB_MODE`` in the environment wins over the YAML.
- Files stay under ``output_dir/wandb`` instead of ``~/.cache/wandb``.
- The run id is kept in the trainer state, so a resumed run continues the same wandb run.
- This is the only wandb mechanism: DeepSpeed's own wandb monitor must stay off (two writers to
  one run collide on step numbers).
- Any wandb failure is reported once and the tracker turns itself off.
"""

from __future__ import annotations

import os
from pathlib import Path

from visionzip_core.training.schema import WandbSettings


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class WandbTracker:
    def __init__(self, settings: WandbSettings, output_dir: Path, run_config: dict, run_id: str | None):
        self.settings = settings
        self.run = None
        self.location: str | None = None
        self.mode = "disabled"
        if not settings.enabled or os.environ.get("WANDB_MODE") == "disabled":
            self.location = (
                "disabled (wandb.enabled=false)" if not settings.enabled else "disabled (WANDB_MODE)"
            )
            return
        try:
            import wandb

            wandb_dir = output_dir / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
                os.environ.setdefault(var, str(wandb_dir if var == "WANDB_DIR" else wandb_dir / var.lower()))
            mode = os.environ.get("WANDB_MODE") or settings.mode
            if mode == "auto":
                mode = "online" if _has_api_key() else "offline"
            self.mode = mode
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=settings.name,
                tags=settings.tags or None,
                config=run_config,
                dir=str(output_dir),
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(init_timeout=90, console="off", silent=True),
            )
            self.run.define_metric("*", step_metric="step")
            run_dir = Path(self.run.dir).parent
            online = mode == "online" and self.run.url
            self.location = (
                self.run.url if online else f"{run_dir} (offline; upload with `wandb sync {run_dir}`)"
            )
        except Exception as e:  # noqa: BLE001 - wandb must never stop training
            self._fail("init", e)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def _fail(self, what: str, error: Exception) -> None:
        print(
            f"wandb: {what} failed ({error.__class__.__name__}: {error}); training continues without wandb",
            flush=True,
        )
        self.location = f"disabled after an error in {what}"
        self.run = None

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            flat = {}
            for key, value in record.items():
                if isinstance(value, dict):
                    flat.update({f"{key}/{k}": v for k, v in value.items()})
                else:
                    flat[key] = value
            self.run.log(flat)
        except Exception as e:  # noqa: BLE001
            self._fail("log", e)

    def log_images(self, step: int, key: str, pictures: list, values: dict) -> None:
        """``pictures`` (``(PIL image, caption)`` pairs) as one list of ``wandb.Image`` under ``key``,
        with ``values`` as ``key/...`` scalars, at ``step``."""
        if self.run is None:
            return
        try:
            import wandb

            record = {"step": step, key: [wandb.Image(p, caption=c) for p, c in pictures]}
            record.update({f"{key}/{k}": v for k, v in values.items()})
            self.run.log(record)
        except Exception as e:  # noqa: BLE001
            self._fail("log_images", e)

    def log_artifact(self, name: str, kind: str, paths: list[Path]) -> None:
        """Upload exported files (``kind``: projector | adapter | model)."""
        if self.run is None or not paths:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name=name, type=kind)
            for p in paths:
                if p.is_dir():
                    artifact.add_dir(str(p), name=p.name)
                else:
                    artifact.add_file(str(p), name=p.name)
            self.run.log_artifact(artifact)
        except Exception as e:  # noqa: BLE001
            self._fail("log_artifact", e)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            self._fail("finish", e)
