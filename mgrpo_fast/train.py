"""``python -m mgrpo_fast.train``: kept as a short name for :mod:`mgrpo_fast.cli.train`."""

import sys

from mgrpo_fast.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
