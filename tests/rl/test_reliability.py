"""Nothing lost, nothing silently wrong: checkpoint files that cannot run code, a graceful stop on
SIGTERM/SIGINT, one run per run directory, a resume that refuses a changed config, damaged checkpoints
skipped, a full disk reported with the path, a hanging in-process reward bounded, a run stopped by
NaN/Inf leaving its last good state."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHATML, byte_tokenizer
from trainer_helpers import save_tiny_model

from mgrpo_fast.config.loading import load_config
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.engines.base import NonFiniteLossError
from mgrpo_fast.rl.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_rng_state,
    save_rng_state,
    verify_checkpoint,
)
from mgrpo_fast.rl.run_dir import RunDirectoryError, RunDirectoryLock
from mgrpo_fast.rl.scorer import RewardScorer
from mgrpo_fast.rl.trainer import MGRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
HELPERS = str(REPO / "tests" / "trainer_helpers.py")
PROBLEMS = [Problem(id=str(i), question=f"What is {i}+{i + 1}?", answer=str(2 * i + 1)) for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", byte_tokenizer(CHATML))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": p.question, "answer": f"#### {p.answer}"} for p in PROBLEMS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _args(model_dir: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"--model.path={model_dir}",
        f"--logging.run_dir={run_dir}",
        "--logging.tensorboard=false",
        "--logging.progress=false",
        "--rollout.max_new_tokens=8",
        "--rollout.backend=hf",  # exact resume; the vLLM backend's runs are tests/rl/test_vllm_rollout.py
        "--layer1.mgrpo_group_size=4",
        "--layer2.group_size=2",
        "--layer2.selection=sample:2",
        "--train.questions_per_step=2",
        "--train.total_steps=2",
        "--optim.lr=1e-3",
        f"--reward.functions={{'{HELPERS}:parity_reward': 1.0}}",
        "--reward.num_workers=0",
        "--checkpoint.every=1",
        "--checkpoint.keep_last=null",
        "--checkpoint.export_final=false",
        "--eval.at_end=false",
        "--data.instruction=null",
        *extra,
    ]


def _trainer(model_dir: str, run_dir: Path, *extra: str) -> MGRPOTrainer:
    cfg = load_config(None, _args(model_dir, run_dir, *extra))
    return MGRPOTrainer(cfg, train_problems=PROBLEMS, eval_problems=PROBLEMS[:2])


# ---------------------------------------------------------------- checkpoint files cannot run code
class _Payload:
    """Unpickling this creates a marker file: proof that loading ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("victim", ["rng_rank0.safetensors", "rng_rank0.pt", "optimizer.pt"])
def test_a_crafted_checkpoint_file_cannot_run_code(model_dir, tmp_path, victim):
    _trainer(model_dir, tmp_path / "run").train()
    newest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "pwned"
    (newest / victim).write_bytes(pickle.dumps(_Payload(str(marker))))
    (newest / "manifest.json").unlink()  # an attacker rewrites the manifest too; do not rely on it
    trainer = _trainer(model_dir, tmp_path / "run", f"--checkpoint.resume={newest}")
    try:
        trainer.train()
    except (CheckpointError, pickle.UnpicklingError, RuntimeError):
        pass  # refusing the file is fine; running it is not
    assert not marker.exists()


