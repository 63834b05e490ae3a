"""CPU benchmark of the fused GRPO loss (forward + backward from hidden states): ours beside Liger.

``make bench-cpu`` (``python benchmarks/cpu_bench.py``) and ``pytest benchmarks/test_cpu_bench.py``
run it. For each shape ``(N tokens, H, V)`` and dtype (fp32, bf16) the providers run side by side in
one process, **alternating** (round ``r`` starts with provider ``r mod P``), after one warm-up call
each (Liger's ``torch.compile`` happens there and is reported as ``first_call_s``):

* ``torch``: ``fused_linear_grpo_loss(impl="torch")``, this project's chunked path (one pass for the
  per-token objectives; fp32 logits from bf16 operands);
* ``naive``: the full ``(N, V)`` logits (the GEMM in the input dtype, then fp32, as eager trainers
  do), ``log_softmax``, ``gather``, the same GRPO math; only at shapes whose logits fit
  ``NAIVE_MAX_LOGITS``;
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (compiled loss math, its default), when
  ``liger_kernel`` imports.

The loss is ``dapo`` with ``old_logp`` (ratios straddle the clip range), ``beta = 0``; inputs are
``bench_lib``'s diffuse regime (targets sampled from the model's own distribution). Reported per
provider: median seconds, ``ratio_to_torch`` (its median over ours: > 1 means we are faster), peak
extra resident memory during a call (MiB above the resident size before it, sampled every
millisecond from ``/proc/self/statm``; ``make bench-cpu`` sets ``MALLOC_MMAP_THRESHOLD_`` so freed
blocks leave the resident set), and the load average before and after. Results go to
``benchmarks/results/cpu-<host>-<UTC date>.json`` with the machine, torch/liger versions, threads,
commit and date. Never asserts on time.

Knobs: ``MGRPO_CPU_BENCH_SHAPES="N,H,V;N,H,V"`` (default ``SHAPES``), ``MGRPO_CPU_BENCH_DTYPES``
(``fp32,bf16``), ``MGRPO_CPU_BENCH_PROVIDERS`` (``torch,naive,liger``), ``MGRPO_CPU_BENCH_ROUNDS``
(timed rounds, default 3), ``MGRPO_BENCH_RESULTS`` (output folder).
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_lib as bl  # noqa: E402

SHAPES: tuple[tuple[int, int, int], ...] = ((2048, 576, 49152), (4096, 896, 151936))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("torch", "naive", "liger")
NAIVE_MAX_LOGITS = 1 << 28  # fp32 (N, V) logits of at most 1 GiB (the naive path holds ~3 such blocks)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def env_shapes() -> tuple[tuple[int, int, int], ...]:
    raw = os.environ.get("MGRPO_CPU_BENCH_SHAPES", "").strip()
    if not raw:
        return SHAPES
    return tuple(tuple(int(x) for x in part.split(",")) for part in raw.split(";") if part.strip())


def env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name, "").strip()
    return tuple(x.strip() for x in raw.split(",") if x.strip()) if raw else default


def rounds() -> int:
    return max(1, int(os.environ.get("MGRPO_CPU_BENCH_ROUNDS", "3")))


def resident_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class PeakSampler:
    """Context manager: the peak resident bytes above the level at entry, sampled every ``period_s``."""

    def __init__(self, period_s: float = 1e-3):
        self.period_s, self.peak, self.base = period_s, 0, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.period_s)

    def __enter__(self) -> PeakSampler:
        gc.collect()
        self.base = self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def make_step(provider: str, inp: bl.Inputs) -> bl.Step:
    """The fwd+bwd step of ``provider`` (``bench_lib.make_step`` in ``fwd_bwd`` mode)."""
    if provider == "naive" and inp.shape[0] * inp.shape[2] > NAIVE_MAX_LOGITS:
        raise bl.Unavailable(f"the full logits ({inp.shape[0]} x {inp.shape[2]}) exceed NAIVE_MAX_LOGITS")
    bl.check_available(provider, "fwd_bwd")
    return bl.make_step(provider, "fwd_bwd", inp)


def cast_inputs(inp: bl.Inputs, dtype: torch.dtype) -> bl.Inputs:
    """The same inputs (bf16-exact values) with hidden and weight in ``dtype``."""
    if inp.hidden.dtype == dtype:
        return inp
    out = bl.Inputs(**{**inp.__dict__})
    out.hidden, out.weight = inp.hidden.to(dtype), inp.weight.to(dtype)
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_case(
    shape: tuple[int, int, int], dtype_name: str, providers: tuple[str, ...], n_rounds: int
) -> list[dict[str, Any]]:
    """Warm up every provider, then ``n_rounds`` alternating timed rounds; one record per provider."""
    bl.DEVICE, bl.DTYPE, bl.SAMPLE_CHUNK = "cpu", torch.bfloat16, 256
    base = bl.get_inputs(shape, "diffuse")
    inp = cast_inputs(base, DTYPES[dtype_name])
    steps: dict[str, bl.Step] = {}
    records: dict[str, dict[str, Any]] = {}
    load_before = load_average()
    for provider in providers:
        rec: dict[str, Any] = {"provider": provider, "shape": list(shape), "dtype": dtype_name}
        records[provider] = rec
        try:
            step = make_step(provider, inp)
            with PeakSampler() as peak:
                t0 = time.perf_counter()
                step()
                rec["first_call_s"] = round(time.perf_counter() - t0, 2)
            rec["peak_extra_mib"] = round(peak.extra_mib, 1)
            step.reset()
            steps[provider] = step
        except bl.Unavailable as exc:
            rec.update(status="unavailable", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded; a failure of ours is re-raised by the caller
            rec.update(status="error", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        gc.collect()
    names = list(steps)
    samples: dict[str, list[float]] = {p: [] for p in names}
    for r in range(n_rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for provider in order:
            step = steps[provider]
            with PeakSampler() as peak:
                t0 = time.perf_counter()
                step()
                samples[provider].append(time.perf_counter() - t0)
            step.reset()
            records[provider]["peak_extra_mib"] = round(
                max(records[provider]["peak_extra_mib"], peak.extra_mib), 1
            )
            gc.collect()
    ours = statistics.median(samples["torch"]) if samples.get("torch") else None
    for provider in names:
        med = statistics.median(samples[provider])
        records[provider].update(
            status="ok",
            seconds=round(med, 3),
            seconds_all=[round(s, 3) for s in samples[provider]],
            ratio_to_torch=None if not ours else round(med / ours, 3),
        )
    load_after = load_average()
    for rec in records.values():
        rec.update(load_before=load_before, load_after=load_after, threads=torch.get_num_threads())
    steps.clear()
    return list(records.values())


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "machine": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "liger_kernel": ver("liger-kernel"),
        "python": platform.python_version(),
        "commit": bl.git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def write_results(records: list[dict[str, Any]]) -> str:
    env = environment()
    folder = bl.results_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"cpu-{bl.slug(env['machine'])}-{env['date'][:10]}.json")
    bl.write_json(
        path, {**env, "what": "fused GRPO loss (dapo) fwd+bwd from hidden states", "results": records}
    )
    return path


def table(records: list[dict[str, Any]]) -> str:
    head = ("shape", "dtype", "provider", "s (median)", "x ours", "peak MiB", "first s", "status")
    rows = [
        (
            "x".join(map(str, r["shape"])),
            r["dtype"],
            r["provider"],
            "" if r.get("seconds") is None else f"{r['seconds']:.2f}",
            "" if r.get("ratio_to_torch") is None else f"{r['ratio_to_torch']:.2f}",
            "" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}",
            "" if r.get("first_call_s") is None else f"{r['first_call_s']:.1f}",
            r.get("status", "") + ("" if r.get("status") == "ok" else f": {r.get('error', '')[:50]}"),
        )
        for r in records
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt: Callable[[tuple], str] = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def main() -> int:
    records: list[dict[str, Any]] = []
    providers = env_list("MGRPO_CPU_BENCH_PROVIDERS", PROVIDERS)
    for shape in env_shapes():
        for dtype_name in env_list("MGRPO_CPU_BENCH_DTYPES", tuple(DTYPES)):
            print(f"{'x'.join(map(str, shape))} {dtype_name}: load {load_average()}", flush=True)
            records.extend(measure_case(shape, dtype_name, providers, rounds()))
            print(
                table([r for r in records if r["shape"] == list(shape) and r["dtype"] == dtype_name]),
                flush=True,
            )
            path = write_results(records)  # after every case: an interrupted run keeps what it measured
    print(table(records))
    print(f"results: {path}")
    return 0 if all(r["status"] != "error" for r in records if r["provider"] == "torch") else 1


if __name__ == "__main__":
    sys.exit(main())
