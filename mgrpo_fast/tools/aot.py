"""Ahead-of-time compile check of every Triton kernel, for GPUs this machine does not have.

``python -m mgrpo_fast.tools.aot [--targets 80,90] [--json out.json]`` imports every kernel module
``mgrpo_fast.kernels.<name>`` (each ``.py`` file of the kernels folder whose name does not start
with ``_``), takes its ``aot_specs()`` (see ``kernels/_common.py``: one ``AotSpec`` per kernel,
dtype and config its launchers can pick) and compiles each spec for each target with::

    triton.compile(ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs),
                   target=GPUTarget("cuda", cc, 32),
                   options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})

No GPU is needed: Triton lowers to PTX and runs its bundled ``ptxas`` to a cubin on the CPU. For
each (spec, target) it records the shared memory the kernel needs (``metadata.shared``, checked
against ``SHARED_MEMORY_LIMITS[cc]``), registers and spill bytes (from ``ptxas -v``; registers also
from ``cuobjdump -res-usage``), which tensor-core instructions the PTX uses (``wgmma`` on sm_90,
``mma`` otherwise) and the compile seconds. It prints a table and exits non-zero when anything
fails: a module that does not import, has no ``aot_specs`` or returns an empty list (every kernel
file must be checkable), a spec that does not compile, or one that needs more shared memory than
the chip has.

It refuses to run under ``TRITON_INTERPRET=1``: interpreted kernels are plain Python functions and
cannot be compiled. By default every spec is compiled afresh (``TRITON_ALWAYS_COMPILE``), so the
seconds are real and ptxas reports spills; ``--cache`` allows Triton's on-disk cache instead
(faster re-runs; spills then show as unknown for cache hits). Compiles run in a process pool
(``--workers``, default 2): ``ptxas`` and the MLIR passes are single-threaded.

Exit codes: 0 all specs compiled and fit, 1 something failed, 2 bad usage (e.g. TRITON_INTERPRET).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

KERNELS_PACKAGE = "mgrpo_fast.kernels"
DEFAULT_TARGETS = (80, 90)


class AotUsageError(RuntimeError):
    """The harness cannot run in this environment (e.g. under the Triton interpreter)."""


@dataclass
class CompileResult:
    """One (spec, target) compile. ``error`` is None when it compiled and fits."""

    module: str
    spec: str
    cc: int
    ok: bool = False
    error: str | None = None
    shared: int | None = None  # bytes of (dynamic) shared memory per block
    shared_limit: int | None = None
    registers: int | None = None  # per thread
    spill_stores: int | None = None  # bytes; None = unknown (cache hit without a ptxas log)
    spill_loads: int | None = None
    stack: int | None = None  # bytes of stack frame per thread
    mma: str | None = None  # "wgmma", "mma" or "none": tensor-core instructions in the PTX
    wgmma: bool | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    seconds: float | None = None
    cache_hit: bool | None = None
    tags: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Environment and discovery
# ----------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """Same rule as ``kernels/_common.interpreting``: any value but "" and "0" turns it on."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_environment() -> None:
    if interpreting():
        raise AotUsageError(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} is set: under the interpreter "
            "@triton.jit kernels are Python functions and cannot be compiled for a GPU. Run without it, "
            "e.g. `env -u TRITON_INTERPRET python -m mgrpo_fast.tools.aot`."
        )
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise AotUsageError(
            f"triton is not importable ({exc}); install the dev extra (triton==3.6.*)"
        ) from exc


def discover_modules() -> list[str]:
    """Every ``mgrpo_fast.kernels.<name>`` with a ``<name>.py`` not starting with ``_``, sorted."""
    package = importlib.import_module(KERNELS_PACKAGE)
    names: set[str] = set()
    for folder in package.__path__:
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            if entry.endswith(".py") and not entry.startswith("_"):
                names.add(f"{KERNELS_PACKAGE}.{entry[:-3]}")
    return sorted(names)


def short_name(module: str) -> str:
    prefix = KERNELS_PACKAGE + "."
    return module[len(prefix) :] if module.startswith(prefix) else module


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SPECS_CACHE: dict[str, list[Any]] = {}


