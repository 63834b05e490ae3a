"""The sections of the training configuration: one frozen ``kw_only`` dataclass per concern, each
field declared with :func:`~mgrpo_fast.config.fields.setting` and its one-line ``doc=`` (shown by
``--help`` and generated into docs/training.md), converted and checked in ``__post_init__``. The whole
run (:class:`~mgrpo_fast.config.run.TrainConfig`) nests them; :mod:`mgrpo_fast.config.loading` reads
YAML files and ``--key.sub=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from typing import Literal

import torch

from mgrpo_fast.config.fields import (
    ConfigError,
    Section,
    fail,
    setting,
)
from mgrpo_fast.data.problems import FORMATS
from mgrpo_fast.data.prompts import DEFAULT_GUIDING_PHRASES, DEFAULT_INSTRUCTION, GUIDING_TURNS
from mgrpo_fast.ops.dispatch import IMPLS
from mgrpo_fast.ops.options import (
    ADVANTAGE_SCALES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    LossOptions,
)

ROLLOUT_BACKENDS = ("auto", "vllm", "hf", "hf_generate")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
_LOSS = LossOptions()  # its defaults are the loss section's


# --------------------------------------------------------------------------------------------
# Sections (every field's one-line documentation is its ``doc=``: ``--help`` and docs/training.md)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """Policy and reference, loaded by ``mgrpo_fast.models.policy.load_policy``."""

    _section = "model"
    path: str | None = setting(
        None,
        doc="Local checkpoint of the policy: a save_pretrained directory (sharded or not), a directory "
        "holding model.gguf_file, or a .gguf file; null = the bundled tiny demo model.",
    )
    gguf_file: str | None = setting(
        None,
        doc="The GGUF file inside model.path, dequantized to model.dtype (also the tokenizer's and the "
        "reference's source when they come from model.path); null = none.",
    )
    tokenizer_path: str | None = setting(None, doc="Tokenizer directory; null = model.path.")
    dtype: str = setting(
        "auto",
        doc="Parameter (master weight) dtype: auto (= float32; bf16 compute on CUDA comes from "
        "parallel.mixed_precision), float32, bfloat16 or float16 (fp32, bf16, fp16 accepted).",
    )
    attn_implementation: str = setting(
        "mgrpo_packed",
        doc="mgrpo_packed (packed varlen attention, never across packed sequences) or any attention "
        "implementation transformers knows.",
    )
    gradient_checkpointing: bool = setting(
        False, doc="Recompute the decoder layers in the backward (less activation memory, one more forward)."
    )
    liger_kernels: bool = setting(
        False, doc="Patch in liger-kernel's RMSNorm/SwiGLU/RoPE kernels (needs pip install liger-kernel)."
    )
    ref_path: str | None = setting(
        None, doc="The frozen reference model, loaded only when loss.beta > 0; null = model.path."
    )

    def _validate(self) -> None:
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(self.dtype.lower(), self.dtype.lower()))
        self._require("dtype", self.dtype in DTYPES, f"one of {', '.join(DTYPES)}")
        self._require("attn_implementation", bool(self.attn_implementation.strip()), "a non-empty string")


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Problems and prompts (``mgrpo_fast.data.problems.load_problems``, ``mgrpo_fast.data.prompts``);
    file formats in docs/data.md."""

    _section = "data"
    _moved = {"eval_limit": "eval.num_problems"}  # one key for "how many eval problems"
    train_files: tuple[str, ...] = setting(
        (),
        doc="JSONL/Parquet training files (a path or a list); empty = the bundled arithmetic task's train "
        "split.",
    )
    eval_files: tuple[str, ...] = setting(
        (), doc="JSONL/Parquet evaluation files; empty = the bundled task's test split."
    )
    format: str = setting(
        "auto",
        choices=("auto", *FORMATS),
        doc="Field names of the files: auto (guessed per file from its first row), gsm8k (question, answer "
        "with '#### n'), math (problem, solution with \\boxed{}) or prompt_answer (prompt, answer = the "
        "final answer as it is); data.*_field rename the columns.",
    )
    file_type: str = setting("auto", choices=("auto", "jsonl", "parquet"), doc="auto = by file extension.")
    question_field: str | None = setting(None, doc="Column holding the question; null = the format's name.")
    answer_field: str | None = setting(None, doc="Column holding the gold answer; null = the format's name.")
    solution_field: str | None = setting(
        None, doc="Column holding a worked solution with a \\boxed{} answer (math); null = the format's name."
    )
    id_field: str | None = setting(None, doc="Column holding a problem id; null = the format's name.")
    dedupe: bool = setting(False, doc="Drop repeated questions (whitespace-normalized; the first is kept).")
    shuffle: bool = setting(True, doc="Shuffle the training problems (seeded by data.shuffle_seed).")
    shuffle_seed: int | None = setting(None, ge=0, doc="Seed of the shuffle; null = the top-level seed.")
    limit: int | None = setting(None, ge=0, doc="Keep at most this many training problems; null = all.")
    template: str = setting(
        "chat",
        choices=("chat", "plain"),
        doc="chat = the tokenizer's chat template when it has one (else plain); plain = 'Question: ... "
        "Answer:' text.",
    )
    system_prompt: str | None = setting(None, doc="Optional system turn; null = none.")
    instruction: str | None = setting(DEFAULT_INSTRUCTION, doc="Appended to every question; null = none.")
    max_prompt_tokens: int | None = setting(
        None,
        ge=1,
        doc="The longest layer-1 prompt, in tokens; null = what the model's context leaves after the "
        "completions (and, for mgrpo, the first answer, the guiding phrase and the continuation).",
    )
    overlong: str = setting(
        "skip",
        choices=("skip", "error"),
        doc="What to do with prompts over that length, measured before step 1: skip (dropped and counted "
        "in the log) or error (the run refuses, naming the rows).",
    )


