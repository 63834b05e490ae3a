"""``make gpu-check``: install, CUDA tests and kernel benchmarks on a CUDA machine, in one command.

Meant for a GPU machine that has nothing but this repository and a Python with torch, triton (and
pytest, pytest-benchmark) preinstalled, and no network. Steps, each with a time limit so the whole
run ends inside ``--budget`` seconds (default 470, under 8 minutes):

1. ``pip install --no-build-isolation --no-deps --no-index -e .`` (no network needed; the optional
   C++ extension builds if a compiler is there, and is skipped otherwise). If that fails, the run
   goes on with the repository root on ``PYTHONPATH``.
2. Optional wheels: every ``*.whl`` in ``.whl/`` (e.g. ``cut_cross_entropy``, ``liger_kernel`` for the
   benchmark anchors) is installed without network and without dependencies into a target folder
   (``--site``, default ``/tmp/site``) that is put first on ``PYTHONPATH``::

       python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
           --target /tmp/site .whl/*.whl

   Fill ``.whl/`` on a machine with network (it is git-ignored), for CPython 3.12 manylinux x86_64::

       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
           --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
           --platform manylinux2014_x86_64 -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5 \
           trl==1.16.0 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1

   ``--no-deps`` fetches none of a wheel's requirements: add each one the GPU image lacks, one version each
   (``trl`` imports ``transformers`` and ``accelerate``; ``quack-kernels`` runs on ``nvidia-cutlass-dsl``).
   The benchmark providers (``bench_lib.PROVIDERS``): ours (``triton``, ``torch``), ``naive``, the
   cuBLAS ``floor``, and each fused LM head whose package is there: ``cce`` (Cut Cross-Entropy),
   ``liger`` (Liger-Kernel), ``trl`` (TRL's fused LM head) and ``quack`` (quack-kernels); a missing
   one is recorded as unavailable. ``--dry-run`` lists them and which import.
3. ``pytest tests/kernels/test_cuda_kernels.py`` (real shapes), then, in a second pytest process, the other
   CUDA-capable test files (those that check ``torch.cuda.is_available()``), with
   ``TRITON_INTERPRET`` removed from the environment.
4. ``pytest benchmarks`` (writes ``benchmarks/results/<gpu>-<date>.json``).
5. A summary: each step's outcome and time, and the benchmark table (provider x shape x regime x
   mode: ms, TFLOP/s, ratio to the cuBLAS floor, peak extra GiB).

A failing step or benchmark provider is reported, not fatal: the next step still runs. Exit code:
0 when the install worked, the CUDA tests passed and the benchmarks produced results; 1 otherwise;
2 when there is no CUDA device. ``--dry-run`` prints the steps without running anything.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CUDA_TEST = "tests/kernels/test_cuda_kernels.py"
# CPU-only by design (ahead-of-time compile on the host, minutes): not part of the GPU check.
NOT_GPU_TESTS = {"tests/kernels/test_kernels_compile.py", CUDA_TEST}


@dataclass
class Step:
    name: str
    cmd: list[str]
    cap_s: float  # this step's own time limit
    env: dict[str, str] = field(default_factory=dict)  # overrides on top of the run's environment
    required: bool = True  # a failure makes the exit code 1 (but never stops the run)
    status: str = "not run"
    seconds: float = 0.0
    tail: str = ""


def cuda_capable_tests() -> list[str]:
    """Test files (besides the dedicated CUDA one) that exercise CUDA when it is there."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "**", "test_*.py"), recursive=True)):
        rel = os.path.relpath(path, REPO)
        if rel in NOT_GPU_TESTS:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        if "torch.cuda.is_available()" in text:
            out.append(rel)
    return out


def wheels(whl_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(whl_dir, "*.whl")))