def load_specs(module: str) -> list[Any]:
    """Import ``module`` and return its ``aot_specs()``; raises ValueError with a clear message if
    the module cannot be checked (no ``aot_specs``, an empty list, malformed or duplicate specs)."""
    if module in _SPECS_CACHE:
        return _SPECS_CACHE[module]
    mod = importlib.import_module(module)
    fn = getattr(mod, "aot_specs", None)
    if not callable(fn):
        raise ValueError(
            f"{module} has no aot_specs(): every kernel file must list the configs its launchers can "
            "pick (kernels/_common.py, AotSpec)"
        )
    specs = list(fn())
    if not specs:
        raise ValueError(f"{module}.aot_specs() returned no specs: every kernel file must be checkable")
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        for attr in ("name", "kernel", "signature", "constexprs", "num_warps", "num_stages"):
            if not hasattr(spec, attr):
                raise ValueError(f"{module}.aot_specs()[{i}] is not an AotSpec (missing {attr!r}): {spec!r}")
        if spec.name in seen:
            raise ValueError(f"{module}.aot_specs(): duplicate spec name {spec.name!r}")
        seen.add(spec.name)
    _SPECS_CACHE[module] = specs
    return specs


# ----------------------------------------------------------------------------------------------
# One compile
# ----------------------------------------------------------------------------------------------
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def _res_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of the cubin's kernel via the cuobjdump bundled with Triton."""
    tool = _tool("cuobjdump")
    if tool is None or not cubin:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    finally:
        os.unlink(path)
    m = _RES_USAGE.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def tensor_core_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\.", ptx):
        return "mma"
    return "none"


