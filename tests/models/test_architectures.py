"""The architecture matrix (``tests/architectures.py``: Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 3),
tiny random-initialized, nothing downloaded. For every architecture:

1. packed log-probs, entropies and gradients equal each sequence alone through the stock transformers
   model (``sdpa``, full logits) to fp32 tolerance, and the sliding window is live in that comparison;
2. the engine contract's scenario (tests/engines/engine_scenario.py: MGRPO updates, a skipped NaN
   update, checkpoint, resume in a fresh trainer, ``save_pretrained`` export) in this process (the
   one-process engine); the export loads back with ``load_policy`` and scores like its weights say;
3. the same scenario on 2 ranks (gloo) with FSDP2, DeepSpeed ZeRO-2 and ZeRO-3: one ``torchrun`` per
   engine runs every architecture, and its losses and weights equal the one-process ones.

Weight sync into a vLLM rollout engine is not covered here (there is no vLLM backend yet).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from architectures import (  # noqa: E402
    ARCHITECTURES,
    SLIDING,
    assert_grads_close,
    grads_of,
    load_reference,
    loss_weights,
    make_sequences,
    reference_logprobs,
    save_architecture,
)
from conftest import CHATML, byte_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "engines"))  # the engine contract's scenario and launcher
from engine_scenario import run_scenario  # noqa: E402
from torchrun_jobs import exported_weights, needs_deepspeed, run, torchrun  # noqa: E402

from mgrpo_fast.models.attention import ATTN_IMPLEMENTATION  # noqa: E402
from mgrpo_fast.models.policy import load_policy, packed_logprobs  # noqa: E402
from mgrpo_fast.packing.microbatch import build_microbatch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(ARCHITECTURES)
SCENARIO = str(Path(__file__).parents[1] / "engines" / "engine_scenario.py")


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, str]:
    """``name -> directory``: each architecture with a byte-level tokenizer (vocab 259) beside it."""
    tokenizer = byte_tokenizer(CHATML)
    root = tmp_path_factory.mktemp("arch")
    return {name: save_architecture(name, root / name, tokenizer=tokenizer) for name in NAMES}


# --------------------------------------------------------------------------------------------
# 1. Packed == unpacked
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_packed_logprobs_and_grads_match_per_sequence(tmp_path, name):
    path = save_architecture(name, tmp_path / name)
    sequences = make_sequences()
    batch = build_microbatch(sequences)
    policy = load_policy(path, dtype=torch.float32, device="cpu")
    assert policy.config._attn_implementation == ATTN_IMPLEMENTATION
    reference = load_reference(path)

    temperature = 0.8
    logp, entropy = packed_logprobs(policy, batch, temperature=temperature, return_entropy=True)
    ref_logp, ref_entropy = reference_logprobs(reference, sequences, temperature)
    assert logp.shape == (batch.num_loss_tokens,) and logp.dtype == torch.float32
    assert (logp - ref_logp).abs().max().item() <= 1e-5
    assert (entropy - ref_entropy).abs().max().item() <= 1e-5

    w_logp, w_ent = loss_weights(logp.numel())
    (logp * w_logp + entropy * w_ent).sum().backward()
    (ref_logp * w_logp + ref_entropy * w_ent).sum().backward()
    assert_grads_close(grads_of(policy), grads_of(reference), name)
    assert len(grads_of(policy)) == len(list(policy.parameters()))  # every parameter got a gradient


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_window_is_live(tmp_path, name):
    """The same weights with a window longer than every sequence give other log-probs on the long
    sequences: the window is in force in the comparison above, not silently dropped by both sides."""
    batch = build_microbatch(make_sequences())
    logps = []
    for window in (None, 4096):
        extra = {} if window is None else {"sliding_window": window}
        path = save_architecture(name, tmp_path / f"{name}-{window}", **extra)
        with torch.no_grad():
            logps.append(packed_logprobs(load_policy(path, dtype=torch.float32, device="cpu"), batch))
    assert (logps[0] - logps[1]).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------
# 2. The engine scenario: updates, checkpoint, resume, export; one process
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(arch_dirs, tmp_path_factory) -> tuple[dict[str, dict], Path]:
    """Every architecture through the scenario in this process (no torchrun: the one-process engine)."""
    out = tmp_path_factory.mktemp("one")
    return {name: run_scenario(path, out / name, "auto") for name, path in arch_dirs.items()}, out


@pytest.mark.parametrize("name", NAMES)
def test_scenario_export_and_resume_one_process(arch_dirs, one_process, name):
    results, root = one_process
    out, steps = root / name, results[name]["steps"]
    assert [s["skipped"] for s in steps.values()] == [False, False, True, False, False]
    base, continued, resumed = (
        exported_weights(Path(arch_dirs[name])),
        exported_weights(out / "continued"),
        exported_weights(out / "resumed"),
    )
    assert resumed.keys() == base.keys()  # tied embeddings: lm_head not written twice
    assert max(float((resumed[k] - base[k]).abs().max()) for k in base) > 1e-3  # the updates moved them
    assert all(torch.isfinite(t).all() for t in resumed.values())
    for k in continued:  # the checkpoint brought back the weights and the AdamW state
        assert torch.equal(resumed[k], continued[k]), k

    # the export loads back (same architecture, the packed attention) and scores like its weights say
    exported = load_policy(out / "resumed", dtype=torch.float32, device="cpu")
    assert type(exported).__name__ == type(load_policy(arch_dirs[name], dtype="fp32", device="cpu")).__name__
    batch = build_microbatch(make_sequences(seed=2)[:6])
    with torch.no_grad():
        reference = reference_logprobs(load_reference(out / "resumed"), make_sequences(seed=2)[:6])[0]
        torch.testing.assert_close(packed_logprobs(exported, batch), reference, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 3. Two ranks (gloo): FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 equal one process
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "engine, extra",
    [
        pytest.param("fsdp2", [], id="fsdp2"),
        pytest.param("deepspeed", ["--parallel.zero_stage=2"], id="zero2", marks=needs_deepspeed),
        pytest.param("deepspeed", ["--parallel.zero_stage=3"], id="zero3", marks=needs_deepspeed),
    ],
)
def test_two_ranks_equal_one_process(arch_dirs, one_process, tmp_path, engine, extra):
    dirs = ",".join(arch_dirs[n] for n in NAMES)
    run(torchrun(SCENARIO, dirs, str(tmp_path), engine, *extra), tmp_path, timeout=600)  # 6 models
    results, root = one_process
    for name in NAMES:
        two = json.loads((tmp_path / name / "result.json").read_text())
        for step, got in two["steps"].items():  # DeepSpeed stops at the NaN update (the contract test)
            want = results[name]["steps"][step]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, nan_ok=True), (name, step)
        one, other = exported_weights(root / name / "resumed"), exported_weights(tmp_path / name / "resumed")
        assert other.keys() == one.keys(), name
        for k in one:
            torch.testing.assert_close(other[k], one[k], rtol=0, atol=1e-5, msg=f"{engine} {name} {k}")
