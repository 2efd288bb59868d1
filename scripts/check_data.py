"""``visionzip-check-data``, run from a checkout: the command lives in :mod:`visionzip_core.cli.check_data`
(``python scripts/check_data.py --help`` for its arguments)."""

import sys

from visionzip_core.cli.check_data import main

if __name__ == "__main__":
    sys.exit(main())
