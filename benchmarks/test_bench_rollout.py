"""Rollout throughput, ``hf`` vs ``vllm``, and the demo's step time with each backend (CPU or CUDA).

Both backends run through our ``RolloutBackend`` interface (not a bare engine call), side by side in
one process, on the bundled tiny model (fp32) with the demo's sampling settings (temperature 1, 64 new
tokens, prompts of the bundled task, ``batch_size`` 256):

* ``test_rollout_tokens_per_s[PxG]``: generated tokens per second at ``P`` prompts x ``G`` samples
  (16 x 8, the demo's layer-1 shape, and 64 x 8); the two backends alternate, one warm-up call each,
  then the median of ``MGRPO_BENCH_ROLLOUT_REPS`` (3) calls. Targets on the 2-core CPU box: vllm
  >= 3x hf at 16 x 8 and >= 8x at 64 x 8 (asserted; the ratio is what counts on a noisy machine).
* ``test_demo_step_breakdown``: ``MGRPO_BENCH_DEMO_STEPS`` (3) demo steps (configs/demo.yaml, no eval)
  after one warm-up step with each backend: median seconds of rollout, scoring, log-probs, mismatch
  metrics (vllm: one no-grad pass, here on every step; ``rollout.mismatch_every`` defaults to 10),
  update, weight sync and the whole step. Target: weight sync
  <= 5% of a step (asserted).

Results: ``benchmarks/results/rollout-<date>.json`` (``MGRPO_BENCH_RESULTS`` overrides the folder) and
the pytest-benchmark table's ``extra_info``. Skipped when vLLM is not installed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from mgrpo_fast.rl.rollout.vllm import vllm_unavailable_reason

_REASON = vllm_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

REPS = int(os.environ.get("MGRPO_BENCH_ROLLOUT_REPS", "3"))
DEMO_STEPS = int(os.environ.get("MGRPO_BENCH_DEMO_STEPS", "3"))
TARGETS = {(16, 8): 3.0, (64, 8): 8.0}
REPO = Path(__file__).resolve().parents[1]
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster for both backends on a shared 2-core box
    yield
    torch.set_num_threads(threads)
    if RESULTS:
        folder = Path(os.environ.get("MGRPO_BENCH_RESULTS", REPO / "benchmarks" / "results"))
        folder.mkdir(parents=True, exist_ok=True)
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = {"date": date, "device": device, "torch": torch.__version__, "results": RESULTS}
        (folder / f"rollout-{date}.json").write_text(json.dumps(out, indent=2))


@pytest.fixture(scope="module")
def backends():
    from transformers import AutoTokenizer

    from mgrpo_fast.data.arithmetic import bundled_problems
    from mgrpo_fast.data.prompts import build_prompt_ids
    from mgrpo_fast.data.train_data import default_model_path
    from mgrpo_fast.models.policy import load_policy
    from mgrpo_fast.rl.rollout.hf import HFGenerateBackend
    from mgrpo_fast.rl.rollout.vllm import VLLMBackend

    path = default_model_path()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(path)
    policy = load_policy(path, dtype=torch.float32, device=device, attn_implementation="sdpa")
    problems = bundled_problems("train", 64)
    prompts = [build_prompt_ids(p, tok, template="plain", instruction=None) for p in problems]
    vllm = VLLMBackend(policy, tok, device=device)
    vllm.load_weights(policy.named_parameters())
    yield {"hf": HFGenerateBackend(policy, tok), "vllm": vllm}, prompts
    vllm.close()


def _tokens_per_s(backend, prompts, g: int, seed: int) -> float:
    from mgrpo_fast.rl.rollout.base import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=64, batch_size=256)
    t = time.perf_counter()
    out = backend.generate(prompts, num_samples=g, params=params, seed=seed)
    seconds = time.perf_counter() - t
    return sum(len(c.token_ids) for c in out) / seconds


@pytest.mark.parametrize("shape", [(16, 8), (64, 8)], ids=["16x8", "64x8"])
def test_rollout_tokens_per_s(benchmark, backends, shape):
    named, prompts = backends
    p, g = shape
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}

    def run():
        for rep in range(REPS + 1):  # rep 0 warms up
            for name, backend in named.items():
                rate = _tokens_per_s(backend, prompts[:p], g, seed=rep)
                if rep:
                    rates[name].append(rate)

    benchmark.pedantic(run, rounds=1, iterations=1)
    hf, vllm = statistics.median(rates["hf"]), statistics.median(rates["vllm"])
    info = {"hf_tokens_per_s": round(hf), "vllm_tokens_per_s": round(vllm), "ratio": round(vllm / hf, 2)}
    info["target_ratio"] = TARGETS[shape]
    benchmark.extra_info.update(info)
    RESULTS[f"tokens_per_s_{p}x{g}"] = info
    print(f"\nrollout {p}x{g}: {info}")
    assert vllm / hf >= TARGETS[shape], f"vllm/hf tokens/s at {p}x{g}: {vllm / hf:.2f} < {TARGETS[shape]}"


def test_demo_step_breakdown(benchmark, tmp_path):
    from mgrpo_fast.config.loading import load_config
    from mgrpo_fast.rl.trainer import MGRPOTrainer

    keys = ("rollout", "scoring", "logprob", "mismatch", "update", "weight_sync", "step")
    table: dict[str, dict[str, float]] = {}

    def run():
        for name in ("hf", "vllm"):
            cfg = load_config(
                str(REPO / "configs" / "demo.yaml"),
                [f"--rollout.backend={name}", f"--logging.run_dir={tmp_path / name}",
                 "--logging.progress=false", "--eval.at_start=false", "--eval.at_end=false",
                 "--eval.every=0", "--checkpoint.every=0", "--checkpoint.export_final=false",
                 "--rollout.mismatch_every=1"],
            )  # fmt: skip
            trainer = MGRPOTrainer(cfg)
            try:
                rows = [trainer.train_step() for _ in range(DEMO_STEPS + 1)][1:]
            finally:
                close = getattr(trainer.backend, "close", None)
                if close is not None:
                    close()
                trainer.scorer.close()
            table[name] = {k: round(statistics.median(r.get(f"time/{k}", 0.0) for r in rows), 4)
                           for k in keys}  # fmt: skip
            if name == "vllm":
                for k in ("rollout/mismatch_abs", "rollout/mismatch_kl", "rollout/is_beyond_cap"):
                    table[name][k] = max(r[k] for r in rows if k in r)

    benchmark.pedantic(run, rounds=1, iterations=1)
    v = table["vllm"]
    table["vllm"]["weight_sync_share"] = round(v["weight_sync"] / v["step"], 4)
    table["vllm"]["mismatch_share"] = round(v["mismatch"] / v["step"], 4)
    table["step_ratio_vllm_over_hf"] = {"step": round(v["step"] / table["hf"]["step"], 3)}
    benchmark.extra_info.update(table)
    RESULTS["demo_step_breakdown_s"] = table
    print(f"\ndemo step (median of {DEMO_STEPS}): {json.dumps(table)}")
    share = v["weight_sync"] / v["step"]
    assert share <= 0.05, f"weight sync {v['weight_sync']:.3f} s is {share:.1%} of a {v['step']:.3f} s step"
