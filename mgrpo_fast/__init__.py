"""mgrpo_fast: a fast MGRPO (multi-layer GRPO) trainer and the fused kernels that make GRPO cheap.

Public API (stable):

* ``linear_logprobs(hidden, weight, targets, *, bias, temperature, return_entropy, impl)``
* ``grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, cu_seqlens, loss_type, ...)``
* ``fused_linear_grpo_loss(hidden, weight, targets, advantages, mask, *, cu_seqlens, ...)``
* ``group_advantages(rewards, group_index, *, scale, eps)``
* ``GRPOLoss``: drop-in for Liger's ``LigerFusedLinearGRPOLoss``.

The pure-torch executable spec lives in ``mgrpo_fast.reference``.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _map_source_kernels() -> None:
    """Make ``mgrpo_fast.kernels`` importable from a source checkout.

    Installed wheels carry ``kernels/`` as the real subpackage ``mgrpo_fast/kernels``. In a checkout
    (or an editable install whose finder is shadowed by the checkout on ``sys.path``) the folder
    sits beside this package, so it is loaded under its import name here.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")) or "mgrpo_fast.kernels" in sys.modules:
        return
    source = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(source, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        "mgrpo_fast.kernels", init, submodule_search_locations=[source]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["mgrpo_fast.kernels"] = module
    spec.loader.exec_module(module)


_map_source_kernels()

from mgrpo_fast.ops.advantages import group_advantages  # noqa: E402
from mgrpo_fast.ops.logprobs import linear_logprobs  # noqa: E402
from mgrpo_fast.ops.loss import fused_linear_grpo_loss, grpo_loss  # noqa: E402
from mgrpo_fast.ops.modules import GRPOLoss  # noqa: E402
from mgrpo_fast.ops.options import LossOptions  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GRPOLoss",
    "LossOptions",
    "fused_linear_grpo_loss",
    "group_advantages",
    "grpo_loss",
    "linear_logprobs",
]
