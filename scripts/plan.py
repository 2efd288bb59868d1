"""``visionzip-plan``, run from a checkout: the command lives in :mod:`visionzip_core.cli.plan`
(``python scripts/plan.py --help`` for its arguments)."""

import sys

from visionzip_core.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
