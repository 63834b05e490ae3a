"""Shared machinery of the kernel benchmarks (``pytest benchmarks``, ``benchmarks/gpu_check.py``).

What is measured, per shape ``(N tokens, H, V)``, logit regime and mode:

* providers: ``triton`` (this project's fused kernels, ``impl="triton"``), ``torch`` (the chunked
  pure-PyTorch path, ``impl="torch"``), ``naive`` (full fp32 logits, then ``log_softmax``/``gather``
  and the GRPO math), ``cce`` (Apple's Cut Cross-Entropy, ``linear_cross_entropy(...,
  reduction="none")`` = -logp, GRPO math on top), ``liger`` (``LigerFusedLinearGRPOLoss``),
  ``trl`` (TRL's fused LM head, on by default in ``GRPOTrainer`` since TRL 1.15:
  ``trl.kernels.ChunkedLogProbFunction`` gives the log-probs and entropies, GRPO math on top),
  ``quack`` (``quack-kernels``' ``linear_cross_entropy_func(..., reduction="none")`` = -logp, GRPO
  math on top; its CuTe-DSL kernels need Hopper or newer), and ``floor``: cuBLAS bf16 GEMMs of
  the same shapes (forward: ``N x H x V``, 2NHV FLOPs; forward + backward: the three GEMMs of a
  linear layer, 6NHV FLOPs), timed in the same run;
* regimes: ``diffuse`` (random weights, entropy about ln V) and ``peaked`` (hidden states scaled so
  the mean entropy is about 1 nat, like a trained LM; the scale is found once per shape by
  bisection on a sample of rows);
* modes: ``fwd`` (log-probs only, no autograd: old/ref log-probs) and ``fwd_bwd`` (the fused GRPO
  loss, ``loss_type="dapo"``, with ``old_logp`` given, then ``backward()`` to hidden and weight).

Reported: median ms (CUDA events), TFLOP/s (2NHV or 6NHV over the time), the ratio to the floor
measured in the same run, and peak extra GiB (``torch.cuda.max_memory_allocated`` minus what was
allocated before the call: the inputs; gradients and outputs count as extra).

Environment knobs (all optional): ``MGRPO_BENCH_SHAPES="N,H,V;N,H,V"``, ``MGRPO_BENCH_PROVIDERS``,
``MGRPO_BENCH_REGIMES``, ``MGRPO_BENCH_MODES`` (comma lists), ``MGRPO_BENCH_REPS`` (max timed
repetitions, default 10), ``MGRPO_BENCH_BUDGET_S`` (timed seconds per case, default 1.5),
``MGRPO_BENCH_RESULTS`` (output folder, default ``benchmarks/results``), ``MGRPO_GIT_COMMIT`` (the
commit to record where the checkout has no ``.git``, e.g. a copy sent to a GPU machine).
"""

from __future__ import annotations

import datetime as _dt
import gc
import inspect
import json
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SHAPES: tuple[tuple[int, int, int], ...] = ((16384, 1536, 151936), (8192, 3584, 152064), (8192, 4096, 128256))
REGIMES = ("diffuse", "peaked")
MODES = ("fwd", "fwd_bwd")
# The floor runs first in each (shape, regime, mode) group so every other record gets its ratio.
PROVIDERS = ("floor", "triton", "torch", "naive", "cce", "liger", "trl", "quack")
OURS = ("triton", "torch")  # a failure of these fails the benchmark; baselines are only recorded
SEQ_LEN = 1024  # tokens per sequence of the padded (B, T) batch all providers see
PEAKED_ENTROPY = 1.0  # nats
DTYPE = torch.bfloat16
DEVICE = "cuda"  # a CPU smoke test of this module's logic may set it to "cpu" (tiny shapes)


def _env_list(name: str, default: tuple) -> tuple:
    raw = os.environ.get(name, "").strip()
    return tuple(x.strip() for x in raw.split(",") if x.strip()) if raw else default


