"""Argument checks shared by the public API: every bad input gets an error naming the argument.

Each check raises ``TypeError`` for a wrong type/dtype and ``ValueError`` for a wrong shape, value
or range, with the argument's name and what was expected, so a user never gets a silent wrong
number or an opaque indexing error from deep inside a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, t: torch.Tensor) -> None:
    """``t`` must be a floating tensor (fp16, bf16, fp32 or fp64)."""
    check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_integer(name: str, t: torch.Tensor) -> None:
    """``t`` must hold integer ids (int8..int64, uint8)."""
    check_tensor(name, t)
    if t.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (e.g. torch.int64), got dtype {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], symbols: str) -> None:
    """``t.shape`` must equal ``expected``; ``symbols`` names the dims, e.g. ``"(N, H)"``."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {symbols} = {tuple(expected)}, got {tuple(t.shape)}")


def check_ndim(name: str, t: torch.Tensor, allowed: Sequence[int], symbols: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name}: expected {symbols}, got a {t.dim()}-d tensor of shape {tuple(t.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(
                f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), "
                f"got {t.device}"
            )


def check_finite(name: str, t: torch.Tensor) -> None:
    """NaN/Inf in rewards, advantages or log-probs would silently poison a whole update."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/Inf entries")


def value_ranges(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """``{name: (min, max)}`` of each non-empty tensor: one fused ``torch.aminmax`` reduction per tensor
    (a NaN anywhere makes both NaN, an infinity shows in min or max) and one host synchronisation for
    all of them together."""
    names = [name for name, t in tensors.items() if t.numel()]
    if not names:
        return {}
    pairs = [torch.aminmax(tensors[name].detach()) for name in names]
    values = torch.stack([torch.stack(p).to(torch.float64) for p in pairs]).tolist()
    return {name: (lo, hi) for name, (lo, hi) in zip(names, values)}


def non_finite_error(name: str, t: torch.Tensor) -> ValueError:
    """The error for a tensor found (by ``value_ranges``) to hold NaN/Inf; counts them (error path)."""
    bad = int((~torch.isfinite(t)).sum())
    return ValueError(f"{name}: expected finite values, found {bad} NaN/Inf entries")


def check_index_range(name: str, t: torch.Tensor, upper: int, upper_name: str) -> None:
    """Every entry of ``t`` must lie in ``[0, upper)``."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name}: expected values in [0, {upper_name}={upper}), got min {lo}, max {hi}")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_positive(name: str, value: float | int) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def check_non_negative(name: str, value: float | int) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def check_finite_number(name: str, value: object, expected: str = "a finite number") -> None:
    """A real number (not a bool), neither NaN nor infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
