"""``visionzip-show-tokens``, run from a checkout: the command lives in :mod:`visionzip_core.cli.show_tokens`
(``python scripts/show_tokens.py --help`` for its arguments)."""

import sys

from visionzip_core.cli.show_tokens import main

if __name__ == "__main__":
    sys.exit(main())
