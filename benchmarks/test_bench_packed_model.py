"""Packed vs padded forward+backward of a Qwen2.5-1.5B-shaped model on GRPO-like rollouts (CUDA only).

Workload: 64 sequences drawn like GRPO rollouts of a reasoning task: prompt 100-400 tokens
(uniform), completion 50-3000 tokens, long-tailed (log-normal, median 450, plus 15% truncated at
the 3000-token generation cap). Random-initialized Qwen2.5-1.5B shape (28 layers, hidden 1536,
12 query / 2 KV heads, MLP 8960, vocab 151936, tied lm_head), bf16, built from a config (nothing
downloaded). Loss: ``-(advantage * logp).sum()`` over every completion token, then ``backward()``.

* **padded** (the baseline): micro-batches of ``PAD_MB = 4`` consecutive rollouts, right-padded to
  the micro-batch's longest sequence, with a padding ``attention_mask``, through transformers'
  default ``"sdpa"`` attention.
* **packed**: the same rollouts in (about) the same number of micro-batches — whole sequences under a
  token budget of ``max(longest, total / n_padded_microbatches)``, first-fit decreasing — through
  ``mgrpo_packed`` attention (``flash_attn`` varlen, else ``torch.nn.attention.varlen``).

Both compute log-probs with the same ``linear_logprobs(..., impl="torch")`` on the completion rows
only, so the ratio measures the layout (no padding, varlen attention) and nothing else.

Reported (``benchmarks/results/packed-model-<gpu>-<date>.json``): real tokens/s, computed tokens,
peak memory (``max_memory_allocated``, weights and gradients included), model TFLOP/s of the real
tokens and its ratio to a bf16 GEMM floor measured in the same run. Target: packed >= 1.8x the
padded throughput at <= 0.6x its peak memory (asserted).

Knobs: ``MGRPO_BENCH_MODEL_LAYERS`` (default 28), ``MGRPO_BENCH_MODEL_SEQS`` (64),
``MGRPO_BENCH_MODEL_PAD_MB`` (4), ``MGRPO_BENCH_MODEL_REPS`` (2 timed passes after 1 warm-up),
``MGRPO_BENCH_RESULTS`` (output folder).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import random
import re
import subprocess
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mgrpo_fast.models.attention import ATTN_IMPLEMENTATION, select_backend  # noqa: E402
from mgrpo_fast.models.policy import decoder_of, packed_logprobs  # noqa: E402
from mgrpo_fast.ops.logprobs import linear_logprobs  # noqa: E402
from mgrpo_fast.packing.microbatch import SequenceSpec, build_microbatch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

QWEN25_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=True, use_sliding_window=False, attention_dropout=0.0, use_cache=False,
)  # fmt: skip
TARGET_SPEEDUP = 1.8
TARGET_MEMORY = 0.6


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def rollout_lengths(n: int, seed: int = 0, scale: float = 1.0) -> list[tuple[int, int]]:
    """``(prompt, completion)`` lengths like GRPO rollouts: long-tailed completions, some truncated.
    ``scale`` shrinks every length (for a dry run on CPU)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(100, 400)
        if rng.random() < 0.15:
            completion = 3000  # hit the generation cap
        else:
            completion = int(min(3000, max(50, rng.lognormvariate(math.log(450), 0.8))))
        out.append((max(1, int(prompt * scale)), max(1, int(completion * scale))))
    return out


def make_rollouts(n: int, vocab: int, seed: int = 0, scale: float = 1.0) -> list[SequenceSpec]:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for prompt, completion in rollout_lengths(n, seed, scale):
        ids = torch.randint(0, vocab, (prompt + completion,), generator=g).tolist()
        seqs.append(SequenceSpec(ids[:prompt], ids[prompt:]))
    return seqs


