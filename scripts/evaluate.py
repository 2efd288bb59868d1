"""``visionzip-evaluate``, run from a checkout: the command lives in :mod:`visionzip_core.cli.evaluate`
(``python scripts/evaluate.py --help`` for its arguments)."""

import sys

from visionzip_core.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