@dataclass(frozen=True, kw_only=True)
class RolloutConfig(Section):
    """Sampling of both layers (``mgrpo_fast.rl.rollout``, docs/rollout.md)."""

    _section = "rollout"
    backend: str = setting(
        "auto",
        choices=ROLLOUT_BACKENDS,
        doc="vllm: a colocated vLLM engine (docs/rollout.md); hf: transformers generate with a KV cache "
        "(hf_generate is the old name); auto = vllm when it is installed, else hf (hf under torchrun without "
        "CUDA). Both layers and the evaluation use it.",
    )
    temperature: float = setting(1.0, gt=0, doc="Sampling temperature; the update's log-probs use it too.")
    top_p: float = setting(1.0, gt=0, le=1, doc="Nucleus sampling; 1 = off.")
    top_k: int = setting(0, ge=0, doc="Keep the k most likely tokens; 0 = off.")
    max_new_tokens: int = setting(512, ge=1, doc="T1: the most tokens of a layer-1 completion.")
    stop: tuple[str, ...] = setting((), doc="Strings that end a completion (besides EOS).")
    batch_size: int = setting(
        64, ge=1, doc="Sequences per generate call (hf; vLLM schedules every prompt of a call itself)."
    )
    seed: int | None = setting(None, ge=0, doc="Sampling seed; null = the top-level seed.")
    return_logprobs: bool = setting(
        False,
        doc="Also return the sampler's log-probs of every token (always on with vllm or a correction).",
    )
    vllm_kv_cache_gib: int = setting(1, ge=1, doc="vLLM on CPU: KV-cache size in whole GiB.")
    vllm_gpu_memory_utilization: float = setting(
        0.3, gt=0, le=1, doc="vLLM on CUDA: fraction of GPU memory for its weights + KV cache."
    )
    vllm_block_size: int = setting(
        32, ge=1, doc="vLLM: tokens per KV block (prefix caching shares whole blocks)."
    )
    vllm_max_num_seqs: int = setting(256, ge=1, doc="vLLM: sequences decoded at once.")
    vllm_sleep_mode: bool = setting(
        True, doc="vLLM on CUDA: free the engine's GPU memory during the update (sleep mode)."
    )
    is_correction: str = setting(
        "none",
        choices=("none", "tis"),
        doc="Sampler-mismatch correction: tis = truncated importance sampling, the policy term of a token "
        "multiplied by min(exp(logp_old - logp_sampler), is_cap) (no gradient through it).",
    )
    is_cap: float = setting(
        2.0, gt=0, doc="C, the cap of the TIS weight; also the threshold of rollout/is_beyond_cap."
    )
    is_level: str = setting(
        "token",
        choices=("token", "sequence"),
        doc="TIS per token, or per sequence (exp of the summed log-ratio of the completion, then capped).",
    )
    mismatch_every: int = setting(
        10,
        ge=0,
        doc="Log the sampler-trainer mismatch every this many steps (0 = never; every step with a "
        "correction); with loss.mu = 1 it costs one extra forward without a graph.",
    )

    def _validate(self) -> None:
        self._require("stop", all(self.stop), "a list of non-empty strings")
        if self.backend == "hf_generate":  # the old name
            object.__setattr__(self, "backend", "hf")

    def resolved_backend(self) -> str:
        """``vllm`` or ``hf``: ``auto`` is ``vllm`` when the package is installed, except under
        ``torchrun`` without CUDA (one engine per rank needs vLLM's external launcher, CUDA only)."""
        if self.backend != "auto":
            return self.backend
        if importlib.util.find_spec("vllm") is None:
            return "hf"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            return "hf"
        return "vllm"


