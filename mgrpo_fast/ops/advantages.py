"""Group-relative advantages (the GRPO baseline) as a segmented reduction over any group sizes."""

from __future__ import annotations

import torch

from mgrpo_fast.ops.dispatch import choose_impl
from mgrpo_fast.ops.options import ADVANTAGE_SCALES
from mgrpo_fast.ops.validation import (
    check_choice,
    check_finite,
    check_float,
    check_integer,
    check_ndim,
    check_non_negative,
    check_same_device,
    check_shape,
)


def divide_or_zero(centered: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``centered / denominator``, and exactly 0 where the denominator is 0 (a zero std means every
    reward equals its mean, so ``centered`` is 0 too): ``eps=0`` never turns 0/0 into NaN."""
    tiny = torch.finfo(centered.dtype).tiny
    return torch.where(denominator > 0, centered / denominator.clamp(min=tiny), 0.0)


def _group_advantages_torch(
    rewards: torch.Tensor, group_index: torch.Tensor, scale: str, eps: float
) -> torch.Tensor:
    """Atomic-free torch path: rows are ordered by group, then reduced per segment.

    Sums run in fp64 (exact for any realistic group of fp32 rewards), two passes (mean, then the
    sum of squared deviations) keep the std accurate, and a group whose rewards are all equal gets
    exactly 0 (a rounded mean must not leak a tiny ``centered / eps``). ``segment_reduce`` sums in
    a fixed order, so results are deterministic.
    """
    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    values = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    ordered = values[order]
    sizes = counts.to(torch.float64)
    mean = torch.segment_reduce(ordered, "sum", lengths=counts, unsafe=True) / sizes
    constant = torch.segment_reduce(ordered, "max", lengths=counts, unsafe=True) == torch.segment_reduce(
        ordered, "min", lengths=counts, unsafe=True
    )
    centered = torch.where(constant[inverse], 0.0, values - mean[inverse])
    if scale == "group":
        squares = torch.segment_reduce(centered[order].square(), "sum", lengths=counts, unsafe=True)
        std = torch.sqrt(squares / (sizes - 1).clamp(min=1))  # a group of one: 0 / 1 -> std 0
        centered = divide_or_zero(centered, std[inverse] + eps)
    elif scale == "batch":
        batch_std = values.std() if values.numel() > 1 else values.new_zeros(())
        centered = divide_or_zero(centered, batch_std + eps)
    return centered.to(out_dtype)


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    impl: str = "auto",
) -> torch.Tensor:
    """Group-normalized advantages: ``(r - mean_group) / (std + eps)``.

    Args:
        rewards: ``(N,)`` float rewards (finite).
        group_index: ``(N,)`` int group id of each reward; ids may be any integers in any order and
            groups any size (layer-1 groups of G1, layer-2 groups of G2, mixed in one call).
        scale: ``"group"`` (std of the reward's group), ``"batch"`` (std of all rewards) or
            ``"none"`` (only subtract the group mean, Dr. GRPO). The std is unbiased (as TRL);
            a group of one has std 0 and advantage 0.
        eps: added to the std.
        impl: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(N,)`` advantages in fp32 (fp64 for fp64 rewards). Same math as
        ``reference.group_advantages_ref``.
    """
    check_float("rewards", rewards)
    check_integer("group_index", group_index)
    check_ndim("rewards", rewards, (1,), "a 1-D tensor (N,)")
    check_shape("group_index", group_index, rewards.shape, "(N,) like rewards")
    check_same_device("rewards", rewards, group_index=group_index)
    check_choice("scale", scale, ADVANTAGE_SCALES)
    check_non_negative("eps", eps)
    check_finite("rewards", rewards)
    if rewards.numel() == 0:
        return rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if choose_impl("group_advantages", impl, rewards.device) == "triton":
        from mgrpo_fast.kernels.advantages import triton_group_advantages

        return triton_group_advantages(rewards, group_index, scale, float(eps))
    return _group_advantages_torch(rewards, group_index, scale, float(eps))
