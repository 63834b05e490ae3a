"""``python -m mgrpo_fast.compare``: kept as a short name for :mod:`mgrpo_fast.cli.compare`."""

import sys

from mgrpo_fast.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
