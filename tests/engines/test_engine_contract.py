"""The ``Engine`` contract: every engine has the protocol's members with its signatures, the protocol is
what the trainer uses, and one scenario (engine_scenario.py: updates, a NaN update, checkpoint, resume,
export) gives the same results through FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU ranks as in one process.
One torchrun launch per engine (~15-25 s each on 2 cores)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CHATML, byte_tokenizer
from engine_scenario import CLIP, PLAIN_LR, contract_violations, engine_uses, protocol_members, run_scenario
from torchrun_jobs import REPO, exported_weights, needs_deepspeed, run, torchrun
from trainer_helpers import save_tiny_model

from mgrpo_fast.engines.base import Engine, StepResult
from mgrpo_fast.engines.deepspeed_zero import DeepSpeedEngine
from mgrpo_fast.engines.fsdp2 import FSDP2Engine
from mgrpo_fast.engines.local import LocalEngine

SCENARIO = str(Path(__file__).with_name("engine_scenario.py"))
NONFINITE_MESSAGE = (
    "a NaN/Inf loss under parallel.engine: deepspeed (ZeRO cannot discard reduced gradients); "
    "resume from the last checkpoint with a lower optim.lr, or use parallel.engine: fsdp2"
)
ENGINES = [
    pytest.param("fsdp2", [], id="fsdp2"),
    pytest.param("deepspeed", ["--parallel.zero_stage=2"], id="zero2", marks=needs_deepspeed),
    pytest.param("deepspeed", ["--parallel.zero_stage=3"], id="zero3", marks=needs_deepspeed),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("contract") / "model", byte_tokenizer(CHATML))


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> tuple[dict, Path]:
    """The scenario in this process (no torchrun: ``LocalEngine``): the reference of every engine."""
    out = tmp_path_factory.mktemp("one")
    return run_scenario(model_dir, out, "auto"), out


@pytest.mark.parametrize("cls", [LocalEngine, FSDP2Engine, DeepSpeedEngine])
def test_every_engine_class_has_the_protocols_methods(cls):
    assert contract_violations(cls) == []


def test_a_broken_engine_is_caught():
    class Drifted(LocalEngine):
        def optimizer_step(self, lr: float, loss: float) -> StepResult:  # max_grad_norm forgotten
            return StepResult(0.0, False, lr)

    (violation,) = contract_violations(Drifted)
    assert violation.startswith("Drifted.optimizer_step(self, lr") and "max_grad_norm" in violation
    assert not isinstance(object(), Engine) and "object.backward: missing" in contract_violations(object())


def test_the_protocol_is_what_the_trainer_uses():
    used = set().union(*(engine_uses(p) for p in (REPO / "mgrpo_fast" / "rl").rglob("*.py")))
    assert used == protocol_members(), f"used, not in Engine: {used - protocol_members()}; " + (
        f"in Engine, unused: {protocol_members() - used}"
    )


def test_one_process_scenario(one_process, model_dir):
    result, out = one_process
    steps = result["steps"]
    assert result["world_size"] == 1 and result["nonfinite_error"] is None
    assert [s["skipped"] for s in steps.values()] == [False, False, True, False, False]
    poisoned = steps["poisoned"]
    assert math.isnan(poisoned["loss"]) and math.isnan(poisoned["grad_norm"]) and poisoned["lr"] == PLAIN_LR
    assert steps["clipped"]["grad_norm"] > CLIP  # the clipped step really clipped
    assert steps["resumed"] == steps["clipped"]  # the skipped update left no trace
    base, continued, resumed = (
        exported_weights(Path(model_dir)),
        exported_weights(out / "continued"),
        exported_weights(out / "resumed"),
    )
    assert max(float((resumed[k] - base[k]).abs().max()) for k in resumed) > 1e-3  # the updates moved them
    for k in continued:
        assert torch.equal(resumed[k], continued[k]), k


@pytest.mark.parametrize("engine, extra", ENGINES)
def test_engine_on_two_ranks_matches_one_process(one_process, model_dir, tmp_path, engine, extra):
    run(torchrun(SCENARIO, model_dir, str(tmp_path), engine, *extra), tmp_path)
    two = json.loads((tmp_path / "result.json").read_text())
    one, one_dir = one_process
    assert two["world_size"] == 2
    expected = dict(one["steps"])
    if engine == "deepspeed":  # ZeRO cannot discard a NaN update: the run stops with a clear error
        assert two["nonfinite_error"] == NONFINITE_MESSAGE
        del expected["poisoned"], expected["clipped"]
    else:
        assert two["nonfinite_error"] is None
    assert list(two["steps"]) == list(expected)
    for name, want in expected.items():
        got = two["steps"][name]
        assert got["skipped"] == want["skipped"] and got["lr"] == want["lr"], name
        for key, rtol in (("loss", 1e-6), ("grad_norm", 1e-6)):
            assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-7, nan_ok=True), (name, key)

    one_w, two_w = exported_weights(one_dir / "resumed"), exported_weights(tmp_path / "resumed")
    for k in one_w:
        torch.testing.assert_close(two_w[k], one_w[k], rtol=0, atol=1e-6, msg=k)  # measured 1.2e-7
    if engine != "deepspeed":  # the skipped update left no trace: continuing = resuming
        continued = exported_weights(tmp_path / "continued")
        for k in continued:
            assert torch.equal(two_w[k], continued[k]), k
