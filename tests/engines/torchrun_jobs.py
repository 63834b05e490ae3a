"""Launching ``torchrun`` jobs from the tests: 2 CPU ranks (gloo), a hang killed with every worker and
reported, the output shown on failure; reading the weights they export. Shared by test_distributed.py
and test_engine_contract.py."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed"
)


def env() -> dict[str, str]:
    """The workers' environment: one thread each, the repository and tests/ importable."""
    out = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out.pop("TRITON_INTERPRET", None)
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), out.get("PYTHONPATH", "")])
    return out


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]


def run(cmd: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; a non-zero exit or a hang (``timeout`` seconds) fails the test."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: kill torchrun *and* its workers, then fail
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"timed out after {timeout} s (a collective mismatch?): {' '.join(cmd)}\n{stderr[-4000:]}"
        )
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (torchrun's workers live in their own process groups)."""
    tree, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", ",".join(map(str, frontier))], capture_output=True, text=True
        ).stdout.split()
        frontier = [int(p) for p in out]
        tree += frontier
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in tree[1:]):
        time.sleep(0.05)


def exported_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``save_pretrained`` directory (one safetensors file: the tiny test models)."""
    return load_file(str(path / "model.safetensors"))
