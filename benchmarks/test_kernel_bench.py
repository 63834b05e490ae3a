"""Kernel benchmarks: log-probs (forward) and the fused GRPO loss (forward + backward) at LLM shapes.

Each case is one (shape, regime, mode, provider); see ``bench_lib.py`` for the providers, the
regimes and what is reported. Timing: two warm-up calls (the first compiles/autotunes and is
recorded as ``first_call_s``), then up to ``MGRPO_BENCH_REPS`` calls within ``MGRPO_BENCH_BUDGET_S``,
each bracketed by CUDA events and synchronized; pytest-benchmark drives those calls (``pedantic``)
and carries the record in ``extra_info``; the reported ms is the median of the CUDA-event times.

Outcomes: a provider that is not installed (``cce``, ``liger``) or has no such mode is skipped and
recorded as ``unavailable``. Out of memory is recorded as ``oom``, any other error as ``error``;
such a failure fails the test for this project's providers and the floor, and is an expected
failure (xfail, recorded) for the third-party baselines. CUDA only: skipped cleanly on CPU.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA GPU", allow_module_level=True)

import bench_lib as bl  # noqa: E402

CASES = bl.cases()


def _benchmark_fixture(request):
    try:
        return request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:  # pytest-benchmark not installed: time with our own loop
        return None


def _save() -> None:
    """Write the results so far: an interrupted run (time limit, Ctrl-C) keeps what it measured."""
    try:
        bl.write_results()
    except Exception as exc:  # noqa: BLE001 - the session end tries again and reports
        print(f"could not write benchmark results: {exc}")


@pytest.mark.parametrize(("shape", "regime", "mode", "provider"), CASES, ids=[bl.case_id(*c) for c in CASES])
def test_kernel_bench(request, shape, regime, mode, provider):
    failure: tuple[str, str] | None = None
    inputs = step = timer = None
    try:
        bl.check_available(provider, mode)
        inputs = bl.get_inputs(shape, regime)
        step = bl.make_step(provider, mode, inputs)
        first_s, second_s = bl.warm_up(step)
        reps = bl.plan_reps(second_s)
        step.reset()  # drop the warm-up's gradients: they are the step's output, counted as extra
        bl.free_memory()
        base = torch.cuda.memory_allocated()  # the inputs' footprint
        torch.cuda.reset_peak_memory_stats()
        timer = bl.EventTimer(step)
        bench = _benchmark_fixture(request)
        if bench is not None:
            bench.pedantic(timer, rounds=reps, iterations=1, warmup_rounds=0)
        else:
            for _ in range(reps):
                timer()
        peak = torch.cuda.max_memory_allocated() - base
        rec = bl.make_record(
            shape,
            regime,
            mode,
            provider,
            status="ok",
            samples=timer.ms,
            peak_extra_bytes=peak,
            first_call_s=first_s,
            inputs=inputs,
        )
        if bench is not None:
            bench.extra_info.update(rec)
    except bl.Unavailable as exc:
        failure = ("unavailable", str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded, then reported below
        kind = "oom" if bl.is_oom(exc) else "error"
        failure = (kind, f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
    # Out of the except block the traceback, and the tensors its frames hold, are gone.
    if step is not None:
        step.reset()
    del step, timer
    bl.free_memory()
    if failure is not None:
        status, message = failure
        bl.make_record(
            shape,
            regime,
            mode,
            provider,
            status=status,
            inputs=inputs,
            error=None if status == "unavailable" else message,
        )
    _save()
    if failure is None:
        return
    if status == "unavailable":
        pytest.skip(message)
    if provider in ("cce", "liger"):
        pytest.xfail(f"{provider} {status}: {message}")
    pytest.fail(f"{provider} {status}: {message}")
