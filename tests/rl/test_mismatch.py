"""The sampler–trainer mismatch metrics and the truncated IS weights against the fp64 reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import packed_from_padded, valid_mask

from mgrpo_fast import reference as ref
from mgrpo_fast.packing.microbatch import SequenceSpec, build_microbatch
from mgrpo_fast.rl.mismatch import MismatchSums, microbatch_sampler_logprobs, truncated_is_weights


def _logps(lengths: list[int], seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    old = -torch.rand(len(lengths), width, generator=g, dtype=torch.float64) * 3
    sampler = old + spread * torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    return old, sampler, valid_mask(lengths, width)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [0.5, 1.0, 2.0, 10.0])
def test_tis_weights_equal_the_reference(level, cap):
    lengths = [7, 1, 13, 4, 9]
    old, sampler, mask = _logps(lengths, seed=3, spread=0.4)
    want = ref.truncated_is_weight_ref(old, sampler, mask, cap, level)
    old_p, cu = packed_from_padded(old.float(), lengths)
    sampler_p, _ = packed_from_padded(sampler.float(), lengths)
    got = truncated_is_weights(old_p, sampler_p, cap, level, cu)
    want_p, _ = packed_from_padded(want, lengths)
    assert got.dtype == torch.float32 and got.shape == (sum(lengths),)
    torch.testing.assert_close(got.double(), want_p, rtol=2e-6, atol=1e-7)
    assert float(got.max()) <= cap * (1 + 1e-6) and bool((got > 0).all())


def test_tis_weight_of_a_huge_log_ratio_is_the_cap_not_inf():
    w = truncated_is_weights(torch.tensor([500.0, -500.0]), torch.tensor([0.0, 0.0]), 2.0)
    assert w.tolist() == [2.0, 0.0]


def test_tis_rejects_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(x, x, 2.0, "geometric")
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(x, x, 0.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        truncated_is_weights(x, x, 2.0, "sequence")
    with pytest.raises(ValueError, match="sampler_logp"):
        truncated_is_weights(x, torch.zeros(4), 2.0)


def test_mismatch_metrics_equal_the_reference():
    lengths = [5, 12, 3]
    old, sampler, mask = _logps(lengths, seed=5, spread=0.8)
    want = ref.sampler_mismatch_ref(old, sampler, mask, cap=2.0)
    sums = MismatchSums(cap=2.0)
    for b, n in enumerate(lengths):  # two "micro-batches" worth of rows, any split gives token means
        sums.add(old[b, :n].float(), sampler[b, :n].float())
    got = {k: s / c for k, (s, c) in sums.sums().items()}
    assert 0 < want["beyond_cap"] < 1  # the case exercises the cap
    assert math.isclose(got["rollout/mismatch_abs"], want["abs"], rel_tol=1e-6)
    assert math.isclose(got["rollout/mismatch_kl"], want["kl"], rel_tol=1e-5)
    assert math.isclose(got["rollout/is_beyond_cap"], want["beyond_cap"], rel_tol=1e-12)
    assert math.isclose(got["rollout/is_weight_mean"], want["is_weight"], rel_tol=1e-6)


def test_sampler_logprobs_follow_the_loss_rows_of_a_microbatch():
    seqs = [SequenceSpec([1, 2], [3, 4, 5]), SequenceSpec([6], [7]), SequenceSpec([8, 9, 9], [2, 2])]
    per_sequence = [[-0.1, -0.2, -0.3], [-1.0], [-2.0, -2.5]]
    mb = build_microbatch([seqs[2], seqs[0]], seq_index=[2, 0])
    got = microbatch_sampler_logprobs(mb, per_sequence)
    assert got.tolist() == pytest.approx([-2.0, -2.5, -0.1, -0.2, -0.3])
    with pytest.raises(ValueError, match="sequence 2: 1 values for 2 completion tokens"):
        microbatch_sampler_logprobs(mb, [[-0.1, -0.2, -0.3], [-1.0], [-2.0]])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trainer_tis_loss_is_the_loss_under_the_reference_weights(tmp_path, level):
    """The trainer's TIS (``rollout.is_correction: tis``): the loss of a micro-batch equals the loss of
    the same micro-batch with every token's policy term multiplied by the fp64 reference weights; the
    weights carry no gradient; the mismatch metrics are the reference's."""
    from conftest import padded_from_packed

    from mgrpo_fast.config.loading import load_config
    from mgrpo_fast.rl.trainer import MGRPOTrainer
    from mgrpo_fast.rl.update import microbatch_targets

    config = load_config(None, [
        f"--logging.run_dir={tmp_path / 'run'}", "--logging.tensorboard=false", "--rollout.backend=hf",
        "--rollout.is_correction=tis", "--rollout.is_cap=1.5", f"--rollout.is_level={level}",
        "--reward.num_workers=0", "--loss.beta=0", "--rollout.max_new_tokens=16", "--algo=grpo",
    ])  # fmt: skip
    trainer = MGRPOTrainer(config)
    g = torch.Generator().manual_seed(0)
    vocab = trainer.policy.get_input_embeddings().num_embeddings
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    seqs = [SequenceSpec(ids(p), ids(c)) for p, c in [(5, 7), (3, 1), (8, 12)]]
    mb = build_microbatch(seqs)
    targets = microbatch_targets(mb, torch.tensor([1.0, -0.5, 0.7]), torch.full((3,), 1 / 20))
    (trainer_lp,) = trainer.logprobs(trainer.engine.module, [mb])
    sampler_lp = trainer_lp + 0.5 * torch.randn(trainer_lp.shape, generator=g)  # some ratios beyond the cap
    per_seq = [sampler_lp[a:b].tolist() for a, b in zip(targets.cu_seqlens[:-1], targets.cu_seqlens[1:])]
    (corrected,), metrics = trainer.sampler_mismatch([mb], [targets], [None], per_seq)

    cu, lengths = targets.cu_seqlens, [len(s.completion_ids) for s in seqs]
    old_pad = padded_from_packed(trainer_lp.double(), cu)
    sampler_pad = padded_from_packed(sampler_lp.double(), cu)
    mask = valid_mask(lengths, old_pad.shape[1])
    want_w = ref.truncated_is_weight_ref(old_pad, sampler_pad, mask, 1.5, level)
    want_w, _ = packed_from_padded(want_w, lengths)
    want_metrics = ref.sampler_mismatch_ref(old_pad, sampler_pad, mask, cap=1.5)
    assert 0 < want_metrics["beyond_cap"] < 1
    assert math.isclose(metrics["rollout/mismatch_abs"], want_metrics["abs"], rel_tol=1e-5)
    assert math.isclose(metrics["rollout/is_beyond_cap"], want_metrics["beyond_cap"], rel_tol=1e-9)

    def loss_and_grad(tg):
        trainer.policy.zero_grad(set_to_none=True)
        loss, _ = trainer.engine.module(mb, tg)
        loss.backward()
        head = trainer.policy.get_output_embeddings().weight
        return loss.detach().double(), head.grad.detach().double().clone()

    want = dataclasses.replace(targets, token_weight=(targets.token_weight.double() * want_w).float())
    got_loss, got_grad = loss_and_grad(corrected)
    want_loss, want_grad = loss_and_grad(want)
    plain_loss, _ = loss_and_grad(targets)
    assert not math.isclose(float(want_loss), float(plain_loss), rel_tol=1e-3)  # the correction matters
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)  # fp32 weights, rounded


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trainer_tis_with_kl_equals_the_reference_loss(tmp_path, level):
    """With ``loss.beta > 0`` the TIS weight (the loss's ``vllm_is_ratio``) scales the policy term
    only: the trainer's micro-batch loss equals the fp64 reference loss with ``vllm_is_ratio`` = the
    reference weights, the KL to the reference model unscaled."""
    from conftest import padded_from_packed

    from mgrpo_fast.config.loading import load_config
    from mgrpo_fast.rl.trainer import MGRPOTrainer
    from mgrpo_fast.rl.update import microbatch_targets

    beta, cap = 0.3, 1.5
    config = load_config(None, [
        f"--logging.run_dir={tmp_path / 'run'}", "--logging.tensorboard=false", "--rollout.backend=hf",
        "--rollout.is_correction=tis", f"--rollout.is_cap={cap}", f"--rollout.is_level={level}",
        "--reward.num_workers=0", f"--loss.beta={beta}", "--loss.loss_type=dapo",
        "--rollout.max_new_tokens=16", "--algo=grpo",
    ])  # fmt: skip
    trainer = MGRPOTrainer(config)
    g = torch.Generator().manual_seed(1)
    # The policy moves away from the reference model (a non-zero KL), by little enough that beta * KL
    # does not swamp the policy term the TIS weight scales (the assert below checks it matters).
    with torch.no_grad():
        for p in trainer.policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    vocab = trainer.policy.get_input_embeddings().num_embeddings
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    lengths = [7, 1, 12]
    seqs = [SequenceSpec(ids(p), ids(c)) for p, c in zip([5, 3, 8], lengths)]
    mb = build_microbatch(seqs)
    advantages = torch.tensor([1.0, -0.5, 0.7])
    (ref_lp,) = trainer.logprobs(trainer.ref_module, [mb])
    # dapo: every token weighs 1 / (loss tokens of the batch)
    targets = microbatch_targets(mb, advantages, torch.full((3,), 1 / sum(lengths)), ref_logp=ref_lp)
    (trainer_lp,) = trainer.logprobs(trainer.engine.module, [mb])
    sampler_lp = trainer_lp + 0.5 * torch.randn(trainer_lp.shape, generator=g)
    cu = targets.cu_seqlens
    per_seq = [sampler_lp[a:b].tolist() for a, b in zip(cu[:-1], cu[1:])]
    (corrected,), _ = trainer.sampler_mismatch([mb], [targets], [None], per_seq)
    loss, _ = trainer.engine.module(mb, corrected)

    pad = lambda x: padded_from_packed(x.double(), cu)  # noqa: E731
    mask = valid_mask(lengths, pad(trainer_lp).shape[1])
    w = ref.truncated_is_weight_ref(pad(trainer_lp), pad(sampler_lp), mask, cap, level)
    padded = (pad(trainer_lp), None, pad(ref_lp), advantages.double(), mask)
    want, metrics = ref.grpo_loss_ref(*padded, beta=beta, vllm_is_ratio=w)
    assert float(metrics["kl"]) > 1e-3 and 0 < float(((w > cap - 1e-9) & mask.bool()).sum()) < mask.sum()
    uncorrected, _ = ref.grpo_loss_ref(*padded, beta=beta)
    assert not math.isclose(float(want), float(uncorrected), rel_tol=1e-3)  # the correction matters
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-5, atol=1e-7)