ONE_IS_NO_GROUP = "a group of one has zero advantage: its reward is its own mean, so it never trains"


@dataclass(frozen=True, kw_only=True)
class Layer1Config(Section):
    """Layer 1 (solve): ``G1`` responses per question, advantages normalized within that group."""

    _section = "layer1"
    group_size: int | Literal["auto"] | None = setting(
        "auto",
        ge=2,
        why=ONE_IS_NO_GROUP,
        doc="G1, responses per question; auto (or null) = layer1.mgrpo_group_size for mgrpo and the "
        "equal-budget G1' = G1 + ceil(|S| * G2 * T2 / T1) for grpo; an integer is used as given.",
    )
    mgrpo_group_size: int = setting(
        8,
        ge=2,
        why=ONE_IS_NO_GROUP,
        doc="The MGRPO G1 that group_size: auto stands for (and that GRPO's budget is matched to).",
    )

    def _validate(self) -> None:
        object.__setattr__(self, "group_size", "auto" if self.group_size is None else self.group_size)


def parse_selection(selection: str, path: str = "layer2.selection") -> tuple[str, int | None]:
    """``"all" | "wrong_only" | "sample:k"`` -> ``(mode, k)``: ``("sample", 2)``, ``("all", None)``."""
    if selection in ("all", "wrong_only"):
        return selection, None
    m = re.fullmatch(r"sample:\s*(\d+)", selection.strip()) if isinstance(selection, str) else None
    if m is None or int(m[1]) < 1:
        fail(path, "'all', 'wrong_only' or 'sample:k' with an integer k >= 1", selection)
    return "sample", int(m[1])


