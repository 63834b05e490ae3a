"""``python -m mgrpo_fast.demo``: kept as a short name for :mod:`mgrpo_fast.cli.demo`."""

import sys

from mgrpo_fast.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
