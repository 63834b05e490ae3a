"""The blocks of the chunked torch path (``mgrpo_fast.ops.chunked``): in-place statistics and
narrowing, and the fp32 logits of 16-bit operands on CPU (sliced weight upcast)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from mgrpo_fast import fused_linear_grpo_loss, linear_logprobs
from mgrpo_fast.ops import chunked
from mgrpo_fast.reference import linear_logprobs_ref


def test_in_place_statistics_equal_the_two_block_ones():
    z = torch.randn(37, 101, dtype=torch.float64) * 3
    targets = torch.randint(0, 101, (37,))
    kept = chunked.softmax_stats(z.clone(), targets, keep_probs=True)
    block = z.clone()
    in_place = chunked.softmax_stats(block, targets, keep_probs=True, in_place=True)
    assert in_place[3].data_ptr() == block.data_ptr()  # the probabilities live in the logits' storage
    for a, b, name in zip(in_place, kept, ("logp", "entropy", "lse", "p")):
        assert_close(a, b, torch.float64, name)
    ref_logp = torch.log_softmax(z, -1)
    assert_close(
        kept[0], ref_logp.gather(1, targets[:, None]).squeeze(1), torch.float64, "logp vs log_softmax"
    )
    assert_close(kept[1], -(ref_logp.exp() * ref_logp).sum(1), torch.float64, "entropy")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 50])
def test_narrow_in_place_equals_a_cast(dtype, rows):
    block = torch.randn(rows, 33)
    expected = block.to(dtype)
    out = chunked.narrow_in_place(block, dtype)
    assert out.dtype == dtype and out.shape == (rows, 33)
    assert out.data_ptr() == block.data_ptr()
    assert torch.equal(out, expected)


def test_bf16_logits_are_fp32_dot_products_of_the_bf16_values(monkeypatch):
    # a weight slice of 64 rows (V = 203: four slices, the last partial): the upcast is sliced, the
    # logits are exact fp32 products of the bf16 values, so log-probs match fp64 to fp32 accuracy
    monkeypatch.setattr(chunked, "WEIGHT_SLICE_BYTES", 64 * 4 * 24)
    hidden = torch.randn(40, 24).to(torch.bfloat16)
    weight = (torch.randn(203, 24) / 24**0.5).to(torch.bfloat16)
    targets = torch.randint(0, 203, (40,))
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=16, impl="torch")
    ref_logp, ref_entropy, _ = linear_logprobs_ref(hidden.double(), weight.double(), targets)
    assert logp.dtype == torch.float32
    assert_close(logp, ref_logp, torch.float32, "logp")
    assert_close(entropy, ref_entropy, torch.float32, "entropy")


def test_bf16_fused_gradients_close_to_fp64(monkeypatch):
    # the one-pass path in bf16 (in-place stats, dlogits narrowed in place, sliced grad_W) against the
    # fp64 reference on the same rounded inputs: bf16-level errors, nothing worse
    monkeypatch.setattr(chunked, "WEIGHT_SLICE_BYTES", 64 * 4 * 32)
    n, h, v = 48, 32, 257
    hidden = torch.randn(n, h).to(torch.bfloat16)
    weight = (torch.randn(v, h) / h**0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,))
    adv = torch.randn(4)
    old = linear_logprobs_ref(hidden.double(), weight.double(), targets)[0].float() + 0.1 * torch.randn(n)

    def run(hid, w, impl_dtype):
        hid, w = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = fused_linear_grpo_loss(
            hid.view(4, 12, h), w, targets.view(4, 12), adv, torch.ones(4, 12),
            old_logp=old.view(4, 12).to(impl_dtype), loss_type="dapo", chunk_size=16, impl="torch",
        )  # fmt: skip
        loss.backward()
        return loss, hid.grad, w.grad

    loss, g_h, g_w = run(hidden, weight, torch.float32)
    ref_loss, ref_h, ref_w = run(hidden.double(), weight.double(), torch.float64)
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-5
    for name, g, r in (("hidden", g_h, ref_h), ("weight", g_w, ref_w)):
        err = float((g.double() - r).abs().max() / r.abs().max())
        assert err < 1e-2, f"grad {name}: relative error {err:.2e}"
