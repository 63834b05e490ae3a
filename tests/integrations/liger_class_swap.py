"""pytest plugin (``-p liger_class_swap``): ``mgrpo_fast.GRPOLoss`` in place of Liger-Kernel's
``LigerFusedLinearGRPOLoss``, for a run of Liger's own test file (test_liger_own_tests.py, this folder).

Loaded before collection, it rebinds the name in ``liger_kernel.chunked_loss``, so the test file's
``from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss`` imports our class: the file runs
unchanged. Only that name is rebound; Liger's functional API and internals stay Liger's.
"""

from __future__ import annotations

import liger_kernel.chunked_loss

from mgrpo_fast import GRPOLoss


def pytest_configure(config) -> None:
    liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss = GRPOLoss


def pytest_report_header(config) -> str:
    cls = liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss
    return f"liger_class_swap: LigerFusedLinearGRPOLoss is {cls.__module__}.{cls.__qualname__}"