def test_rng_state_round_trips_as_data(tmp_path):
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_rng_state(tmp_path / "rng.safetensors")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    from mgrpo_fast.rl.checkpoint import restore_rng_state

    restore_rng_state(load_rng_state(tmp_path / "rng.safetensors"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


# ---------------------------------------------------------------- one run per run directory
def test_a_second_run_on_a_locked_directory_names_the_owner(model_dir, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mgrpo_fast.rl.run_dir import RunDirectoryLock; "
            f"RunDirectoryLock({str(tmp_path / 'run')!r}).acquire(); print('locked', flush=True); "
            "time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=rf"{tmp_path / 'run'}.*in use.*pid {holder.pid}"):
            _trainer(model_dir, tmp_path / "run").train()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale and the next run takes it over
    _trainer(model_dir, tmp_path / "run").train()
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1, 2]


def test_the_lock_is_released_after_a_run(tmp_path):
    with RunDirectoryLock(tmp_path):
        with pytest.raises(RunDirectoryError, match="in use"):
            RunDirectoryLock(tmp_path).acquire()
    RunDirectoryLock(tmp_path).acquire().release()


def test_a_fresh_run_never_mixes_with_a_previous_one(model_dir, tmp_path):
    run = tmp_path / "run"
    _trainer(model_dir, run).train()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(RunDirectoryError, match="holds a previous run.*--resume.*--overwrite"):
        _trainer(model_dir, run, "--seed=1").train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # untouched
    t = _trainer(model_dir, run, "--seed=1", "--logging.overwrite=true", "--train.total_steps=1")
    t.train()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # the old run's metrics are gone, not appended to


# ---------------------------------------------------------------- resume refuses a changed config
def test_resume_with_a_changed_config_lists_the_fields(model_dir, tmp_path):
    run = tmp_path / "run"
    _trainer(model_dir, run, "--train.total_steps=1").train()
    with pytest.raises(RunDirectoryError, match=r"loss\.epsilon_high: 0\.2 -> 0\.3.*allow_changes"):
        _trainer(model_dir, run, "--resume", "--loss.epsilon_high=0.3").train()
    # a safe field (more steps) needs no permission; an unsafe one can be allowed explicitly
    t = _trainer(model_dir, run, "--resume", "--loss.epsilon_high=0.3", "--checkpoint.allow_changes=[loss.*]")
    t.train()
    assert t.step == 2


# ---------------------------------------------------------------- damaged checkpoints
def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning(model_dir, tmp_path, caplog):
    run = tmp_path / "run"
    _trainer(model_dir, run).train()
    (step1, _), (step2, newest) = list_checkpoints(run / "checkpoints")
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert any("model.safetensors has" in p for p in verify_checkpoint(newest))
    assert latest_checkpoint(run / "checkpoints").name.endswith(f"{step1:08d}")
    t = _trainer(model_dir, run, "--resume", "--train.total_steps=2")
    t.train()
    assert "damaged" in caplog.text and t.step == 2


def test_checkpoint_verification_is_cheap(model_dir, tmp_path):
    """The resume-time verification reads the manifest, stats each file and hashes the small ones."""
    _trainer(model_dir, tmp_path / "run", "--train.total_steps=1").train()
    newest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    expected = {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_rank0.safetensors"}
    assert expected <= set(manifest)
    assert all("sha256" in e for e in manifest.values())  # a tiny model: every file is hashed
    assert verify_checkpoint(newest) == []


# ---------------------------------------------------------------- a full disk
def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(model_dir, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the second checkpoint's model file fail to write."""
    run = tmp_path / "run"
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from mgrpo_fast.config.loading import load_config
from mgrpo_fast.rl.trainer import MGRPOTrainer
from mgrpo_fast.rl.checkpoint import CheckpointWriteError
from mgrpo_fast.data.problems import Problem
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
cfg = load_config(None, {_args(model_dir, run, "--train.total_steps=2")!r})
problems = [Problem(id=str(i), question=f"What is {{i}}+{{i + 1}}?", answer=str(2 * i + 1)) for i in range(8)]
t = MGRPOTrainer(cfg, train_problems=problems, eval_problems=problems[:2])
t.train_step()
t.save_checkpoint()
limit = (t.run_dir / "checkpoints" / "step-00000001" / "model.safetensors").stat().st_size // 2
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
t.train_step()
try:
    t.save_checkpoint()
except CheckpointWriteError as e:
    print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "ERROR checkpoint: writing" in out.stdout, out.stderr[-2000:]
    assert ".tmp-step-00000002" in out.stdout and "bytes free" in out.stdout and "needs about" in out.stdout
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1]
    assert verify_checkpoint(run / "checkpoints" / "step-00000001") == []
    assert not list((run / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------- graceful stop
def _train_cmd(model_dir: str, train_file: str, run_dir: Path, *extra: str) -> list[str]:
    args = _args(model_dir, run_dir, f"--data.train_files=['{train_file}']", *extra)
    return [sys.executable, "-u", "-m", "mgrpo_fast.train", *args]


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(json.loads(x)["step"] >= step for x in metrics.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("the run did not reach step 1 in time")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_exits_0(model_dir, train_file, tmp_path, signum):
    run = tmp_path / "run"
    cmd = _train_cmd(model_dir, train_file, run, "--train.total_steps=1000", "--checkpoint.every=1000")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, proc, 1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    saved = list_checkpoints(run / "checkpoints")
    assert len(saved) == 1 and saved[0][0] >= 1  # the step in flight finished and was saved
    assert "--resume" in err
    resumed = subprocess.run(
        _train_cmd(model_dir, train_file, run, "--resume", f"--train.total_steps={saved[0][0] + 1}"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list_checkpoints(run / "checkpoints")[-1][0] == saved[0][0] + 1


def test_a_second_signal_stops_at_once(model_dir, train_file, tmp_path):
    run = tmp_path / "run"
    cmd = _train_cmd(
        model_dir,
        train_file,
        run,
        "--train.total_steps=1000",
        "--checkpoint.every=1000",
        "--rollout.max_new_tokens=300",  # long steps: the second signal arrives mid-step
    )
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, proc, 1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (run / ".lock").read_text().strip()  # the lock was released on the way out


# ---------------------------------------------------------------- in-process reward timeout
def test_a_hanging_in_process_reward_times_out(tmp_path):
    scorer = RewardScorer([f"{HELPERS}:hanging_reward"], timeout_s=0.5, num_workers=0)
    start = time.monotonic()
    result = scorer.score(["abc", "ab"], ["1", "1"])  # length 3 hangs, length 2 returns 0.5
    assert time.monotonic() - start < 10
    assert result.num_timeouts == 1 and result.rewards.tolist() == [0.0, 0.5]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no timer left running
    scorer.close()


# ---------------------------------------------------------------- NaN/Inf stops with the last good state
def test_a_non_finite_stop_leaves_the_last_good_checkpoint(model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    once = "--train.max_nonfinite_updates=1"
    t = _trainer(model_dir, run, "--train.total_steps=3", "--checkpoint.every=100", once)
    good = {k: v.clone() for k, v in t.policy.state_dict().items()}
    original = t.forward_backward

    def poisoned(*args, **kwargs):
        original(*args, **kwargs)
        return float("nan")

    monkeypatch.setattr(t, "forward_backward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        t.train()
    newest = latest_checkpoint(run / "checkpoints")
    assert newest is not None and newest.name == "step-00000000"
    from safetensors.torch import load_file

    saved = load_file(str(newest / "model.safetensors"))
    assert all(torch.equal(saved[k], good[k]) for k in saved)
    assert os.path.getsize(run / ".lock") == 0


# ---------------------------------------------------------------- config values that cannot work
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused_by_name(value):
    with pytest.raises(ValueError, match=r"optim\.lr: expected a finite number"):
        load_config(None, [f"--optim.lr={value}"])


@pytest.mark.parametrize("key", ["layer1.group_size", "layer1.mgrpo_group_size", "layer2.group_size"])
def test_a_group_of_one_is_refused(key):
    with pytest.raises(ValueError, match=rf"{key}: .*>= 2 \(a group of one has zero advantage"):
        load_config(None, [f"--{key}=1"])


def test_the_eval_limit_key_moved_to_eval_num_problems(caplog):
    cfg = load_config(None, ["--data.eval_limit=7"])
    assert cfg.eval.num_problems == 7 and "moved to eval.num_problems" in caplog.text


# ---------------------------------------------------------------- prompts longer than the context
def _long_problems() -> list[Problem]:
    return [*PROBLEMS[:4], Problem(id="huge", question="x" * 5000, answer="1"), *PROBLEMS[4:]]


def test_overlong_prompts_are_skipped_before_step_1(model_dir, tmp_path, caplog):
    cfg = load_config(None, _args(model_dir, tmp_path / "run", "--train.total_steps=1"))
    t = MGRPOTrainer(cfg, train_problems=_long_problems(), eval_problems=PROBLEMS[:2])
    assert [p.id for p in t.train_problems] == [p.id for p in PROBLEMS]
    assert "skipping 1 of 9 problems" in caplog.text and "huge" in caplog.text
    t.train()  # and the run trains on the rest


def test_overlong_prompts_can_refuse_the_run_naming_the_rows(model_dir, tmp_path):
    cfg = load_config(None, _args(model_dir, tmp_path / "run", "--data.overlong=error"))
    with pytest.raises(ValueError, match=r"data\.overlong: error: 1 of 9 prompts .* huge \(\d+ tokens"):
        MGRPOTrainer(cfg, train_problems=_long_problems(), eval_problems=PROBLEMS[:2])


def test_max_prompt_tokens_is_honoured(model_dir, tmp_path):
    cfg = load_config(None, _args(model_dir, tmp_path / "run", "--data.max_prompt_tokens=40"))
    t = MGRPOTrainer(cfg, train_problems=PROBLEMS + [Problem(id="long", question="y" * 60, answer="2")])
    assert "long" not in [p.id for p in t.train_problems]


def test_the_context_check_counts_the_guiding_turns_markers(model_dir, tmp_path):
    """layer2.guiding_turn: user puts the phrase in a user turn: the template's end-of-turn, user and
    assistant markers take context too, so exactly that many fewer question lengths fit (byte-level
    tokenizer: one character, one token)."""
    phrase = "Check it."
    lengths = range(700, 1000)
    problems = [Problem(id=str(n), question="x" * n, answer="1") for n in lengths]
    kept = {}
    for turn in ("assistant", "user"):
        extra = (
            f"--layer2.guiding_turn={turn}",
            f"--layer2.guiding_phrases=['{phrase}']",
            "--train.total_steps=1",
        )
        cfg = load_config(None, _args(model_dir, tmp_path / turn, *extra))
        kept[turn] = len(
            MGRPOTrainer(cfg, train_problems=problems, eval_problems=PROBLEMS[:1]).train_problems
        )
    markers = "<|im_end|>\n<|im_start|>user\n" + "<|im_end|>\n<|im_start|>assistant\n"  # CHATML's
    tokenizer = byte_tokenizer(CHATML)
    extra_tokens = len(tokenizer.encode(markers + phrase, add_special_tokens=False)) - len(
        tokenizer.encode("\n\n" + phrase, add_special_tokens=False)
    )
    assert 0 < kept["user"] < kept["assistant"] < len(lengths)
    assert kept["assistant"] - kept["user"] == extra_tokens
