"""The trainer end to end on a tiny random model: steps, metrics, checkpoints, resume, faults."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHATML, byte_tokenizer
from trainer_helpers import save_tiny_model

from mgrpo_fast.config.loading import load_config
from mgrpo_fast.data.problems import DataError, Problem
from mgrpo_fast.engines.base import NonFiniteLossError
from mgrpo_fast.rl.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from mgrpo_fast.rl.run_log import read_metrics
from mgrpo_fast.rl.trainer import MGRPOTrainer, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

HELPERS = str(Path(__file__).parents[1] / "trainer_helpers.py")
PROBLEMS = [Problem(id=str(i), question=f"What is {i}+{i + 1}?", answer=str(2 * i + 1)) for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", byte_tokenizer(CHATML))


def _config(model_dir: str, run_dir: Path, *extra: str, reward: str = "parity_reward"):
    return load_config(
        None,
        [
            f"--model.path={model_dir}",
            f"--logging.run_dir={run_dir}",
            "--logging.tensorboard=false",
            "--logging.progress=false",
            "--rollout.max_new_tokens=10",
            "--layer1.mgrpo_group_size=4",
            "--layer2.group_size=2",
            "--layer2.selection=sample:2",
            "--train.questions_per_step=2",
            "--train.total_steps=3",
            "--optim.lr=1e-3",
            "--optim.warmup_steps=1",
            f"--reward.functions={{'{HELPERS}:{reward}': 1.0}}",
            "--reward.num_workers=0",
            "--checkpoint.every=1",
            "--eval.at_end=false",
            "--data.instruction=null",
            "--rollout.backend=hf",  # bitwise determinism (resume = uninterrupted) is the hf backend's
            *extra,
        ],
    )


def _trainer(model_dir, run_dir, *extra, reward="parity_reward") -> MGRPOTrainer:
    return MGRPOTrainer(
        _config(model_dir, run_dir, *extra, reward=reward),
        train_problems=PROBLEMS,
        eval_problems=PROBLEMS[:3],
    )


def _weights(trainer: MGRPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def test_three_mgrpo_steps_end_to_end(model_dir, tmp_path):
    trainer = _trainer(model_dir, tmp_path / "run", "--eval.at_end=true")
    before = _weights(trainer)
    last = trainer.train()
    assert trainer.step == 3
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])
        assert r["layer2/pairs"] == 4.0  # sample:2 of 2 questions
        for key in (
            "layer1/accuracy",
            "layer2/delta_i_to_c",
            "layer2/delta_c_to_i",
            "train/entropy",
            "time/rollout",
            "time/scoring",
            "time/update",
            "train/tokens",
            "reward1/timeouts",
        ):
            assert key in r, key
    assert "eval/acc_t2" in last
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2, 3]  # keep_last=2
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)


def test_grpo_runs_layer1_only(model_dir, tmp_path):
    trainer = _trainer(model_dir, tmp_path / "run", "--algo=grpo", "--train.total_steps=1")
    assert trainer.config.layer1.group_size == 4 + 2 * 2  # equal budget: G1 + |S|·G2
    m = trainer.train()
    assert "layer2/pairs" not in m and m["layer1/groups"] == 2.0


def test_mu_updates_reference_model_and_gradient_checkpointing(model_dir, tmp_path):
    t = _trainer(
        model_dir,
        tmp_path / "run",
        "--loss.mu=2",
        "--loss.beta=0.04",
        "--train.total_steps=1",
        "--model.gradient_checkpointing=true",
        "--logging.tensorboard=true",
    )
    assert t.ref_module is not None and not any(p.requires_grad for p in t.ref_module.parameters())
    m = t.train()
    assert t.updates == 2
    # the metrics are the second update's: off-policy now (ratio != 1) and away from the reference
    assert m["train/ratio"] != 1.0 and m["train/kl"] > 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert _trainer(model_dir, tmp_path / "b0").ref_module is None  # beta = 0: no reference model


def test_resume_equals_uninterrupted_run(model_dir, tmp_path):
    full = _trainer(model_dir, tmp_path / "a", "--train.total_steps=4")
    full.train()
    # the same run, killed after its step-2 checkpoint ...
    part = _trainer(model_dir, tmp_path / "b", "--train.total_steps=4")
    for _ in range(2):
        part.train_step()
    part.save_checkpoint()
    part.scorer.close()
    del part
    # ... and resumed in a fresh process-like trainer
    resumed = _trainer(model_dir, tmp_path / "b", "--train.total_steps=4", "--checkpoint.resume=true")
    resumed.train()
    assert resumed.step == 4
    a, b = full.policy.state_dict(), resumed.policy.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    ma = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    mb = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in mb] == [3, 4]
    for ra, rb in zip(ma[2:], mb):
        assert ra["train/loss"] == pytest.approx(rb["train/loss"], abs=1e-9)
        assert ra["layer1/reward_mean"] == rb["layer1/reward_mean"]


def test_microbatch_split_does_not_change_the_gradient(model_dir, tmp_path):
    """Global normalization: one micro-batch or many, the accumulated gradient is the same."""
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        grads = []
        for budget in (100000, 150):
            t = _trainer(
                model_dir,
                tmp_path / f"{loss_type}{budget}",
                f"--loss.loss_type={loss_type}",
                f"--train.max_tokens_per_microbatch={budget}",
                "--layer2.loss_weight=0.5",
            )
            r = t.rollout(1, {"rollout": 0.0, "scoring": 0.0})
            _, batch = t.compute_advantages(r)
            mbs, weights = t.pack(batch)
            from mgrpo_fast.rl.update import MetricSums, microbatch_targets

            targets = [microbatch_targets(mb, batch.advantages, weights) for mb in mbs]
            loss = t.forward_backward(mbs, targets, MetricSums())
            assert math.isfinite(loss)
            grads.append((len(mbs), loss, {n: p.grad.clone() for n, p in t.policy.named_parameters()}))
            t.scorer.close()
        (n1, l1, g1), (n2, l2, g2) = grads
        assert n1 == 1 and n2 > 1
        assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-7)
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7)


def test_hanging_and_raising_rewards_do_not_stop_training(model_dir, tmp_path):
    t = _trainer(
        model_dir,
        tmp_path / "hang",
        "--train.total_steps=1",
        "--reward.num_workers=1",
        "--reward.timeout_s=0.5",
        reward="hanging_reward",
    )
    m = t.train()
    assert t.step == 1 and m["reward1/timeouts"] + m["reward2/timeouts"] > 0
    t = _trainer(model_dir, tmp_path / "raise", "--train.total_steps=1", reward="raising_reward")
    m = t.train()
    assert t.step == 1 and m["reward1/errors"] + m["reward2/errors"] > 0


def test_nonfinite_loss_is_skipped_then_stops(model_dir, tmp_path):
    t = _trainer(model_dir, tmp_path / "nan", "--train.max_nonfinite_updates=2")
    with torch.no_grad():
        t.policy.lm_head.weight[3, 0] = float("nan")  # poisons every log-prob, not the sampling
    t.backend = type(t.backend)(_trainer(model_dir, tmp_path / "ok").policy, t.tokenizer)
    before = t.policy.lm_head.weight.detach().clone()
    m = t.train_step()
    assert m["train/skipped_updates"] == 1.0
    torch.testing.assert_close(t.policy.lm_head.weight, before, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_updates=2"):
        t.train_step()


def test_lr_schedule():
    kw = dict(peak=1.0, total=10, warmup=2, min_ratio=0.1)
    assert [lr_at(u, schedule="cosine", **kw) for u in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(6, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(9, schedule="constant", **kw) == 1.0


def test_checkpoint_is_atomic(model_dir, tmp_path):
    from mgrpo_fast.rl.checkpoint import write_atomically

    def broken(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path, 5, broken)
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.iterdir())


def test_resume_from_a_missing_checkpoint_names_it(model_dir, tmp_path):
    t = _trainer(model_dir, tmp_path / "r", f"--checkpoint.resume={tmp_path / 'nope'}")
    with pytest.raises(CheckpointError, match="does not exist"):
        t.train()


def test_bad_data_file_is_named(model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = _config(model_dir, tmp_path / "run", f"--data.train_files=['{empty}']")
    with pytest.raises(DataError, match="empty.jsonl"):
        MGRPOTrainer(cfg)


def test_cli_rejects_a_bad_value_with_its_path(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mgrpo_fast.train", "--optim.lr=-1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "optim.lr" in out.stderr and "> 0" in out.stderr


def test_eval_cli(model_dir, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(json.dumps({"question": p.question, "answer": f"#### {p.answer}"}) + "\n" for p in PROBLEMS)
    )
    out = tmp_path / "eval.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgrpo_fast.cli.evaluate",
            "--model",
            model_dir,
            "--data",
            str(data),
            "--num-problems",
            "3",
            "--max-new-tokens",
            "6",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "Acc@t1" in r.stdout
    res = json.loads(out.read_text())[model_dir]
    assert res["num_problems"] == 3
    assert res["delta"] == pytest.approx(res["delta_i_to_c"] - res["delta_c_to_i"])