@dataclass(frozen=True, kw_only=True)
class Layer2Config(Section):
    """Layer 2 (self-correct): ``G2`` continuations of each selected first answer after a guiding
    phrase; only the continuation tokens are trained (docs/algorithm.md)."""

    _section = "layer2"
    enabled: bool | Literal["auto"] = setting(
        "auto", doc="auto = on for algo: mgrpo, off for grpo; an explicit value must agree with algo."
    )
    group_size: int = setting(
        4, ge=2, why=ONE_IS_NO_GROUP, doc="G2: continuations per selected (question, first answer)."
    )
    selection: str = setting(
        "all",
        doc="Which first answers get a correction round: all, wrong_only, or sample:k (k per question, drawn "
        "at random).",
    )
    guiding_phrases: tuple[str, ...] = setting(
        DEFAULT_GUIDING_PHRASES,
        doc="One is drawn at random per (question, first answer); default: the five of docs/algorithm.md.",
    )
    guiding_turn: str = setting(
        "assistant",
        choices=GUIDING_TURNS,
        doc="Where the guiding phrase goes: assistant (it continues the first answer's turn and the model "
        "continues after it) or user (the first answer's turn is closed, the phrase is the next user "
        "turn, the model answers in a new assistant turn; needs a chat template, else assistant).",
    )
    separator: str = setting(
        "\n\n", doc="Text between the first answer and the guiding phrase (guiding_turn: assistant)."
    )
    shaping_alpha: float = setting(
        0.0, ge=0, doc="SCoRe-style shaping: +alpha for wrong -> right, -alpha for right -> wrong; 0 = off."
    )
    loss_weight: float = setting(1.0, ge=0, doc="lambda2: weight of the layer-2 tokens in the loss.")
    max_new_tokens: int | None = setting(
        None, ge=1, doc="T2: the most tokens of a continuation; null = rollout.max_new_tokens."
    )

    def _validate(self) -> None:
        mode, k = parse_selection(self.selection, self._path("selection"))
        object.__setattr__(self, "selection", mode if k is None else f"sample:{k}")
        self._require("guiding_phrases", len(self.guiding_phrases) > 0, "a non-empty list of phrases")
        for i, phrase in enumerate(self.guiding_phrases):
            if not phrase.strip():
                fail(f"{self._path('guiding_phrases')}[{i}]", "a non-empty phrase", phrase)

    @property
    def selection_mode(self) -> str:
        """``all``, ``wrong_only`` or ``sample``."""
        return parse_selection(self.selection)[0]

    @property
    def selection_k(self) -> int | None:
        """The ``k`` of ``sample:k``, else None."""
        return parse_selection(self.selection)[1]


@dataclass(frozen=True, kw_only=True)
class RewardConfig(Section):
    """Rewards (``mgrpo_fast.rl.scorer.RewardScorer``; :meth:`scorer_fns` gives its entries)."""

    _section = "reward"
    functions: dict[str, float] = setting(
        factory=lambda: {"mgrpo_fast.rl.rewards:correctness_reward": 1.0},
        doc="Reward functions 'module:function' (or 'file.py:function') -> weight; the default is the "
        "verifier (1 if the final answer equals the gold one).",
    )
    format_weight: float = setting(
        0.0, doc="Weight of mgrpo_fast.rl.rewards:format_reward (exactly one \\boxed{} at the end); 0 = off."
    )
    timeout_s: float | None = setting(
        10.0,
        gt=0,
        doc="Per-call limit in seconds; a call that hangs or raises scores 0 and is counted; null = no "
        "limit.",
    )
    num_workers: int = setting(2, ge=0, doc="Scorer worker processes; 0 = score in-process (no timeout).")

    def _validate(self) -> None:
        self._require("functions", len(self.functions) > 0, "at least one 'module:function': weight")
        for spec, weight in self.functions.items():
            mod, sep, attr = spec.rpartition(":")
            if not (sep and mod.strip() and attr.strip() and math.isfinite(weight)):
                fail(f"{self._path('functions')}.{spec}", "'module:function': finite weight", weight)
        self._require("format_weight", math.isfinite(self.format_weight), "a finite number")

    def scorer_fns(self) -> list[tuple[str, float]]:
        """``[(spec, weight)]`` for ``RewardScorer``, the format reward included when its weight is not 0."""
        fmt = [("mgrpo_fast.rl.rewards:format_reward", self.format_weight)] if self.format_weight else []
        return list(self.functions.items()) + fmt


