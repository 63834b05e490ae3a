"""``pytest benchmarks/test_cpu_bench.py``: the CPU loss benchmark (``cpu_bench.py``, ``make bench-cpu``)
on one small shape, every provider that is installed, one timed round: the run records each
provider's time, ratio and peak memory and writes its JSON (machine, commit, date). The full table
(the README's shapes) is ``make bench-cpu``. Never asserts on time.
"""

from __future__ import annotations

import json

import cpu_bench
import pytest
import torch

SHAPE = (256, 64, 4096)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_cpu_bench_records_every_provider(dtype_name, tmp_path, monkeypatch):
    monkeypatch.setenv("MGRPO_BENCH_RESULTS", str(tmp_path))
    records = cpu_bench.measure_case(SHAPE, dtype_name, cpu_bench.PROVIDERS, n_rounds=1)
    by_provider = {r["provider"]: r for r in records}
    assert set(by_provider) == set(cpu_bench.PROVIDERS)
    ours = by_provider["torch"]
    assert ours["status"] == "ok", ours.get("error")
    assert ours["ratio_to_torch"] == 1.0 and ours["seconds"] > 0 and ours["peak_extra_mib"] >= 0
    assert by_provider["naive"]["status"] == "ok", by_provider["naive"].get("error")
    liger = by_provider["liger"]
    assert liger["status"] in ("ok", "unavailable"), liger.get("error")
    if liger["status"] == "ok":
        assert liger["ratio_to_torch"] > 0
    path = cpu_bench.write_results(records)
    payload = json.loads(open(path, encoding="utf-8").read())
    assert {"machine", "cpu", "commit", "date", "torch", "threads"} <= set(payload)
    assert len(payload["results"]) == len(records)


@pytest.mark.parametrize("provider", ["naive", "liger", "trl"])
def test_providers_compute_our_loss(provider):
    # every provider of the tables differentiates the same dapo loss: its gradients equal ours (fp32,
    # a tiny shape on CPU); a provider whose package is absent is skipped
    cpu_bench.bl.DEVICE, cpu_bench.bl.DTYPE = "cpu", torch.float32
    inp = cpu_bench.bl.get_inputs((96, 16, 211), "diffuse")
    try:
        cpu_bench.bl.check_available(provider, "fwd_bwd")
        theirs = cpu_bench.bl.make_step(provider, "fwd_bwd", inp)
    except cpu_bench.bl.Unavailable as exc:
        pytest.skip(str(exc))
    ours = cpu_bench.bl.make_step("torch", "fwd_bwd", inp)
    grads = []
    for step in (ours, theirs):
        step()
        grads.append([leaf.grad.clone() for leaf in step.leaves])
    for name, a, b in zip(("hidden", "weight"), *grads):
        torch.testing.assert_close(
            b, a, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{provider} grad {name}: {m}"
        )


def test_gpu_check_dry_run_lists_every_provider():
    # `make gpu-check GPU_CHECK_ARGS=--dry-run` runs on the machine's python, which may lack torch:
    # it lists every provider of bench_lib (the fused LM heads included) without importing it
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, f"{cpu_bench.HERE}/gpu_check.py", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for provider in cpu_bench.bl.PROVIDERS:
        assert f"\n  {provider}: " in out.stdout, provider
    assert "trl: trl:" in out.stdout and "quack: quack:" in out.stdout
