"""The group-advantage kernel (``mgrpo_fast.kernels.advantages``) against ``reference.group_advantages_ref``.

Group ids are random, unsorted and non-contiguous; group sizes run from 1 to 3000 (more than the
largest BLOCK, so a program loops over several chunks). Runs on CUDA when available, else under the
Triton interpreter on CPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mgrpo_fast import group_advantages  # noqa: E402
from mgrpo_fast.kernels.advantages import aot_specs, triton_group_advantages  # noqa: E402
from mgrpo_fast.reference import ADVANTAGE_SCALES, group_advantages_ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64

# Group sizes per case: single rows, typical GRPO groups, one group per BLOCK-table row and groups
# larger than the largest BLOCK (1024), mixed in one call.
SIZES = {
    "ones": [1, 1, 1],
    "grpo": [8] * 12 + [4] * 6 + [1],
    "mixed": [1, 2, 3, 64, 65, 500, 513, 1024, 1025, 3000, 7],
    "one_big": [3000],
}


def make_rewards(sizes: list[int], dtype: torch.dtype, seed: int = 0, binary: bool = False):
    """Rewards and shuffled, non-contiguous int64 group ids (negative ids included)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * len(sizes) + 10, generator=g)[: len(sizes)] * 7 - 30
    group_index = torch.cat([torch.full((s,), int(i), dtype=torch.int64) for i, s in zip(ids, sizes)])
    perm = torch.randperm(group_index.numel(), generator=g)
    group_index = group_index[perm]
    n = group_index.numel()
    if binary:
        rewards = (torch.rand(n, generator=g) > 0.5).to(F64)
    else:
        # Large offset, small spread: the two-pass std must not cancel.
        rewards = 100.0 + torch.randn(n, generator=g, dtype=F64)
    return rewards.to(dtype), group_index


def check(rewards: torch.Tensor, group_index: torch.Tensor, scale: str, eps: float = 1e-6) -> torch.Tensor:
    out = triton_group_advantages(rewards.to(DEVICE), group_index.to(DEVICE), scale, eps)
    want_dtype = F64 if rewards.dtype == F64 else torch.float32
    assert out.dtype == want_dtype and out.shape == rewards.shape and out.device.type == DEVICE.type
    expected = group_advantages_ref(rewards.to(F64), group_index, scale=scale, eps=eps)
    if want_dtype == F64:
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-12)
    else:
        # The kernel is fp32 on fp32 rewards; the reference is fp64 on the same values. Rewards near
        # 100 with spread ~1: a centered value carries ~ulp(100) / std of relative error.
        spread = float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-6, atol=1e-5 * max(spread, 1.0))
    return out


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
@pytest.mark.parametrize("case", list(SIZES))
def test_matches_reference_fp32(case: str, scale: str) -> None:
    rewards, group_index = make_rewards(SIZES[case], torch.float32, seed=len(case))
    check(rewards, group_index, scale)


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_matches_reference_fp64_and_binary(scale: str) -> None:
    rewards, group_index = make_rewards(SIZES["mixed"], F64, seed=1)
    check(rewards, group_index, scale)
    rewards, group_index = make_rewards(SIZES["grpo"], torch.float32, seed=2, binary=True)
    out = check(rewards, group_index, scale)
    # 0/1 rewards: groups whose rewards are all equal get exactly 0
    for g in torch.unique(group_index):
        members = group_index == g
        if rewards[members].unique().numel() == 1:
            assert (out.cpu()[members] == 0).all()


def test_low_precision_rewards_upcast() -> None:
    rewards, group_index = make_rewards(SIZES["grpo"], torch.bfloat16, seed=3, binary=True)
    out = triton_group_advantages(rewards.to(DEVICE), group_index.to(DEVICE), "group", 1e-6)
    assert out.dtype == torch.float32
    expected = group_advantages_ref(rewards.to(F64), group_index, scale="group", eps=1e-6)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-6, atol=1e-6)


def test_group_of_one_and_single_row() -> None:
    for scale in ADVANTAGE_SCALES:
        out = triton_group_advantages(
            torch.tensor([3.5], device=DEVICE), torch.tensor([9], device=DEVICE), scale, 1e-6
        )
        assert out.cpu().tolist() == [0.0]
    empty = triton_group_advantages(
        torch.zeros(0, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE), "group", 1e-6
    )
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_int32_group_ids_and_eps() -> None:
    rewards, group_index = make_rewards(SIZES["grpo"], torch.float32, seed=4)
    check(rewards, group_index.to(torch.int32), "group", eps=0.5)


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_public_api_triton_impl(scale: str) -> None:
    rewards, group_index = make_rewards(SIZES["mixed"], torch.float32, seed=5)
    rewards, group_index = rewards.to(DEVICE), group_index.to(DEVICE)
    got = group_advantages(rewards, group_index, scale=scale, impl="triton")
    torch_path = group_advantages(rewards, group_index, scale=scale, impl="torch")
    assert got.dtype == torch_path.dtype == torch.float32
    torch.testing.assert_close(
        got, torch_path, rtol=2e-6, atol=1e-5 * max(float(torch_path.abs().max()), 1.0)
    )
    expected = group_advantages_ref(rewards.cpu().double(), group_index.cpu(), scale=scale)
    torch.testing.assert_close(
        got.cpu().double(), expected, rtol=2e-6, atol=1e-5 * max(float(expected.abs().max()), 1.0)
    )


def test_deterministic() -> None:
    rewards, group_index = make_rewards(SIZES["mixed"], torch.float32, seed=6)
    first = triton_group_advantages(rewards.to(DEVICE), group_index.to(DEVICE), "group", 1e-6)
    for _ in range(2):
        again = triton_group_advantages(rewards.to(DEVICE), group_index.to(DEVICE), "group", 1e-6)
        assert torch.equal(first, again)


def test_bad_input() -> None:
    r = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="scale"):
        triton_group_advantages(r, torch.zeros(4, dtype=torch.long, device=DEVICE), "std", 1e-6)
    with pytest.raises(ValueError, match="integer"):
        triton_group_advantages(r, torch.zeros(4, device=DEVICE), "group", 1e-6)
    with pytest.raises(ValueError, match="shape"):
        triton_group_advantages(r, torch.zeros(3, dtype=torch.long, device=DEVICE), "group", 1e-6)
    with pytest.raises(ValueError, match="float"):
        triton_group_advantages(r.long(), torch.zeros(4, dtype=torch.long, device=DEVICE), "group", 1e-6)


def test_aot_specs_cover_the_launcher(monkeypatch) -> None:
    """Every launch the launcher can make is one of aot_specs() (dtype, constexprs, num_warps)."""
    from mgrpo_fast.kernels import advantages as module

    specs = aot_specs()
    assert len({s.name for s in specs}) == len(specs)
    known = {(s.signature["rewards_ptr"], tuple(sorted(s.constexprs.items())), s.num_warps) for s in specs}
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(rewards, *args, num_warps, **constexprs):
                ptr = {torch.float32: "*fp32", torch.float64: "*fp64"}[rewards.dtype]
                launched.append((ptr, tuple(sorted(constexprs.items())), num_warps))

            return launch

    monkeypatch.setattr(module, "_group_advantages_kernel", Recorder())
    for dtype in (torch.float16, torch.bfloat16, torch.float32, F64):
        for sizes in ([1], [64], [65], [512], [513], [1024], [3000, 2]):
            rewards, group_index = make_rewards(sizes, dtype)
            for scale in ADVANTAGE_SCALES:
                triton_group_advantages(rewards.to(DEVICE), group_index.to(DEVICE), scale, 1e-6)
    assert launched and set(launched) <= known
