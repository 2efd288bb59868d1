"""``visionzip-generate``, run from a checkout: the command lives in :mod:`visionzip_core.cli.generate`
(``python scripts/generate.py --help`` for its arguments)."""

import sys

from visionzip_core.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
