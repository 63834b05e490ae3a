"""A graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit 0 with how to resume.

Cluster schedulers preempt jobs with SIGTERM (then SIGKILL after a grace period) and users press
Ctrl-C (SIGINT). :class:`GracefulStop` turns the first of these signals into a request that the
training loop reads between steps (``stop.requested``): the current step finishes, a checkpoint is
written and the loop ends. A second signal means "now": it raises ``KeyboardInterrupt`` (SIGINT) or
``SystemExit(143)`` (SIGTERM) at once, like the default handlers, so the ``finally`` blocks still
close the reward workers and release the run directory. The previous handlers are restored on exit.

Only the main thread of the main interpreter can install signal handlers; elsewhere (a trainer run
from a thread, e.g. a notebook's worker) :class:`GracefulStop` installs nothing and never requests a
stop. Under ``torchrun`` every rank gets the signal from the launcher; the trainer still agrees on
the decision over all ranks so they stop after the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["GracefulStop"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager: ``with GracefulStop() as stop: ... if stop.requested: checkpoint and break``."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a first SIGTERM/SIGINT arrived."""
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # the second signal: stop now
            logger.warning("second %s: stopping at once", signal.Signals(signum).name)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signal = signum
        logger.warning(
            "%s received: finishing this step, then writing a checkpoint and stopping (send it again to "
            "stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