def shapes() -> tuple[tuple[int, int, int], ...]:
    raw = os.environ.get("MGRPO_BENCH_SHAPES", "").strip()
    if not raw:
        return SHAPES
    return tuple(tuple(int(x) for x in part.split(",")) for part in raw.split(";") if part.strip())


SLOW_PROVIDERS = ("liger",)  # 0.5-1 s a call plus torch.compile: run after everything else


def cases() -> list[tuple[tuple[int, int, int], str, str, str]]:
    """(shape, regime, mode, provider) in run order: shape outermost (its inputs are built once), the
    floor first in each group (the others' ratios need it), slow third-party providers at the end
    (so a run cut short by a time limit still has every other number)."""
    providers = _env_list("MGRPO_BENCH_PROVIDERS", PROVIDERS)
    out = []
    for group in (
        [p for p in providers if p not in SLOW_PROVIDERS],
        [p for p in providers if p in SLOW_PROVIDERS],
    ):
        for shape in shapes():
            for regime in _env_list("MGRPO_BENCH_REGIMES", REGIMES):
                for mode in _env_list("MGRPO_BENCH_MODES", MODES):
                    out.extend((shape, regime, mode, provider) for provider in group)
    return out


def case_id(shape, regime, mode, provider) -> str:
    return f"{'x'.join(map(str, shape))}-{regime}-{mode}-{provider}"


def flops(shape: tuple[int, int, int], mode: str) -> float:
    n, h, v = shape
    return (2.0 if mode == "fwd" else 6.0) * n * h * v


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    shape: tuple[int, int, int]
    regime: str
    hidden: torch.Tensor  # (N, H) bf16
    weight: torch.Tensor  # (V, H) bf16
    targets: torch.Tensor  # (N,) int64, sampled from the model's own distribution
    advantages: torch.Tensor  # (B,) fp32
    old_logp: torch.Tensor  # (B, T) fp32: the true log-probs plus noise (ratios straddle the clip range)
    mask: torch.Tensor  # (B, T) fp32 ones
    hidden_scale: float
    mean_entropy: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> tuple[int, int]:
        n = self.shape[0]
        t = SEQ_LEN if n % SEQ_LEN == 0 else n
        return n // t, t


def _logits_fp32(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h @ w.T`` with fp32 output from bf16 operands (tensor cores, no bf16 rounding)."""
    try:
        return torch.mm(h, w.T, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return h.float() @ w.float().T


def _mean_entropy(h: torch.Tensor, w: torch.Tensor) -> float:
    z = _logits_fp32(h, w)
    logp = torch.log_softmax(z, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


_SCALES: dict[tuple[int, int, int], float] = {}


def calibrate_peaked_scale(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: float = PEAKED_ENTROPY,
    rows: int = 256,
    iters: int = 30,
) -> float:
    """Scale ``s`` such that ``softmax((s * hidden) @ weight.T)`` has mean entropy ``target`` nats,
    by bisection on ``log s`` over a sample of rows (entropy falls monotonically as ``s`` grows)."""
    sample = hidden[:rows].float()
    lo, hi = math.log(1e-2), math.log(1e3)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ent = _mean_entropy((sample * math.exp(mid)).to(DTYPE), weight)
        if ent > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


SAMPLE_CHUNK = 2048  # rows per logits block when sampling targets (a CPU run lowers it)


def _sample_targets(
    hidden: torch.Tensor, weight: torch.Tensor, gen: torch.Generator, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets drawn from each row's own softmax (Gumbel-max), with their log-probs and entropies."""
    n, chunk = hidden.shape[0], chunk or SAMPLE_CHUNK
    targets = torch.empty(n, dtype=torch.long, device=hidden.device)
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk):
        z = _logits_fp32(hidden[s : s + chunk], weight)
        lp = torch.log_softmax(z, dim=-1)
        del z
        u = torch.rand(lp.shape, device=lp.device, generator=gen).clamp_(min=1e-20)
        t = torch.argmax(lp - torch.log(-torch.log(u)), dim=-1)
        del u
        targets[s : s + chunk] = t
        logp[s : s + chunk] = lp.gather(1, t[:, None]).squeeze(1)
        ent[s : s + chunk] = -(lp.exp() * lp).sum(-1)
        del lp
    return targets, logp, ent