def pack_ffd(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: indices of the sequences in each bin (a bin never exceeds ``budget``)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


class PaddedMicroBatch:
    """``(B, T)`` right-padded ids and mask, plus the flat rows/targets of the completion tokens."""

    def __init__(self, seqs: list[SequenceSpec], device: torch.device):
        width = max(s.num_tokens for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        rows = []
        for b, s in enumerate(seqs):
            n, p = s.num_tokens, len(s.prompt_ids)
            ids[b, :n] = torch.tensor([*s.prompt_ids, *s.completion_ids])
            mask[b, :n] = 1
            rows.extend(b * width + p + j - 1 for j in range(len(s.completion_ids)))
        self.input_ids = ids.to(device)
        self.attention_mask = mask.to(device)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.targets = torch.roll(self.input_ids.reshape(-1), -1)
        self.computed_tokens = ids.numel()


def padded_logprobs(model, mb: PaddedMicroBatch) -> torch.Tensor:
    out = decoder_of(model)(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    head = model.get_output_embeddings()
    return linear_logprobs(hidden, head.weight, mb.targets, row_index=mb.rows, impl="torch")


def run_pass(model, microbatches, logprob_fn, advantages: list[torch.Tensor], n_loss: int) -> None:
    for mb, adv in zip(microbatches, advantages):
        logp = logprob_fn(model, mb)
        (-(logp * adv).sum() / n_loss).backward()
    model.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, microbatches, logprob_fn, advantages, n_loss, reps: int, device: torch.device) -> dict:
    """Best of ``reps`` timed passes after one warm-up pass; peak memory over the timed passes."""
    _sync(device)
    t0 = time.perf_counter()
    run_pass(model, microbatches, logprob_fn, advantages, n_loss)  # warm-up (kernel selection, allocator)
    _sync(device)
    warm = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        run_pass(model, microbatches, logprob_fn, advantages, n_loss)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"s": min(times), "s_all": [round(t, 3) for t in times], "warmup_s": round(warm, 2),
            "peak_gib": peak}  # fmt: skip


def gemm_floor_tflops() -> float:
    """bf16 GEMM throughput of this GPU (8192^3), measured now: the physical floor's rate."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) * 1e-3) / 1e12


def model_flops(config, seqs: list[SequenceSpec]) -> float:
    """Forward+backward FLOPs of the real tokens: 6 * (non-embedding params) per token, causal
    attention 6 * s^2 * d per layer and sequence, lm_head 6 * V * H per completion token."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o, k, v, gate/up/down
    tokens = sum(s.num_tokens for s in seqs)
    attn = sum(6 * s.num_tokens**2 * h * layers for s in seqs)
    head = 6 * config.vocab_size * h * sum(len(s.completion_ids) for s in seqs)
    return 6 * per_layer * layers * tokens + attn + head


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    commit = commit or os.environ.get("MGRPO_GIT_COMMIT", "") or "unknown"
    return commit + ("+dirty" if dirty and commit != "unknown" else "")


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "flash_attn": _version("flash-attn"),
        "triton": _version("triton"),
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_result(result: dict) -> str:
    folder = os.environ.get("MGRPO_BENCH_RESULTS") or os.path.join(HERE, "results")
    os.makedirs(folder, exist_ok=True)
    gpu = re.sub(r"[^a-z0-9]+", "-", result["gpu"].lower()).strip("-")
    path = os.path.join(folder, f"packed-model-{gpu}-{result['date'][:10]}.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return path


def run_benchmark(
    config, *, device: torch.device, n_seqs: int, pad_mb: int, reps: int, length_scale: float = 1.0
) -> dict:
    """Measure both layouts on ``n_seqs`` rollouts; returns the result record (not yet written)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.train()
    init_s = time.perf_counter() - t0

    seqs = make_rollouts(n_seqs, config.vocab_size, scale=length_scale)
    lengths = [s.num_tokens for s in seqs]
    total = sum(lengths)
    n_loss = sum(len(s.completion_ids) for s in seqs)
    g = torch.Generator().manual_seed(1)
    seq_adv = torch.randn(n_seqs, generator=g)

    # padded: consecutive groups of pad_mb rollouts
    groups = [list(range(i, min(i + pad_mb, n_seqs))) for i in range(0, n_seqs, pad_mb)]
    padded = [PaddedMicroBatch([seqs[i] for i in grp], device) for grp in groups]
    padded_adv = [
        torch.cat([seq_adv[i].expand(len(seqs[i].completion_ids)) for i in grp]).to(device) for grp in groups
    ]
    # packed: about as many micro-batches, whole sequences under a token budget
    budget = max(max(lengths), math.ceil(total / len(groups)))
    bins = pack_ffd(lengths, budget)
    packed = [build_microbatch([seqs[i] for i in b], seq_index=b).to(device) for b in bins]
    packed_adv = [seq_adv[mb.loss_seq.cpu()].to(device) for mb in packed]

    model.set_attn_implementation("sdpa")
    pad = measure(model, padded, padded_logprobs, padded_adv, n_loss, reps, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    pk = measure(model, packed, packed_logprobs, packed_adv, n_loss, reps, device)

    # Same numbers? (log-probs of the first padded group's sequences, both layouts, no grad)
    with torch.no_grad():
        first = groups[0]
        lp_packed = packed_logprobs(model, build_microbatch([seqs[i] for i in first]).to(device))
        model.set_attn_implementation("sdpa")
        lp_padded = padded_logprobs(model, padded[0])
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        diff = (lp_packed - lp_padded).abs()

    floor = gemm_floor_tflops() if device.type == "cuda" else float("nan")
    flops = model_flops(config, seqs)
    probe = torch.empty(1, device=device, dtype=model.dtype)
    backend = select_backend(probe, head_dim=config.hidden_size // config.num_attention_heads)

    def summary(m: dict, computed: int, n_mb: int) -> dict:
        tflops = flops / m["s"] / 1e12
        return {
            "seconds": round(m["s"], 3), "seconds_all": m["s_all"], "warmup_s": m["warmup_s"],
            "tokens_per_s": round(total / m["s"]), "computed_tokens": computed, "microbatches": n_mb,
            "peak_gib": round(m["peak_gib"], 2), "model_tflops": round(tflops, 1),
            "ratio_to_gemm_floor": round(tflops / floor, 3),
        }  # fmt: skip

    result = {
        **(environment() if device.type == "cuda" else {"gpu": "cpu", "date": _dt.date.today().isoformat()}),
        "benchmark": "packed_vs_padded_model_fwd_bwd",
        "model": "Qwen2.5-1.5B shape, random init, bf16",
        "config": {k: getattr(config, k) for k in QWEN25_1_5B if hasattr(config, k)},
        "workload": {
            "sequences": n_seqs,
            "real_tokens": total,
            "loss_tokens": n_loss,
            "longest": max(lengths),
            "mean_length": round(total / n_seqs, 1),
            "prompt": "uniform 100-400",
            "completion": "lognormal median 450 sigma 0.8, 50-3000; 15% at 3000",
        },  # fmt: skip
        "packed_attention_backend": backend,
        "padded_attention": "sdpa (transformers default) with a padding mask",
        "logprob_impl": "torch",
        "packed_token_budget": budget,
        "init_s": round(init_s, 1),
        "gemm_floor_tflops": round(floor, 1),
        "model_flops": flops,
        "padded": summary(pad, sum(mb.computed_tokens for mb in padded), len(padded)),
        "packed": summary(pk, total, len(packed)),
        "first_group_logp_abs_diff": {
            "max": round(diff.max().item(), 4),
            "mean": round(diff.mean().item(), 5),
        },
    }
    result["speedup"] = round(pad["s"] / pk["s"], 3)
    result["memory_ratio"] = round(pk["peak_gib"] / pad["peak_gib"], 3)
    result["targets"] = {"speedup_min": TARGET_SPEEDUP, "memory_ratio_max": TARGET_MEMORY}
    return result


def test_packed_vs_padded_qwen25_1_5b():
    from transformers import Qwen2Config

    config = Qwen2Config(**{**QWEN25_1_5B, "num_hidden_layers": _env_int("MGRPO_BENCH_MODEL_LAYERS", 28)})
    result = run_benchmark(
        config,
        device=torch.device("cuda"),
        n_seqs=_env_int("MGRPO_BENCH_MODEL_SEQS", 64),
        pad_mb=_env_int("MGRPO_BENCH_MODEL_PAD_MB", 4),
        reps=_env_int("MGRPO_BENCH_MODEL_REPS", 2),
    )
    path = write_result(result)
    print(json.dumps({k: result[k] for k in ("padded", "packed", "speedup", "memory_ratio")}, indent=1))
    print(f"written to {path}")

    assert result["speedup"] >= TARGET_SPEEDUP, f"packed is {result['speedup']}x padded (< {TARGET_SPEEDUP}x)"
    assert result["memory_ratio"] <= TARGET_MEMORY, (
        f"packed peak memory is {result['memory_ratio']}x padded (> {TARGET_MEMORY}x)"
    )
