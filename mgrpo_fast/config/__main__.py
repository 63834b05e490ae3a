"""``python -m mgrpo_fast.config``: print the resolved configuration (``--help``: every key)."""

import sys

from mgrpo_fast.config.loading import main

sys.exit(main())
