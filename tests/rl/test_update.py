"""Global loss normalization across micro-batches (mgrpo_fast.rl.update) and the loss's token_weight."""

from __future__ import annotations

import pytest
import torch

from mgrpo_fast import fused_linear_grpo_loss, grpo_loss
from mgrpo_fast.ops.options import LOSS_TYPES
from mgrpo_fast.rl.update import MetricSums, global_sequence_weights

M = torch.tensor([3.0, 1.0, 4.0])
LAM = torch.tensor([1.0, 1.0, 0.5])


def test_weights_per_loss_type():
    dapo = global_sequence_weights(M, LAM, "dapo")
    torch.testing.assert_close(dapo, LAM.double() / 8)
    grpo = global_sequence_weights(M, LAM, "grpo")
    torch.testing.assert_close(grpo, LAM.double() / (3 * M.double()))
    dr = global_sequence_weights(M, LAM, "dr_grpo")
    torch.testing.assert_close(dr, LAM.double() / (3 * 4))
    dr_fixed = global_sequence_weights(M, LAM, "dr_grpo", max_completion_length=10)
    torch.testing.assert_close(dr_fixed, LAM.double() / 30)
    torch.testing.assert_close(global_sequence_weights(M, LAM, "sapo"), grpo)
    torch.testing.assert_close(global_sequence_weights(M, LAM, "vespo"), dapo)
    torch.testing.assert_close(global_sequence_weights(M, LAM, "luspo"), LAM.double() / 3)
    # batch-wide counts from other ranks override the local ones
    shared = global_sequence_weights(M, LAM, "dapo", total_tokens=16, total_sequences=6, max_tokens=9)
    torch.testing.assert_close(shared, LAM.double() / 16)
    torch.testing.assert_close(
        global_sequence_weights(M, LAM, "dr_grpo", total_sequences=6, max_tokens=9), LAM.double() / 54
    )
    with pytest.raises(ValueError, match="loss_type"):
        global_sequence_weights(M, LAM, "ppo")
    with pytest.raises(ValueError, match="loss_weight"):
        global_sequence_weights(M, LAM[:2], "dapo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_weight_reproduces_the_batch_loss_in_pieces(loss_type):
    """Two micro-batches weighted with the whole batch's weights sum to the whole batch's loss."""
    torch.manual_seed(0)
    lengths = [3, 1, 4]
    n, h, v = sum(lengths), 8, 11
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    old = torch.randn(n, dtype=torch.float64) * 0.1 - 2.0
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    kw = dict(loss_type=loss_type, impl="torch")
    whole, _ = fused_linear_grpo_loss(hidden, weight, targets, adv, cu_seqlens=cu, old_logp=old, **kw)
    w = global_sequence_weights(torch.tensor(lengths), torch.ones(3), loss_type).repeat_interleave(
        torch.tensor(lengths)
    )
    parts = 0.0
    for rows, seqs, cu_part in ((slice(0, 4), slice(0, 2), [0, 3, 4]), (slice(4, 8), slice(2, 3), [0, 4])):
        loss, _ = fused_linear_grpo_loss(
            hidden[rows],
            weight,
            targets[rows],
            adv[seqs],
            cu_seqlens=torch.tensor(cu_part, dtype=torch.int32),
            old_logp=old[rows],
            token_weight=w[rows],
            **kw,
        )
        parts = parts + loss
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_token_weight_is_checked():
    logp = torch.zeros(4)
    with pytest.raises(ValueError, match="token_weight: expected weights >= 0"):
        grpo_loss(
            logp,
            None,
            None,
            torch.ones(4),
            token_weight=torch.tensor([1.0, -1.0, 0.0, 0.0]),
            cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="token_weight"):
        grpo_loss(
            logp,
            None,
            None,
            torch.ones(4),
            token_weight=torch.ones(3),
            cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
        )


def test_metric_sums_are_token_weighted():
    s = MetricSums()
    s.add({"ratio": 1.0, "kl": 0.5}, 3)
    s.add({"ratio": 2.0, "kl": 1.5}, 1)
    s.add({"ratio": 100.0}, 0)  # an empty micro-batch counts nothing
    assert s.means() == {"kl": pytest.approx(0.75), "ratio": pytest.approx(1.25)}
