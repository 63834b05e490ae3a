"""What the trainer asks of an engine, and the errors an engine may raise."""

from __future__ import annotations

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a NaN/Inf loss or gradient norm."""