_CURRENT: dict[str, Any] = {"key": None, "inputs": None}


def get_inputs(shape: tuple[int, int, int], regime: str) -> Inputs:
    """The inputs of (shape, regime), built on first use; the previous set is freed first."""
    key = (tuple(shape), regime)
    if _CURRENT["key"] == key:
        return _CURRENT["inputs"]
    _CURRENT["key"] = _CURRENT["inputs"] = None
    free_memory()
    n, h, v = shape
    dev = torch.device(DEVICE)
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234 + n + h + v)
    t0 = time.perf_counter()
    weight = (torch.randn(v, h, device=dev, generator=gen) / math.sqrt(h)).to(DTYPE)
    raw = torch.randn(n, h, device=dev, generator=gen)
    if regime == "diffuse":
        scale = 1.0
    elif regime == "peaked":
        if shape not in _SCALES:
            _SCALES[tuple(shape)] = calibrate_peaked_scale(raw, weight)
        scale = _SCALES[tuple(shape)]
    else:
        raise ValueError(f"unknown regime {regime!r}")
    hidden = (raw * scale).to(DTYPE)
    del raw
    targets, logp, ent = _sample_targets(hidden, weight, gen)
    inputs = Inputs(
        shape=tuple(shape),
        regime=regime,
        hidden=hidden,
        weight=weight,
        targets=targets,
        advantages=torch.empty(0),
        old_logp=torch.empty(0),
        mask=torch.empty(0),
        hidden_scale=scale,
        mean_entropy=float(ent.mean()),
    )
    b, t = inputs.batch
    inputs.advantages = torch.randn(b, device=dev, generator=gen)
    inputs.old_logp = (logp + 0.1 * torch.randn(n, device=dev, generator=gen)).view(b, t)
    inputs.mask = torch.ones(b, t, device=dev)
    inputs.info = {"setup_s": round(time.perf_counter() - t0, 2), "mean_target_logp": float(logp.mean())}
    del logp, ent
    sync()
    _CURRENT["key"], _CURRENT["inputs"] = key, inputs
    return inputs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Providers: each returns a step() closure that runs one forward (or forward + backward)
# ------------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """The provider cannot run here (package not installed, mode not offered)."""


# The package each third-party provider imports (``gpu_check --dry-run`` lists their availability).
PROVIDER_MODULES = {"cce": "cut_cross_entropy", "liger": "liger_kernel", "trl": "trl", "quack": "quack"}


def check_available(provider: str, mode: str) -> None:
    """Raise ``Unavailable`` (cheaply, before any inputs are built) if ``provider`` cannot run ``mode``."""
    if provider == "liger" and mode == "fwd":
        raise Unavailable("Liger's GRPO loss has no forward-only (log-prob) mode")
    module = PROVIDER_MODULES.get(provider)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} is not installed")


def _grpo_math(logp: torch.Tensor, inp: Inputs):
    """The GRPO objective (dapo) on given log-probs, plain torch (the baselines' "math on top")."""
    import mgrpo_fast as mf

    kwargs = {"loss_type": "dapo"}
    if "impl" in inspect.signature(mf.grpo_loss).parameters:
        kwargs["impl"] = "torch"
    loss, _ = mf.grpo_loss(logp, inp.old_logp, None, inp.advantages, inp.mask, **kwargs)
    return loss