def bench_constants(names: tuple[str, ...]) -> dict[str, object]:
    """Literal constants of ``bench_lib.py`` read without importing it (it imports torch, which the
    machine's python of a dry run may lack)."""
    import ast

    with open(os.path.join(HERE, "bench_lib.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: dict[str, object] = {}
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id in names and node.value is not None:
            found[target.id] = ast.literal_eval(node.value)
    return found


def provider_lines() -> list[str]:
    """The benchmark providers at the GPU shapes, both regimes, both modes, and whether each
    third-party one's package is installed here (nothing is imported)."""
    c = bench_constants(("SHAPES", "REGIMES", "MODES", "PROVIDERS", "PROVIDER_MODULES"))
    shapes = ", ".join("x".join(map(str, s)) for s in c["SHAPES"])
    lines = [
        f"benchmark providers (shapes N x H x V: {shapes}; regimes {', '.join(c['REGIMES'])}; "
        f"modes {', '.join(c['MODES'])}):"
    ]
    for provider in c["PROVIDERS"]:
        module = c["PROVIDER_MODULES"].get(provider)
        if module is None:
            where = "built in"
        else:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            where = f"{module}: {'installed' if found else 'not installed here (a wheel in .whl/ brings it)'}"
        lines.append(f"  {provider}: {where}")
    return lines


def build_steps(args: argparse.Namespace) -> list[Step]:
    py = sys.executable
    steps = [
        Step(
            "install",
            [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
            cap_s=args.install_timeout,
        ),
    ]
    whls = wheels(args.whl_dir)
    if whls:
        steps.append(
            Step(
                "wheels",
                [
                    py,
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--no-cache-dir",
                    "--upgrade",
                    "--target",
                    args.site,
                    *whls,
                ],
                cap_s=args.install_timeout,
                required=False,
            )
        )
    pytest_flags = ["-q", "-p", "no:cacheprovider", "-rfEsx", "--durations=5"]
    steps.append(Step("cuda tests", [py, "-m", "pytest", CUDA_TEST, *pytest_flags], cap_s=args.test_timeout))
    others = cuda_capable_tests()
    if others and not args.skip_other_tests:
        steps.append(
            Step(
                "other CUDA-capable tests",
                [py, "-m", "pytest", *others, *pytest_flags],
                cap_s=args.test_timeout,
            )
        )
    bench_env = {"MGRPO_BENCH_RESULTS": args.results} if args.results else {}
    bench_flags = ["-p", "no:cacheprovider", "-rfEsx", "-q"]
    if importlib.util.find_spec("pytest_benchmark") is not None:
        bench_flags.append("--benchmark-columns=min,median,rounds")
    steps.append(
        Step(
            "benchmarks",
            [py, "-m", "pytest", "benchmarks", *bench_flags],
            cap_s=args.bench_timeout,
            env=bench_env,
        )
    )
    return steps


def base_env(args: argparse.Namespace, with_site: bool, repo_on_path: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo_on_path:
        paths.insert(0, REPO)
    if with_site:
        paths.insert(0, args.site)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_step(step: Step, env: dict[str, str], limit_s: float) -> None:
    """Run ``step`` with output streamed through, stopping it (SIGINT, then SIGKILL) at ``limit_s``."""
    print(f"\n=== {step.name}: {shlex.join(step.cmd)}  (limit {limit_s:.0f}s)", flush=True)
    if limit_s < 5:
        step.status = "skipped: out of time"
        print(f"=== {step.name}: {step.status}", flush=True)
        return
    start = time.monotonic()
    lines: list[str] = []
    proc = subprocess.Popen(
        step.cmd,
        cwd=REPO,
        env={**env, **step.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    timed_out = False
    deadline = start + limit_s

    def stop(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    sel = selectors.DefaultSelector()  # read with a timeout, so the time limit holds while it is silent
    sel.register(proc.stdout, selectors.EVENT_READ)
    interrupted_at = None
    while True:
        now = time.monotonic()
        if not timed_out and now > deadline:
            timed_out, interrupted_at = True, now
            print(f"\n=== {step.name}: time limit reached, interrupting", flush=True)
            stop(signal.SIGINT)  # pytest still prints its summary and writes the results file
        if interrupted_at is not None and now > interrupted_at + 20:
            stop(signal.SIGKILL)
        if sel.select(timeout=1.0):
            line = proc.stdout.readline()
            if not line:
                break
            sys.stdout.write(line)
            lines.append(line)
            del lines[:-60]
        elif proc.poll() is not None:
            rest = proc.stdout.read()
            if rest:
                sys.stdout.write(rest)
                lines.extend(rest.splitlines(keepends=True))
            break
    rc = proc.wait()
    sel.close()
    step.seconds = time.monotonic() - start
    step.tail = "".join(lines[-60:])
    if timed_out:
        step.status = f"timed out after {step.seconds:.0f}s"
    elif rc == 0:
        step.status = "ok"
    else:
        step.status = f"failed (exit {rc})"
    outcome = pytest_outcome(step.tail)
    if outcome:
        step.status += f": {outcome}"
    print(f"=== {step.name}: {step.status} in {step.seconds:.1f}s", flush=True)


def pytest_outcome(tail: str) -> str:
    """pytest's final counts line, e.g. '12 passed, 2 skipped', from the end of its output."""
    for line in reversed(tail.splitlines()):
        if re.search(r"\d+ (passed|failed|skipped|error|errors|xfailed|deselected)", line) and " in " in line:
            return line.strip("= \n")
    return ""


def latest_results(folder: str, since: float) -> str | None:
    paths = [p for p in glob.glob(os.path.join(folder, "*.json")) if os.path.getmtime(p) >= since - 1]
    return max(paths, key=os.path.getmtime) if paths else None


def print_summary(steps: list[Step], results_path: str | None, started: float) -> None:
    print("\n" + "=" * 100)
    print("gpu-check summary")
    width = max(len(s.name) for s in steps)
    for s in steps:
        print(f"  {s.name.ljust(width)}  {s.seconds:6.1f}s  {s.status}")
    print(f"  total {time.monotonic() - started:.1f}s")
    if results_path is None:
        print("benchmarks: no results file was written")
        return
    with open(results_path, encoding="utf-8") as f:
        data = json.load(f)
    print(
        f"\nbenchmarks ({data.get('gpu')}, torch {data.get('torch')}, triton {data.get('triton')}, "
        f"commit {data.get('commit')}, {data.get('date')}): {results_path}"
    )
    sys.path.insert(0, HERE)
    from bench_lib import summary_table

    print(summary_table(data.get("results", [])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    parser.add_argument("--install-timeout", type=float, default=120.0)
    parser.add_argument("--test-timeout", type=float, default=150.0, help="per test step (default 150)")
    parser.add_argument("--bench-timeout", type=float, default=300.0)
    parser.add_argument(
        "--whl-dir", default=os.path.join(REPO, ".whl"), help="optional wheels (default .whl/)"
    )
    parser.add_argument(
        "--site", default="/tmp/site", help="where the wheels are installed (default /tmp/site)"
    )
    parser.add_argument("--results", default="", help="benchmark results folder (default benchmarks/results)")
    parser.add_argument("--copy-results", metavar="DIR", help="also copy the results JSON into DIR")
    parser.add_argument("--skip-other-tests", action="store_true", help="run only the CUDA kernel tests")
    args = parser.parse_args(argv)

    started = time.monotonic()
    steps = build_steps(args)
    has_wheels = any(s.name == "wheels" for s in steps)
    if args.dry_run:
        print(f"gpu-check (dry run) in {REPO}, python {sys.executable}, budget {args.budget:.0f}s")
        whls = wheels(args.whl_dir)
        print(f"wheels in {args.whl_dir}: {', '.join(map(os.path.basename, whls)) or 'none'}")
        env = base_env(args, has_wheels, repo_on_path=False)
        print(f"environment: TRITON_INTERPRET unset; PYTHONPATH={env.get('PYTHONPATH', '')!r}")
        for line in provider_lines():
            print(line)
        for i, s in enumerate(steps, 1):
            extra = " ".join(f"{k}={v}" for k, v in s.env.items())
            print(
                f"{i}. {s.name} (limit {s.cap_s:.0f}s{'' if s.required else ', optional'}): "
                f"{(extra + ' ') if extra else ''}{shlex.join(s.cmd)}"
            )
        print(
            f"{len(steps) + 1}. summary: step outcomes and the benchmark table from the results JSON"
            + (f", copied to {args.copy_results}" if args.copy_results else "")
        )
        return 0

    try:
        import torch

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_name(0) if cuda else None
        print(
            f"python {sys.version.split()[0]}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), GPU: {gpu}"
        )
    except Exception as exc:  # noqa: BLE001
        print(f"gpu-check: torch does not import ({exc})", file=sys.stderr)
        return 2
    if not cuda:
        print("gpu-check: no CUDA device; nothing to check (use --dry-run to see the steps)", file=sys.stderr)
        return 2

    deadline = started + args.budget
    repo_on_path = False
    for step in steps:
        remaining = deadline - time.monotonic() - 5
        # benchmarks take whatever is left; earlier steps leave the benchmarks at least 120 s
        reserve = 0 if step.name == "benchmarks" else min(120.0, max(0.0, remaining / 2))
        env = base_env(args, has_wheels and step.name not in ("install", "wheels"), repo_on_path)
        run_step(step, env, min(step.cap_s, remaining - reserve))
        if step.name == "install" and not step.status.startswith("ok"):
            repo_on_path = True
            print("=== install failed: going on with the repository root on PYTHONPATH", flush=True)

    results_path = latest_results(
        args.results or os.path.join(HERE, "results"), since=time.time() - (time.monotonic() - started)
    )
    if results_path and args.copy_results:
        try:
            os.makedirs(args.copy_results, exist_ok=True)
            shutil.copy2(results_path, args.copy_results)
        except OSError as exc:
            print(f"could not copy the results to {args.copy_results}: {exc}")
    print_summary(steps, results_path, started)
    ok = all(s.status.startswith("ok") for s in steps if s.required and s.name != "benchmarks")
    return 0 if ok and results_path else 1


if __name__ == "__main__":
    sys.exit(main())
