"""``pytest benchmarks``: CUDA-only kernel benchmarks (skipped cleanly without a GPU).

At the end of a session that measured anything, the records are written to
``benchmarks/results/<gpu-name-slug>-<UTC date>.json`` (with GPU name, torch/triton versions, git
commit and date) and a summary table is printed. See ``bench_lib.py`` for what is measured.
"""

from __future__ import annotations

import bench_lib

_WRITTEN: dict[str, str | None] = {"path": None, "error": None}


def pytest_sessionfinish(session, exitstatus):
    if not bench_lib.RESULTS:
        return
    try:
        _WRITTEN["path"] = bench_lib.write_results()
    except Exception as exc:  # never lose the run's exit status to a failing write
        _WRITTEN["error"] = f"{type(exc).__name__}: {exc}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not bench_lib.RESULTS:
        return
    terminalreporter.section("mgrpo_fast kernel benchmarks")
    terminalreporter.write_line(bench_lib.summary_table(bench_lib.RESULTS))
    if _WRITTEN["path"]:
        terminalreporter.write_line(f"results: {_WRITTEN['path']}")
    if _WRITTEN["error"]:
        terminalreporter.write_line(f"could not write the results file: {_WRITTEN['error']}")