@dataclass(frozen=True, kw_only=True)
class LossConfig(Section):
    """The objective of both layers (:meth:`options` gives the :class:`~mgrpo_fast.ops.options.LossOptions`
    whose defaults and checks the fields of the same names share; formulas in docs/algorithm.md)."""

    _section = "loss"
    loss_type: str = setting(
        _LOSS.loss_type,
        choices=LOSS_TYPES,
        doc="Surrogate and normalizer, as in TRL and Liger: dapo = token mean over the whole batch.",
    )
    epsilon_low: float = setting(_LOSS.epsilon_low, ge=0, doc="Lower clip: ratio >= 1 - epsilon_low.")
    epsilon_high: float = setting(
        _LOSS.epsilon_high,
        ge=0,
        doc="Upper clip: ratio <= 1 + epsilon_high; for cispo the cap of the detached IS weight (e.g. 5).",
    )
    delta: float | None = setting(
        _LOSS.delta,
        doc="Dual clip: the unclipped branch uses min(ratio, delta) (TRL recommends > 1 + epsilon_high); "
        "null = off.",
    )
    beta: float = setting(_LOSS.beta, ge=0, doc="KL weight; 0 = no reference model is loaded at all.")
    kl_estimator: str = setting(
        _LOSS.kl_estimator,
        choices=KL_ESTIMATORS,
        doc="Estimator of KL(policy || reference) with x = ref_logp - logp: k1 = -x, k2 = x^2/2, "
        "k3 = exp(x) - x - 1.",
    )
    importance_sampling_level: str = setting(
        _LOSS.importance_sampling_level,
        choices=IMPORTANCE_SAMPLING_LEVELS,
        doc="token (GRPO/PPO ratios) or sequence (GSPO: one ratio per sequence, the exp of its mean "
        "log-ratio).",
    )
    max_completion_length: int | None = setting(
        _LOSS.max_completion_length,
        ge=1,
        doc="L of dr_grpo's B * L normalizer; null = the longest sequence of the batch.",
    )
    sapo_temperature_pos: float = setting(
        _LOSS.sapo_temperature_pos, gt=0, doc="sapo: temperature of the soft gate where the advantage is > 0."
    )
    sapo_temperature_neg: float = setting(
        _LOSS.sapo_temperature_neg, gt=0, doc="sapo: temperature of the soft gate where the advantage is <= 0"
    )
    vespo_k_pos: float = setting(
        _LOSS.vespo_k_pos, doc="vespo: shape k of the Gamma weight e^λ w^k e^(-λw) for advantages >= 0."
    )
    vespo_lambda_pos: float = setting(_LOSS.vespo_lambda_pos, doc="vespo: rate λ for advantages >= 0.")
    vespo_k_neg: float = setting(_LOSS.vespo_k_neg, doc="vespo: shape k for advantages < 0.")
    vespo_lambda_neg: float = setting(_LOSS.vespo_lambda_neg, doc="vespo: rate λ for advantages < 0.")
    use_bias_correction_kl: bool = setting(
        _LOSS.use_bias_correction_kl,
        doc="Multiply the KL term by the importance ratio (DeepSeek-V3.2; TRL's default is true).",
    )
    entropy_coef: float = setting(
        _LOSS.entropy_coef,
        doc="Entropy bonus: loss -= entropy_coef * entropy, reduced with the loss type's token weights "
        "(dapo: the token mean); 0 = off.",
    )
    advantage_scale: str = setting(
        "group",
        choices=ADVANTAGE_SCALES,
        doc="Divide the centered rewards by the group's std, the batch's std, or nothing (none, Dr. GRPO).",
    )
    advantage_eps: float = setting(1e-6, ge=0, doc="Added to the std before dividing.")
    drop_zero_variance_groups: bool = setting(
        True,
        doc="Drop groups whose rewards are all equal (zero advantage) before the update; counted in the "
        "metrics.",
    )
    mu: int = setting(
        1,
        ge=1,
        doc="Optimizer updates per rollout batch (TRL's num_iterations); > 1 computes the old log-probs once "
        "per step.",
    )
    impl: str = setting(
        "auto",
        choices=IMPLS,
        doc="Loss implementation: auto = Triton on CUDA, the chunked torch path otherwise.",
    )

    def _validate(self) -> None:
        try:
            self.options()
        except ValueError as e:  # LossOptions' messages start with the field name
            raise ConfigError(f"loss.{e}", self._path(str(e).split(":", 1)[0])) from None

    def options(self) -> LossOptions:
        """The ``LossOptions`` for ``grpo_loss`` / ``fused_linear_grpo_loss``."""
        return LossOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossOptions)})


