"""Where a config's relative paths are found: from the working directory, else in the repository
checkout, else (an installed package, no checkout) in the configs shipped inside the package.

The wheel carries the repository's ``configs/`` as ``visionzip_core/configs`` (a link in a checkout),
so ``deepspeed.config: configs/deepspeed/zero2.json`` works the same from a checkout and from
``pip install .``.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parent  # the checkout; site-packages when installed
SHIPPED_CONFIGS = PACKAGE_ROOT / "configs"


def in_checkout() -> bool:
    """True when running from the repository (source or editable install), not from a wheel."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "visionzip_core").is_dir()


def resolve_repo_path(path: str) -> Path:
    """A config-relative path: as given if it exists from the cwd, else under the repository root,
    else (``configs/...``) among the configs shipped in the package."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or p.exists():
        return p
    if not (REPO_ROOT / p).exists() and p.parts[:1] == ("configs",):
        shipped = SHIPPED_CONFIGS.joinpath(*p.parts[1:])
        if shipped.exists():
            return shipped
    return REPO_ROOT / p


def find_config(path: str) -> str:
    """``--config``: the file as given, else (``configs/...`` not found from the cwd) the shipped copy,
    so ``visionzip-train --config configs/demo.yaml`` reads the same file installed as in a checkout."""
    p = Path(os.path.expanduser(path))
    if p.exists() or p.is_absolute() or p.parts[:1] != ("configs",):
        return path
    shipped = SHIPPED_CONFIGS.joinpath(*p.parts[1:])
    return str(shipped) if shipped.is_file() else path
