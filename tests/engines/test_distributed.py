"""torchrun with 2 ranks on CPU (gloo), FSDP2 and DeepSpeed ZeRO: full MGRPO runs, kill-and-resume, and
a rank with no questions. Each case launches real processes (~10 s each). The engines' update against
one process is test_engine_contract.py."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import CHATML, byte_tokenizer
from torchrun_jobs import TIMEOUT, env, exported_weights, kill_tree, needs_deepspeed, run, torchrun
from trainer_helpers import save_tiny_model

HELPERS = str(Path(__file__).parents[1] / "trainer_helpers.py")
ENGINES = ["fsdp2", pytest.param("deepspeed", marks=needs_deepspeed)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("dist") / "model", byte_tokenizer(CHATML))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": f"What is {i}+{i + 1}?", "answer": f"#### {2 * i + 1}"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_args(
    model_dir: str | None, data: Path | None, run_dir: Path, engine: str, *extra: str
) -> list[str]:
    """``mgrpo_fast.train`` arguments; ``model_dir``/``data`` None = the embedded default (bundled model
    and task)."""
    where = [] if model_dir is None else [f"--model.path={model_dir}"]
    where += [] if data is None else [f"--data.train_files=['{data}']", f"--data.eval_files=['{data}']"]
    return [
        "-m",
        "mgrpo_fast.train",
        *where,
        f"--logging.run_dir={run_dir}",
        "--data.instruction=null",
        f"--parallel.engine={engine}",
        "--logging.tensorboard=false",
        "--logging.progress=false",
        "--rollout.max_new_tokens=8",
        "--layer1.mgrpo_group_size=4",
        "--layer2.group_size=2",
        "--layer2.selection=sample:2",
        "--train.questions_per_step=3",
        "--train.total_steps=3",
        "--optim.lr=1e-3",
        "--optim.schedule=constant",  # the killed run is launched with more steps: same LR
        "--train.max_tokens_per_microbatch=200",
        "--reward.num_workers=0",
        f"--reward.functions={{'{HELPERS}:parity_reward': 1.0}}",
        "--checkpoint.every=1",
        "--checkpoint.keep_last=null",
        "--eval.at_end=false",
        *extra,
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_mgrpo_on_two_ranks_with_kill_and_resume(tmp_path, engine):
    """3 MGRPO steps of the embedded default (bundled model and task) on 2 ranks; SIGKILL and resume."""
    model_dir = data_file = None
    full = tmp_path / "full"
    run(torchrun(*_train_args(model_dir, data_file, full, engine)), tmp_path)
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["layer1/groups"] == 3.0 and r["layer2/pairs"] == 6.0 for r in records)  # merged over ranks
    assert (full / "final" / "config.json").is_file()

    # the same run killed (SIGKILL to every process) once its step-2 checkpoint exists, then resumed
    part = tmp_path / "part"
    cmd = torchrun(*_train_args(model_dir, data_file, part, engine, "--train.total_steps=40"))
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = part / "checkpoints" / "step-00000002"
    deadline = time.time() + TIMEOUT
    while not (ckpt / "trainer_state.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    assert (ckpt / "trainer_state.json").is_file()
    run(torchrun(*_train_args(model_dir, data_file, part, engine, f"--checkpoint.resume={ckpt}")), tmp_path)
    a, b = exported_weights(full / "final"), exported_weights(part / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_rank_without_questions_does_not_hang(model_dir, data_file, tmp_path, engine):
    run_dir = tmp_path / "run"
    args = _train_args(
        model_dir,
        data_file,
        run_dir,
        engine,
        "--train.questions_per_step=1",
        "--train.total_steps=2",
        "--eval.at_end=true",
        "--eval.num_problems=1",
    )
    run(torchrun(*args), tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["layer1/groups"] for r in records if "layer1/groups" in r] == [1.0, 1.0]
    assert records[-1]["eval/num_problems"] == 1.0
