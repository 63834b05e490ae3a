"""`group_advantages` (segmented torch path) against `group_advantages_ref`."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL
from hypothesis import given
from hypothesis import strategies as st

from mgrpo_fast import group_advantages
from mgrpo_fast.reference import ADVANTAGE_SCALES, group_advantages_ref


def random_groups(sizes: list[int], ids: list[int] | None = None) -> torch.Tensor:
    """Group ids for groups of ``sizes`` (ids default to sparse, unsorted values), shuffled."""
    ids = ids if ids is not None else [int(x) * 7 - 50 for x in torch.randperm(len(sizes))]
    index = torch.cat([torch.full((n,), g, dtype=torch.int64) for g, n in zip(ids, sizes)])
    return index[torch.randperm(index.numel())]


def compare(rewards: torch.Tensor, groups: torch.Tensor, scale: str, eps: float = 1e-6) -> None:
    got = group_advantages(rewards, groups, scale=scale, eps=eps)
    expected = group_advantages_ref(rewards, groups, scale=scale, eps=eps)
    assert got.shape == rewards.shape
    assert got.dtype == torch.promote_types(rewards.dtype, torch.float32)
    tol = TOL[torch.float64] if rewards.dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_matches_reference_mixed_group_sizes(scale, dtype):
    # Layer-1 groups of 8 and layer-2 groups of 4 in one call, plus groups of 1 and 2.
    sizes = [8, 8, 4, 4, 4, 1, 2, 1, 13]
    groups = random_groups(sizes)
    rewards = torch.randint(0, 2, (groups.numel(),)).to(dtype) + 0.1 * torch.randn(
        groups.numel(), dtype=dtype
    )
    compare(rewards, groups, scale)


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_binary_rewards_and_constant_groups(scale):
    # Verifier rewards are 0/1; a group whose rewards are all equal carries zero advantage.
    groups = torch.tensor([3, 3, 3, 3, 9, 9, 9, 9, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, groups, scale=scale)
    compare(rewards, groups, scale)
    assert torch.equal(adv[4:], torch.zeros(6))
    assert adv[:4].sum().abs() < 1e-6  # centered within its group


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
def test_group_of_one_has_zero_advantage(scale):
    adv = group_advantages(torch.tensor([0.3, 5.0, -2.0]), torch.tensor([0, 1, 2]), scale=scale)
    assert torch.equal(adv, torch.zeros(3))


def test_group_of_one_is_zero_even_with_eps_zero():
    # The docstring: "a group of one has std 0 and advantage 0" -- with eps=0 too (eps >= 0 is allowed).
    # The same holds for a constant group: 0 / (0 + 0) must not silently become NaN.
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0]), torch.tensor([0, 0, 1, 2, 2]), eps=0.0)
    assert torch.isfinite(adv).all(), f"eps=0 gives {adv.tolist()} for a group of one / a constant group"
    torch.testing.assert_close(adv, torch.tensor([-0.7071068, 0.7071068, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_group_of_inexact_rewards_is_exactly_zero(eps, dtype):
    # docs/algorithm.md: a group whose rewards are all equal carries zero advantage. With a reward that
    # is not exact in binary (a 0.1 format bonus, 7 samples), the rounded group mean differs from
    # 0.1 by an ulp; dividing that rounding residue by its own (tiny) std must not turn it into a
    # same-signed advantage for the whole group (it gives -0.93 with eps=0 and -0.007 with eps=1e-6).
    rewards = torch.tensor([0.1] * 7 + [0.0, 1.0], dtype=dtype)
    groups = torch.tensor([5] * 7 + [2, 2])
    for scale in ADVANTAGE_SCALES:
        adv = group_advantages(rewards, groups, scale=scale, eps=eps)
        assert torch.equal(adv[:7], torch.zeros(7, dtype=dtype)), f"{scale}: {adv[:7].tolist()}"


def test_group_std_is_unbiased():
    # rewards [0, 1] in one group: mean .5, unbiased std sqrt(.5) -> advantages -+ .5 / .7071
    adv = group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([4, 4]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-(0.5**0.5), 0.5**0.5], dtype=torch.float64))


def test_permutation_equivariant():
    groups = random_groups([5, 3, 1, 6])
    rewards = torch.randn(groups.numel())
    perm = torch.randperm(groups.numel())
    for scale in ADVANTAGE_SCALES:
        a = group_advantages(rewards, groups, scale=scale)
        b = group_advantages(rewards[perm], groups[perm], scale=scale)
        torch.testing.assert_close(b, a[perm], **TOL[torch.float32])


def test_numerically_stable_for_large_nearly_equal_rewards():
    # A one-pass E[x^2] - E[x]^2 would lose every digit here; the two-pass path must not.
    base = 1e6
    rewards = torch.tensor([base, base + 1.0, base + 2.0], dtype=torch.float64)
    adv = group_advantages(rewards, torch.zeros(3, dtype=torch.long), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-9)


def test_deterministic():
    groups = random_groups([8] * 16 + [4] * 32)
    rewards = torch.randn(groups.numel())
    for scale in ADVANTAGE_SCALES:
        assert torch.equal(
            group_advantages(rewards, groups, scale=scale), group_advantages(rewards, groups, scale=scale)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_empty_input(dtype):
    adv = group_advantages(torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.long))
    assert adv.shape == (0,)
    assert adv.dtype == torch.promote_types(dtype, torch.float32)


def test_low_precision_rewards_are_upcast():
    groups = random_groups([4, 4, 2])
    rewards = torch.randn(groups.numel()).to(torch.bfloat16)
    adv = group_advantages(rewards, groups)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, group_advantages_ref(rewards, groups), **TOL[torch.float32])


@pytest.mark.parametrize("int_dtype", [torch.int32, torch.int64, torch.uint8])
def test_group_index_dtypes(int_dtype):
    groups = torch.tensor([2, 0, 2, 1, 0, 0])
    rewards = torch.randn(6)
    torch.testing.assert_close(
        group_advantages(rewards, groups.to(int_dtype)), group_advantages(rewards, groups)
    )


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    scale=st.sampled_from(ADVANTAGE_SCALES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    binary=st.booleans(),
    data=st.data(),
)
def test_hypothesis(sizes, scale, dtype, binary, data):
    ids = data.draw(st.lists(st.integers(-1000, 1000), min_size=len(sizes), max_size=len(sizes), unique=True))
    groups = random_groups(sizes, ids)
    n = groups.numel()
    rewards = torch.randint(0, 2, (n,)).to(dtype) if binary else torch.randn(n, dtype=dtype) * 3
    compare(rewards, groups, scale)
