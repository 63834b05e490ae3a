"""Every Triton kernel compiles for sm_80 and sm_90 and fits the chip, checked on this CPU machine.

The Triton interpreter (``TRITON_INTERPRET=1``, used by the CPU kernel tests) does not prove a
kernel builds for a GPU. This runs the ahead-of-time harness ``python -m mgrpo_fast.tools.aot`` in a
subprocess with ``TRITON_INTERPRET`` removed from its environment: it compiles each ``aot_specs()``
entry of every ``kernels/*.py`` with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` (PTX
and ptxas run on the CPU) and reports shared memory, registers, spills and whether the sm_90 PTX
uses wgmma. See docs/kernels.md and ``kernels/_common.py``.

Skipped only when triton is not importable. Takes a few minutes on 2 cores (every spec twice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED_MODULES = {"linear_logprobs", "grpo_loss", "advantages"}
TARGETS = (80, 90)
TIMEOUT_S = 1200


def run_harness(args: list[str], *, extra_env: dict[str, str] | None = None, interpret: bool = False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "mgrpo_fast.tools.aot", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The JSON report of one harness run over all kernel modules, both targets."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = run_harness(["--targets", ",".join(map(str, TARGETS)), "--json", str(out), "--brief"])
    if not out.exists():
        pytest.fail(
            f"the AOT harness wrote no report (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    data = json.loads(out.read_text())
    data["returncode"] = proc.returncode
    data["stdout"] = proc.stdout
    return data


def test_expected_kernel_modules_present_and_checkable(report):
    modules = report["modules"]
    missing = EXPECTED_MODULES - set(modules)
    assert not missing, f"kernel modules missing from kernels/: {sorted(missing)} (found {sorted(modules)})"
    broken = {name: info["error"] for name, info in modules.items() if info["error"] is not None}
    assert not broken, f"kernel modules that cannot be checked: {broken}"
    assert all(info["specs"] > 0 for info in modules.values())


def test_every_spec_compiles_and_fits_shared_memory(report):
    failures = [
        f"{r['module']}:{r['spec']} sm_{r['cc']}: {r['error']}" for r in report["results"] if not r["ok"]
    ]
    assert not failures, f"{len(failures)} compile failure(s):\n" + "\n".join(failures)
    for r in report["results"]:
        assert r["shared"] is not None and r["shared"] <= r["shared_limit"], r
    # every spec of every module was compiled for every target
    compiled = {(r["module"], r["spec"], r["cc"]) for r in report["results"]}
    expected_count = sum(info["specs"] for info in report["modules"].values()) * len(TARGETS)
    assert len(compiled) == expected_count == len(report["results"])
    assert report["returncode"] == 0, report["stdout"][-4000:]


def test_low_precision_gemm_specs_use_wgmma_on_sm90(report):
    gemms = [
        r
        for r in report["results"]
        if r["tags"].get("gemm") == "true" and r["tags"].get("dtype") in ("bf16", "fp16") and r["ok"]
    ]
    assert any(r["cc"] == 90 for r in gemms), "no spec is tagged {'gemm': 'true', 'dtype': 'bf16'|'fp16'}"
    no_wgmma = [f"{r['module']}:{r['spec']} ({r['mma']})" for r in gemms if r["cc"] == 90 and not r["wgmma"]]
    assert not no_wgmma, (
        "bf16/fp16 GEMM specs without wgmma on sm_90 (Hopper tensor cores unused): " + ", ".join(no_wgmma)
    )
    # and they use tensor cores (mma.sync) on sm_80
    no_mma = [f"{r['module']}:{r['spec']}" for r in gemms if r["cc"] == 80 and r["mma"] != "mma"]
    assert not no_mma, "bf16/fp16 GEMM specs without mma on sm_80: " + ", ".join(no_mma)


# ------------------------------------------------------------------------------------------------
# The harness itself: refuses the interpreter, and catches what it is there to catch.
# ------------------------------------------------------------------------------------------------
def test_harness_refuses_to_run_under_the_interpreter():
    proc = run_harness(["--targets", "90"], interpret=True)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr


TOY_KERNELS = textwrap.dedent("""
    import triton
    import triton.language as tl

    from mgrpo_fast.kernels._common import AotSpec


    @triton.jit
    def _dot_kernel(a_ptr, c_ptr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(a_ptr + rn[:, None] * K + (k + rk)[None, :])
            acc = tl.dot(a, tl.trans(b), acc)
        tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc)


    def _spec(name, block, block_k, warps, stages):
        return AotSpec(name=name, kernel=_dot_kernel,
                       signature={"a_ptr": "*bf16", "c_ptr": "*fp32", "K": "constexpr",
                                  "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                       constexprs={"K": 4096, "BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block_k},
                       num_warps=warps, num_stages=stages, tags={"gemm": "true", "dtype": "bf16"})


    def aot_specs():
        # 256x256x128 bf16 tiles, double-buffered: 256 KiB of shared memory, more than an H100 has
        return [_spec("fits", 64, 32, 4, 2), _spec("too_big", 256, 128, 8, 4)]
""")


def test_harness_reports_shared_memory_overflow_wgmma_and_bad_modules(tmp_path):
    pkg = tmp_path / "toy_aot_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(TOY_KERNELS)
    (pkg / "empty.py").write_text("def aot_specs():\n    return []\n")
    (pkg / "nospecs.py").write_text("X = 1\n")
    out = tmp_path / "toy.json"
    proc = run_harness(
        [
            "--targets",
            "90",
            "--modules",
            "toy_aot_kernels.toy,toy_aot_kernels.empty,toy_aot_kernels.nospecs",
            "--json",
            str(out),
            "--workers",
            "1",
        ],
        extra_env={
            "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
        },
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert "no specs" in data["modules"]["toy_aot_kernels.empty"]["error"]
    assert "no aot_specs" in data["modules"]["toy_aot_kernels.nospecs"]["error"]
    by_name = {r["spec"]: r for r in data["results"]}
    assert by_name["fits"]["ok"] and by_name["fits"]["wgmma"] and by_name["fits"]["registers"]
    assert 0 < by_name["fits"]["shared"] <= by_name["fits"]["shared_limit"]
    too_big = by_name["too_big"]
    assert not too_big["ok"] and too_big["shared"] > too_big["shared_limit"]
    assert "shared memory" in too_big["error"]
    assert "FAIL" in proc.stdout