MOVED_TO_TRAIN = (
    "total_steps",
    "questions_per_step",
    "max_tokens_per_microbatch",
    "packing_balance",
    "max_nonfinite_updates",
)
"""Keys that were in ``optim`` before the ``train`` section existed (``load_config`` still reads them
there, with a warning; docs/training.md)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig(Section):
    """The optimizer (AdamW) and its learning-rate schedule, per optimizer update."""

    _section = "optim"
    _moved = {name: f"train.{name}" for name in MOVED_TO_TRAIN}
    lr: float = setting(1e-6, gt=0, doc="AdamW peak learning rate.")
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1, doc="AdamW's (beta1, beta2).")
    eps: float = setting(1e-8, gt=0, doc="AdamW's epsilon.")
    weight_decay: float = setting(0.0, ge=0, doc="AdamW's decoupled weight decay.")
    warmup_steps: int = setting(
        0,
        ge=0,
        doc="Linear warmup from 0 over this many steps (times loss.mu updates); may exceed train.total_steps "
        "(the peak is then never reached).",
    )
    schedule: str = setting(
        "cosine",
        choices=("cosine", "linear", "constant"),
        doc="After warmup: cosine or linear decay to min_lr_ratio * lr at train.total_steps, or constant.",
    )
    min_lr_ratio: float = setting(
        0.0, ge=0, le=1, doc="The LR at the end of a cosine/linear schedule, as a fraction of lr."
    )
    grad_clip: float | None = setting(1.0, gt=0, doc="Clip the global gradient norm to this; null = off.")


@dataclass(frozen=True, kw_only=True)
class TrainLoopConfig(Section):
    """The training loop: how many steps, how many questions each, how they are packed (``train``)."""

    _section = "train"
    total_steps: int = setting(
        200, ge=1, doc="Training steps; each is one rollout batch and loss.mu optimizer updates."
    )
    questions_per_step: int = setting(
        32,
        ge=1,
        doc="Distinct questions per step over all ranks (the same for grpo and mgrpo: the equal-budget rule "
        "changes group sizes only).",
    )
    max_tokens_per_microbatch: int = setting(
        16384,
        ge=1,
        lt=2**31,
        doc="Token budget of a packed micro-batch (both layers' sequences together); a longer sequence gets "
        "a micro-batch of its own.",
    )
    packing_balance: str = setting(
        "attention",
        choices=("attention", "tokens"),
        doc="What the planner balances across ranks: attention = a FLOP-proportional cost (32768 * tokens + "
        "the sum of squared lengths), or tokens.",
    )
    max_nonfinite_updates: int = setting(
        3,
        ge=1,
        doc="An update whose loss or gradient norm is NaN/Inf is skipped and counted; this many in a row "
        "stop the run with an error (DeepSpeed: the first one).",
    )


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(Section):
    """Checkpoints, written atomically (temporary directory, fsync, rename) and verified on load."""

    _section = "checkpoint"
    dir: str | None = setting(None, doc="Checkpoint directory; null = {logging.run_dir}/checkpoints.")
    every: int = setting(50, ge=0, doc="Save every K steps; 0 = only at the end.")
    keep_last: int | None = setting(2, ge=1, doc="Keep the newest n checkpoints; null = all.")
    resume: bool | str = setting(
        False,
        doc="false = a fresh run; true = continue from the newest checkpoint in dir (--resume on the command "
        "line); a path = from that checkpoint.",
    )
    export_final: bool = setting(True, doc="save_pretrained the final policy to {logging.run_dir}/final.")
    allow_changes: tuple[str, ...] = setting(
        (),
        doc="Fields a resumed run may change besides the safe ones (step counts, logging, eval): dotted keys "
        "or patterns ('loss.*'; '*' = anything).",
    )

    def _validate(self) -> None:
        self._require("resume", self.resume != "", "true, false or a checkpoint path")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig(Section):
    """Run directory and metric sinks (rank 0 only)."""

    _section = "logging"
    run_dir: str = setting(
        "runs/{algo}", doc="Holds config.yaml, metrics and checkpoints; {algo} and {seed} are filled in."
    )
    jsonl: bool = setting(True, doc="Write {run_dir}/metrics.jsonl.")
    tensorboard: bool = setting(
        True, doc="Write TensorBoard event files (skipped with a warning if tensorboard is not installed)."
    )
    wandb: bool = setting(False, doc="Log to Weights & Biases.")
    wandb_project: str = setting("mgrpo_fast", doc="The Weights & Biases project.")
    log_every: int = setting(1, ge=1, doc="Write metrics every n steps.")
    progress: bool = setting(True, doc="Show a progress bar with the live reward and accuracy.")
    overwrite: bool = setting(
        False,
        doc="A fresh run in a directory holding another run's checkpoints or metrics deletes them first "
        "(--overwrite); without it such a run is refused.",
    )

    def _validate(self) -> None:
        try:
            ok = bool(self.run_dir.format(algo="grpo", seed=0).strip())
        except (KeyError, IndexError, ValueError):
            ok = False
        self._require("run_dir", ok, "a non-empty path whose only {placeholders} are {algo} and {seed}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Section):
    """Two-pass evaluation (``mgrpo_fast.rl.evaluate``: Acc@t1, Acc@t2, Δ, Δi→c, Δc→i) during training,
    on ``data.eval_files`` (empty = the bundled task's test split); ``mgrpo-eval`` runs it alone."""

    _section = "eval"
    every: int = setting(0, ge=0, doc="Evaluate every K training steps; 0 = off.")
    at_start: bool = setting(False, doc="Evaluate before the first step.")
    at_end: bool = setting(True, doc="Evaluate after the last step.")
    num_problems: int | None = setting(200, ge=1, doc="Evaluate on the first n eval problems; null = all.")
    temperature: float = setting(0.0, ge=0, doc="Sampling temperature of both passes; 0 = greedy.")
    max_new_tokens: int | None = setting(
        None,
        ge=1,
        doc="Per pass; null = rollout.max_new_tokens for the first answer and layer2.max_new_tokens for the "
        "correction.",
    )
    guiding_phrase: str | None = setting(
        None, doc="The phrase before pass 2; null = the first of layer2.guiding_phrases."
    )
    seed: int = setting(0, ge=0, doc="Sampling seed when temperature > 0.")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig(Section):
    """Multi-process training under ``torchrun`` (the same config runs in one process without it)."""

    _section = "parallel"
    engine: str = setting(
        "auto",
        choices=("auto", "fsdp2", "deepspeed"),
        doc="Under torchrun: auto (= fsdp2: fully_shard per decoder layer) or deepspeed (ZeRO).",
    )
    zero_stage: int = setting(
        2,
        choices=(2, 3),
        doc="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also the parameters.",
    )
    mixed_precision: str = setting(
        "auto", choices=("auto", "bf16", "fp16", "no"), doc="auto = bf16 compute on CUDA, off on CPU."
    )
    reduce_dtype: str = setting(
        "float32", choices=("float32", "bfloat16"), doc="Dtype of the gradient reduction across ranks."
    )
    backend: str = setting(
        "auto",
        choices=("auto", "nccl", "gloo"),
        doc="Process group backend; auto = nccl on CUDA, gloo on CPU.",
    )
    reshard_after_forward: bool = setting(
        True,
        doc="FSDP2 frees the gathered parameters after the forward (less memory, one more all-gather in the "
        "backward).",
    )
