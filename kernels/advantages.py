"""Group-relative advantages (the GRPO baseline) as one segmented-reduction Triton kernel.

The executable spec is ``mgrpo_fast.reference.group_advantages_ref``. For rewards ``r (N,)`` and a
group id per row (any integers, any order, groups of any size):

* ``scale="group"``: ``A_j = (r_j - mean_g) / (std_g + eps)``, ``std_g`` the unbiased (Bessel)
  standard deviation of the group (a group of one has ``std = 0`` and ``A = 0``);
* ``scale="batch"``: ``A_j = (r_j - mean_g) / (std_batch + eps)``, ``std_batch`` unbiased over all N;
* ``scale="none"``: ``A_j = r_j - mean_g`` (Dr. GRPO).

Host side (torch): ``unique(return_inverse, return_counts)`` numbers the groups, a stable argsort of
that inverse orders the rows by group, and a cumsum of the counts gives each group's segment
``[offsets[g], offsets[g+1])`` of ``order``. The batch std is ``torch.std`` on the device (no sync).

Kernel: one program per group. It walks its segment in ``BLOCK``-row chunks (any group size: 1, or
many times ``BLOCK``) three times: the sum (-> mean), the sum of squared deviations from that mean
(two passes: accurate when rewards are large and nearly equal), then the scaled centered rewards,
scattered back to the rows' original positions through ``order``. Each row is written exactly once
and every sum has a fixed order (per-lane accumulation, then a fixed tree): bit-deterministic.

Numerics: computed in the rewards' dtype, at least fp32: fp16/bf16 rewards are upcast to fp32 on the
host, fp64 rewards are computed in fp64 (the public API promises fp64 advantages for fp64 rewards).
fp32 division and sqrt are the IEEE round-to-nearest ones (``div_rn``, ``sqrt_rn``; Triton's
default fp32 ``/`` and ``sqrt`` are approximate); in fp64 they are IEEE by default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AotSpec, check_kernel_device

SCALES = ("group", "batch", "none")
_SCALE_CODES = {"group": 0, "batch": 1, "none": 2}

# (largest group size, BLOCK, num_warps): the first row whose bound >= the largest group is used
# (None: any). GRPO groups are small (G = 4..64): one warp and one chunk per group.
_BLOCK_TABLE = ((64, 64, 1), (256, 256, 2), (None, 1024, 4))

_KERNEL_DTYPES = (torch.float32, torch.float64)


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    if FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,  # (N,) fp32/fp64, original row order
    order_ptr,  # (N,) int64: rows sorted by group (stable)
    offsets_ptr,  # (G+1,) int64: group g owns order[offsets[g]:offsets[g+1]]
    stats_ptr,  # (2,) rewards dtype: [batch std (scale="batch", else 0), eps]
    out_ptr,  # (N,) rewards dtype, original row order
    SCALE: tl.constexpr,  # 0 group, 1 batch, 2 none
    BLOCK: tl.constexpr,
):
    dtype = rewards_ptr.dtype.element_ty
    FP64: tl.constexpr = dtype == tl.float64
    group = tl.program_id(0)
    start = tl.load(offsets_ptr + group)
    end = tl.load(offsets_ptr + group + 1)
    count = (end - start).to(dtype)
    lanes = tl.arange(0, BLOCK)
    # `while` rather than `for ... in range(start, end, BLOCK)`: the interpreter cannot use loaded
    # scalars as range bounds. Same scf loop once compiled.

    acc = tl.zeros((BLOCK,), dtype)
    chunk = start
    while chunk < end:
        idx = chunk + lanes
        inside = idx < end
        row = tl.load(order_ptr + idx, mask=inside, other=0)
        acc += tl.load(rewards_ptr + row, mask=inside, other=0.0)
        chunk += BLOCK
    mean = _div(tl.sum(acc, axis=0), count, FP64)

    if SCALE == 0:
        acc = tl.zeros((BLOCK,), dtype)
        chunk = start
        while chunk < end:
            idx = chunk + lanes
            inside = idx < end
            row = tl.load(order_ptr + idx, mask=inside, other=0)
            r = tl.load(rewards_ptr + row, mask=inside, other=0.0)
            d = tl.where(inside, r - mean, 0.0)
            acc += d * d
            chunk += BLOCK
        # unbiased; a group of one: 0 / 1 -> std 0 -> advantage 0 / eps = 0
        variance = _div(tl.sum(acc, axis=0), tl.maximum(count - 1.0, 1.0), FP64)
        if FP64:
            std = tl.sqrt(variance)
        else:
            std = tl.sqrt_rn(variance)
        denom = std + tl.load(stats_ptr + 1)
    elif SCALE == 1:
        denom = tl.load(stats_ptr) + tl.load(stats_ptr + 1)
    else:
        denom = tl.load(stats_ptr + 1)  # unused

    chunk = start
    while chunk < end:
        idx = chunk + lanes
        inside = idx < end
        row = tl.load(order_ptr + idx, mask=inside, other=0)
        centered = tl.load(rewards_ptr + row, mask=inside, other=0.0) - mean
        if SCALE == 2:
            value = centered
        else:
            value = _div(centered, denom, FP64)
        tl.store(out_ptr + row, value, mask=inside)
        chunk += BLOCK


def _block_config(largest_group: int) -> tuple[int, int]:
    for bound, block, warps in _BLOCK_TABLE:
        if bound is None or largest_group <= bound:
            return block, warps
    raise AssertionError("unreachable")


def triton_group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalized advantages with the Triton kernel.

    Args:
        rewards: ``(N,)`` float rewards (fp16/bf16 computed in fp32, fp64 in fp64), finite.
        group_index: ``(N,)`` integer group id per row (any ids, any order, any group sizes).
        scale: ``"group" | "batch" | "none"``.
        eps: added to the std (``scale`` group/batch).

    Returns:
        ``(N,)`` advantages, fp32 (fp64 for fp64 rewards), in the rows' original order.
    """
    if not isinstance(rewards, torch.Tensor) or not isinstance(group_index, torch.Tensor):
        raise TypeError("rewards and group_index: expected torch.Tensor")
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor (N,), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a float tensor, got {rewards.dtype}")
    if group_index.dtype.is_floating_point or group_index.dtype.is_complex or group_index.dtype == torch.bool:
        raise ValueError(f"group_index: expected an integer tensor, got {group_index.dtype}")
    if tuple(group_index.shape) != tuple(rewards.shape):
        raise ValueError(
            f"group_index: expected shape (N,) = {tuple(rewards.shape)} like rewards, "
            f"got {tuple(group_index.shape)}"
        )
    if group_index.device != rewards.device:
        raise ValueError(
            f"group_index: expected a tensor on {rewards.device} like rewards, got {group_index.device}"
        )
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    check_kernel_device("triton_group_advantages", rewards)

    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    values = rewards.detach().to(dtype).contiguous()
    n = values.numel()
    if n == 0:
        return values.clone()

    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True).to(torch.int64).contiguous()
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    num_groups = counts.numel()
    block, num_warps = _block_config(int(counts.max()))

    stats = torch.empty(2, dtype=dtype, device=values.device)
    if scale == "batch" and n > 1:
        stats[0] = values.std()  # unbiased, as torch.std and the reference
    else:
        stats[0] = 0.0
    stats[1] = float(eps)

    out = torch.empty_like(values)
    _group_advantages_kernel[(num_groups,)](
        values, order, offsets, stats, out, SCALE=_SCALE_CODES[scale], BLOCK=block, num_warps=num_warps
    )
    return out


def aot_specs() -> list[AotSpec]:
    """Every (dtype, scale, BLOCK) specialization ``triton_group_advantages`` can launch."""
    specs = []
    for torch_dtype in _KERNEL_DTYPES:
        ty = "*fp64" if torch_dtype == torch.float64 else "*fp32"
        signature = {
            "rewards_ptr": ty,
            "order_ptr": "*i64",
            "offsets_ptr": "*i64",
            "stats_ptr": ty,
            "out_ptr": ty,
            "SCALE": "constexpr",
            "BLOCK": "constexpr",
        }
        for scale, code in _SCALE_CODES.items():
            for _, block, warps in _BLOCK_TABLE:
                specs.append(
                    AotSpec(
                        name=f"group_advantages_{ty[1:]}_{scale}_BLOCK={block}",
                        kernel=_group_advantages_kernel,
                        signature=signature,
                        constexprs={"SCALE": code, "BLOCK": block},
                        num_warps=warps,
                        num_stages=1,
                        tags={"dtype": ty[1:], "scale": scale},
                    )
                )
    return specs