def _leaves(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    return inp.hidden.detach().requires_grad_(True), inp.weight.detach().requires_grad_(True)


class Step:
    """One benchmark step; ``leaves`` are the tensors whose ``.grad`` it fills (cleared by ``reset``)."""

    def __init__(self, fn: Callable[[], Any], leaves: tuple[torch.Tensor, ...] = ()):
        self.fn, self.leaves = fn, leaves

    def __call__(self) -> None:
        self.fn()

    def reset(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None


def _logprob_baseline(
    inp: Inputs, fwd: bool, logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Step | Callable[[], Any]:
    """The step of a third-party provider that gives per-token log-probs ``logprobs(hidden, weight)
    (N,)``: forward only (no autograd), or the GRPO math on top and ``backward()``."""
    if fwd:

        def forward_only():
            with torch.no_grad():
                logprobs(inp.hidden, inp.weight)

        return forward_only
    h, w = _leaves(inp)
    b, t = inp.batch

    def step():
        h.grad = w.grad = None
        _grpo_math(logprobs(h, w).float().view(b, t), inp).backward()

    return Step(step, (h, w))


def make_step(provider: str, mode: str, inp: Inputs) -> Step:
    """The step of ``provider`` in ``mode`` on ``inp``; raises ``Unavailable`` when it cannot run."""
    step = _make_fn(provider, mode, inp)
    return step if isinstance(step, Step) else Step(step)


def _make_fn(provider: str, mode: str, inp: Inputs) -> Step | Callable[[], Any]:
    import mgrpo_fast as mf

    b, t = inp.batch
    h_, w_, tg = inp.hidden, inp.weight, inp.targets
    fwd = mode == "fwd"

    if provider == "floor":
        if fwd:
            return lambda: torch.mm(h_, w_.T)

        def floor_step():
            z = torch.mm(h_, w_.T)  # (N, V) bf16: the forward GEMM; z stands in for dL/dlogits below
            torch.mm(z, w_)  # dL/dhidden (N, H)
            torch.mm(z.T, h_)  # dL/dweight (V, H)

        return floor_step

    if provider in ("triton", "torch"):
        if fwd:

            def logprobs_step():
                with torch.no_grad():
                    mf.linear_logprobs(h_, w_, tg, impl=provider)

            return logprobs_step
        h, w = _leaves(inp)

        def fused_step():
            h.grad = w.grad = None
            loss, _ = mf.fused_linear_grpo_loss(
                h.view(b, t, -1),
                w,
                tg.view(b, t),
                inp.advantages,
                inp.mask,
                old_logp=inp.old_logp,
                loss_type="dapo",
                impl=provider,
            )
            loss.backward()

        return Step(fused_step, (h, w))

    if provider == "naive":
        if fwd:

            def naive_fwd():
                with torch.no_grad():
                    z = (h_ @ w_.T).float()  # full (N, V) logits, fp32 from here on (as eager trainers do)
                    torch.log_softmax(z, dim=-1).gather(1, tg[:, None])

            return naive_fwd
        h, w = _leaves(inp)

        def naive_step():
            h.grad = w.grad = None
            z = (h @ w.T).float()  # full (N, V) logits, fp32 from here on (as eager trainers do)
            logp = torch.log_softmax(z, dim=-1).gather(1, tg[:, None]).view(b, t)
            _grpo_math(logp, inp).backward()

        return Step(naive_step, (h, w))

    if provider == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            raise Unavailable(f"cut_cross_entropy not importable ({type(exc).__name__}: {exc})") from None
        return _logprob_baseline(inp, fwd, lambda h, w: -linear_cross_entropy(h, w, tg, reduction="none"))

    if provider == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as exc:
            raise Unavailable(f"liger_kernel not importable ({type(exc).__name__}: {exc})") from None
        if fwd:
            raise Unavailable("Liger's GRPO loss has no forward-only (log-prob) mode")
        init = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
        wanted = {
            "beta": 0.0,
            "use_ref_model": False,
            "loss_type": "dapo",
            "epsilon_low": 0.2,
            "epsilon_high": 0.2,
            "temperature": 1.0,
        }
        loss_fn = LigerFusedLinearGRPOLoss(**{k: v for k, v in wanted.items() if k in init})
        fwd_params = inspect.signature(loss_fn.forward).parameters
        if not {"selected_token_ids", "advantages", "old_per_token_logps"} <= set(fwd_params):
            raise Unavailable("this liger_kernel's LigerFusedLinearGRPOLoss has an older forward signature")
        h, w = _leaves(inp)
        mask = inp.mask.to(torch.long)

        def liger_step():
            h.grad = w.grad = None
            out = loss_fn(
                _input=h.view(b, t, -1),
                lin_weight=w,
                selected_token_ids=tg.view(b, t),
                attention_mask=mask,
                advantages=inp.advantages,
                old_per_token_logps=inp.old_logp,
            )
            (out[0] if isinstance(out, tuple) else out).backward()

        return Step(liger_step, (h, w))

    if provider == "trl":
        try:
            from trl.kernels import ChunkedLogProbFunction
        except Exception as exc:
            raise Unavailable(
                f"trl.kernels.ChunkedLogProbFunction not importable (TRL >= 1.15; {exc})"
            ) from None
        chunk = 32768  # TRL's own chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
        outputs = ("log_probs", "entropy")
        # positional: hidden, weight, bias, targets, temperature, chunk, softcap, logit scale, outputs
        return _logprob_baseline(
            inp,
            fwd,
            lambda h, w: ChunkedLogProbFunction.apply(h, w, None, tg, 1.0, chunk, None, 1.0, outputs)[0],
        )

    if provider == "quack":
        try:
            from quack.linear_cross_entropy import linear_cross_entropy_func
        except Exception as exc:
            raise Unavailable(
                f"quack.linear_cross_entropy not importable ({type(exc).__name__}: {exc})"
            ) from None
        return _logprob_baseline(
            inp, fwd, lambda h, w: -linear_cross_entropy_func(h, w, None, tg, reduction="none")
        )

    raise ValueError(f"unknown provider {provider!r}")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def max_reps() -> int:
    return max(1, int(os.environ.get("MGRPO_BENCH_REPS", "10")))


def budget_s() -> float:
    return float(os.environ.get("MGRPO_BENCH_BUDGET_S", "1.5"))


def warm_up(step: Callable[[], None]) -> tuple[float, float]:
    """Run twice (compile/autotune happen in the first); returns (first call s, second call s)."""
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    t1 = time.perf_counter()
    step()
    sync()
    return t1 - t0, time.perf_counter() - t1


def plan_reps(second_call_s: float) -> int:
    """Timed repetitions: as many as fit the per-case budget, at least 3, at most MGRPO_BENCH_REPS."""
    return int(min(max_reps(), max(3, budget_s() // max(second_call_s, 1e-4))))


class EventTimer:
    """Wraps ``step``: each call is bracketed by CUDA events and synchronized (so host timers that
    drive it, like pytest-benchmark's, also measure about the GPU time). ``ms`` holds the samples."""

    def __init__(self, step: Callable[[], None]):
        self.step = step
        self.ms: list[float] = []

    def __call__(self) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.step()
        end.record()
        end.synchronize()
        self.ms.append(start.elapsed_time(end))


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------------
# Records and the results file
# ------------------------------------------------------------------------------------------------
RESULTS: list[dict[str, Any]] = []


def record_key(r: dict[str, Any]) -> tuple:
    return (tuple(r["shape"]), r["regime"], r["mode"], r["provider"])


def floor_ms(shape, regime, mode) -> float | None:
    for r in reversed(RESULTS):
        if record_key(r) == (tuple(shape), regime, mode, "floor") and r["status"] == "ok":
            return r["ms"]
    return None


def make_record(
    shape,
    regime,
    mode,
    provider,
    *,
    status: str,
    samples: list[float] | None = None,
    peak_extra_bytes: int | None = None,
    first_call_s: float | None = None,
    inputs: Inputs | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "provider": provider,
        "shape": list(shape),
        "N": shape[0],
        "H": shape[1],
        "V": shape[2],
        "regime": regime,
        "mode": mode,
        "status": status,
        "flops": flops(shape, mode),
    }
    if samples:
        ms = statistics.median(samples)
        rec.update(
            ms=round(ms, 4),
            ms_min=round(min(samples), 4),
            reps=len(samples),
            tflops=round(flops(shape, mode) / (ms * 1e-3) / 1e12, 1),
        )
        f = floor_ms(shape, regime, mode) if provider != "floor" else ms
        rec["floor_ms"] = None if f is None else round(f, 4)
        rec["ratio_to_floor"] = None if f is None else round(ms / f, 3)
    if peak_extra_bytes is not None:
        rec["peak_extra_gib"] = round(peak_extra_bytes / 2**30, 3)
    if first_call_s is not None:
        rec["first_call_s"] = round(first_call_s, 2)
    if inputs is not None:
        rec["hidden_scale"] = round(inputs.hidden_scale, 4)
        rec["mean_entropy"] = round(inputs.mean_entropy, 3)
    if error:
        rec["error"] = error
    RESULTS.append(rec)
    return rec


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    commit = commit or os.environ.get("MGRPO_GIT_COMMIT", "") or "unknown"
    return commit + ("+dirty" if dirty and commit != "unknown" else "")


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


_ENV: dict[str, Any] = {}


def environment() -> dict[str, Any]:
    """GPU, driver, versions, commit and date of this run (read once)."""
    if _ENV:
        return dict(_ENV)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    env = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "driver": _driver(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in ("cut_cross_entropy", "liger_kernel"):
        try:
            from importlib.metadata import version

            env[name] = version(name.replace("_", "-"))
        except Exception:
            env[name] = None
    _ENV.update(env)
    return dict(env)


def results_dir() -> str:
    return os.environ.get("MGRPO_BENCH_RESULTS") or os.path.join(HERE, "results")


def write_results(records: list[dict[str, Any]] | None = None) -> str | None:
    """Write ``benchmarks/results/<gpu-slug>-<UTC date>.json`` (atomically). Records of an earlier run
    in the same file are kept unless this run measured the same (shape, regime, mode, provider)."""
    records = RESULTS if records is None else records
    if not records:
        return None
    env = environment()
    day = env["date"][:10]
    os.makedirs(results_dir(), exist_ok=True)
    path = os.path.join(results_dir(), f"{slug(env['gpu'])}-{day}.json")
    merged: dict[tuple, dict[str, Any]] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                for r in json.load(f).get("results", []):
                    merged[record_key(r)] = r
        except (OSError, ValueError, KeyError, TypeError):
            merged = {}
    for r in records:
        merged[record_key(r)] = r
    ordered = sorted(
        merged.values(),
        key=lambda r: (
            r["shape"],
            REGIMES.index(r["regime"]) if r["regime"] in REGIMES else 9,
            MODES.index(r["mode"]) if r["mode"] in MODES else 9,
            PROVIDERS.index(r["provider"]) if r["provider"] in PROVIDERS else 99,
        ),
    )
    payload = {
        **env,
        "flops_note": "fwd: 2NHV, fwd_bwd: 6NHV; floor = cuBLAS bf16 GEMMs of the same shapes",
        "results": ordered,
    }
    write_json(path, payload)
    return path


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def summary_table(records: list[dict[str, Any]]) -> str:
    """provider x shape x regime x mode: ms, TFLOP/s, ratio to the floor, peak extra GiB."""
    header = ("shape", "regime", "mode", "provider", "ms", "TFLOP/s", "x floor", "peak GiB", "status")
    rows = []
    for r in records:

        def num(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            return "" if r.get(key) is None else format(r[key], fmt)

        status = r["status"] if r["status"] != "error" else "error: " + (r.get("error") or "")[:60]
        rows.append(
            (
                "x".join(map(str, r["shape"])),
                r["regime"],
                r["mode"],
                r["provider"],
                num("ms", ".2f"),
                num("tflops", ".0f"),
                num("ratio_to_floor", ".2f"),
                num("peak_extra_gib", ".2f"),
                status,
            )
        )
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    widths[-1] = len(header[-1])
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in rows])