def compile_one(module: str, index: int, name: str, cc: int, use_cache: bool) -> CompileResult:
    """Compile ``aot_specs()[index]`` of ``module`` for ``sm_<cc>`` (runs in a worker process)."""
    result = CompileResult(module=short_name(module), spec=name, cc=cc)
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget

        from mgrpo_fast.kernels._common import SHARED_MEMORY_LIMITS

        spec = load_specs(module)[index]
        if spec.name != name:  # aot_specs() must be deterministic: the parent listed it before
            raise RuntimeError(f"aot_specs()[{index}] is {spec.name!r} in the worker, {name!r} in the parent")
        result.tags = {str(k): str(v) for k, v in dict(getattr(spec, "tags", {}) or {}).items()}
        result.num_warps, result.num_stages = int(spec.num_warps), int(spec.num_stages)
        result.shared_limit = SHARED_MEMORY_LIMITS.get(cc)

        events: list[dict[str, Any]] = []
        knobs.compilation.listener = lambda **kw: events.append(kw)
        knobs.compilation.always_compile = not use_cache
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v is always run; this prints its log (registers, spills)
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                triton.compiler.ASTSource(
                    fn=spec.kernel,
                    signature=spec.signature,
                    constexprs=spec.constexprs,
                    attrs=spec.compile_attrs(),
                ),
                target=GPUTarget("cuda", cc, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
        result.seconds = time.perf_counter() - start
        result.cache_hit = bool(events and events[-1].get("cache_hit"))

        result.shared = int(compiled.metadata.shared)
        ptx = compiled.asm.get("ptx", "")
        result.mma = tensor_core_kind(ptx)
        result.wgmma = result.mma == "wgmma"
        text = log.getvalue()
        if (m := _PTXAS_REGS.search(text)) is not None:
            result.registers = int(m.group(1))
        if (m := _PTXAS_SPILLS.search(text)) is not None:
            result.stack, result.spill_stores, result.spill_loads = (int(g) for g in m.groups())
        if result.registers is None or result.stack is None:
            regs, stack = _res_usage(compiled.asm.get("cubin", b""))
            result.registers = result.registers if result.registers is not None else regs
            result.stack = result.stack if result.stack is not None else stack

        if result.shared_limit is None:
            result.error = (
                f"no shared-memory limit known for sm_{cc} (SHARED_MEMORY_LIMITS in kernels/_common.py)"
            )
        elif result.shared > result.shared_limit:
            result.error = (
                f"needs {result.shared} B of shared memory, sm_{cc} allows {result.shared_limit} B "
                f"(lower num_stages or the block sizes)"
            )
        result.ok = result.error is None
    except Exception as exc:  # a compile error is a result, not a crash of the harness
        result.error = _one_line(exc)
        result.ok = False
    return result


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    targets: list[int]
    modules: dict[str, dict[str, Any]]  # short name -> {"specs": n, "error": str | None}
    results: list[CompileResult]
    seconds: float
    versions: dict[str, str]

    @property
    def ok(self) -> bool:
        return all(m["error"] is None for m in self.modules.values()) and all(r.ok for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "targets": self.targets,
            "seconds": round(self.seconds, 3),
            "versions": self.versions,
            "modules": self.modules,
            "results": [asdict(r) for r in self.results],
        }


def _pool(workers: int) -> cf.Executor:
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def run(
    modules: list[str] | None = None,
    targets: tuple[int, ...] = DEFAULT_TARGETS,
    workers: int = 2,
    use_cache: bool = False,
    progress: bool = False,
) -> Report:
    """Compile every spec of ``modules`` (default: all kernel modules) for ``targets``."""
    check_environment()
    import torch
    import triton

    start = time.perf_counter()
    if modules is None:
        modules = discover_modules()
    module_info: dict[str, dict[str, Any]] = {}
    jobs: list[tuple[str, int, str, int]] = []
    for module in modules:
        try:
            specs = load_specs(module)
        except Exception as exc:
            module_info[short_name(module)] = {"specs": 0, "error": _one_line(exc)}
            continue
        module_info[short_name(module)] = {"specs": len(specs), "error": None}
        for cc in targets:
            jobs.extend((module, i, spec.name, cc) for i, spec in enumerate(specs))

    results: list[CompileResult | None] = [None] * len(jobs)
    done = 0

    def finish(k: int, res: CompileResult) -> None:
        nonlocal done
        results[k], done = res, done + 1
        if progress:
            _progress(res, done, len(jobs))

    if workers <= 1 or len(jobs) <= 1:
        for k, job in enumerate(jobs):
            finish(k, compile_one(*job, use_cache))
    else:
        # A compiler crash (segfault) breaks the whole pool: its unfinished jobs are retried in a
        # fresh pool, and in the last round one process per job, so only the culprit is blamed.
        pending = list(range(len(jobs)))
        for attempt in range(3):
            crashed: list[int] = []
            batches = [pending] if attempt < 2 else [[k] for k in pending]
            for batch in batches:
                with _pool(min(workers, len(batch))) as pool:
                    futures = {pool.submit(compile_one, *jobs[k], use_cache): k for k in batch}
                    for fut in cf.as_completed(futures):
                        k = futures[fut]
                        try:
                            finish(k, fut.result())
                        except BrokenProcessPool:
                            crashed.append(k)
                        except Exception as exc:
                            module, _, name, cc = jobs[k]
                            finish(
                                k,
                                CompileResult(
                                    module=short_name(module), spec=name, cc=cc, error=_one_line(exc)
                                ),
                            )
            pending = sorted(crashed)
            if not pending:
                break
        for k in pending:
            module, _, name, cc = jobs[k]
            finish(
                k,
                CompileResult(
                    module=short_name(module),
                    spec=name,
                    cc=cc,
                    error="the compiler process died (crash in triton/ptxas) on this spec",
                ),
            )
    versions = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    return Report(
        list(targets),
        module_info,
        [r for r in results if r is not None],
        time.perf_counter() - start,
        versions,
    )


def _progress(r: CompileResult, done: int, total: int) -> None:
    status = "ok" if r.ok else "FAIL"
    print(
        f"  [{done}/{total}] {r.module}:{r.spec} sm_{r.cc} {status} ({r.seconds or 0:.1f}s)",
        file=sys.stderr,
        flush=True,
    )


def _fmt(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "?"
    return f"{value / scale:.{digits}f}" if scale != 1.0 or digits else str(value)


def format_table(report: Report, failures_only: bool = False) -> str:
    header = ("module", "spec", "sm", "shared KiB", "limit", "regs", "spill B", "mma", "s", "status")
    rows = []
    for r in report.results:
        if failures_only and r.ok:
            continue
        spills = "?" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        status = "ok" if r.ok else f"FAIL: {r.error}"
        rows.append(
            (
                r.module,
                r.spec,
                str(r.cc),
                _fmt(r.shared, 1024, 1),
                _fmt(r.shared_limit, 1024, 0),
                _fmt(r.registers),
                spills,
                r.mma or "?",
                ("cached" if r.cache_hit else _fmt(r.seconds, 1, 1)),
                status,
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])  # the status column is last and may be long: don't pad it
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(row) for row in rows]
    for name, info in report.modules.items():
        if info["error"] is not None:
            out.append(f"MODULE FAIL {name}: {info['error']}")
    n_fail = sum(not r.ok for r in report.results) + sum(
        m["error"] is not None for m in report.modules.values()
    )
    spilled = sum(1 for r in report.results if r.spill_stores)
    out.append(
        f"{len(report.modules)} module(s), {len(report.results)} compile(s) for "
        f"{', '.join(f'sm_{t}' for t in report.targets)} in {report.seconds:.1f}s "
        f"(triton {report.versions['triton']}): {'all ok' if n_fail == 0 else f'{n_fail} FAILED'}"
        + (f"; {spilled} with register spills" if spilled else "")
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mgrpo_fast.tools.aot",
        description="Compile each aot_specs() entry of kernels/*.py for GPU targets, without a GPU.",
    )
    parser.add_argument(
        "--targets",
        default=",".join(map(str, DEFAULT_TARGETS)),
        help="comma-separated CUDA compute capabilities (default: 80,90)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the full report as JSON to PATH")
    parser.add_argument(
        "--modules",
        metavar="M1,M2",
        help="comma-separated modules to check instead of discovering "
        f"{KERNELS_PACKAGE}.*; a bare name means {KERNELS_PACKAGE}.<name>",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="compile processes (default: 2, or 1 on a one-core machine)",
    )
    parser.add_argument(
        "--cache",
        action="store_true",
        help="allow Triton's on-disk cache (faster re-runs; spills unknown on cache hits)",
    )
    parser.add_argument("--brief", action="store_true", help="print only the failing rows and the summary")
    parser.add_argument("--list", action="store_true", help="list the specs of each module and exit")
    parser.add_argument("--progress", action="store_true", help="print a line per finished compile (stderr)")
    args = parser.parse_args(argv)

    try:
        check_environment()
        targets = tuple(int(t) for t in args.targets.split(",") if t.strip())
    except AotUsageError as exc:
        print(f"mgrpo_fast.tools.aot: error: {exc}", file=sys.stderr)
        return 2
    except ValueError:
        print(
            f"mgrpo_fast.tools.aot: error: --targets must be integers like 80,90, got {args.targets!r}",
            file=sys.stderr,
        )
        return 2
    modules = None
    if args.modules:
        modules = [m if "." in m else f"{KERNELS_PACKAGE}.{m}" for m in args.modules.split(",") if m.strip()]

    if args.list:
        failed = False
        for module in modules if modules is not None else discover_modules():
            try:
                specs = load_specs(module)
            except Exception as exc:
                print(f"{short_name(module)}: ERROR {_one_line(exc)}")
                failed = True
                continue
            print(f"{short_name(module)}: {len(specs)} spec(s)")
            for s in specs:
                tags = dict(getattr(s, "tags", {}) or {})
                print(f"  {s.name}  warps={s.num_warps} stages={s.num_stages} {tags or ''}".rstrip())
        return 1 if failed else 0

    report = run(modules, targets, workers=args.workers, use_cache=args.cache, progress=args.progress)
    if not report.modules:
        print(f"mgrpo_fast.tools.aot: error: no kernel modules found in {KERNELS_PACKAGE}", file=sys.stderr)
    print(format_table(report, failures_only=args.brief), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=1)
    return 0 if report.ok and report.modules else 1


if __name__ == "__main__":
    sys.exit(main())
