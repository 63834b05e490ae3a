"""Training configuration: nested dataclasses, a YAML file and ``--key.sub=value`` overrides.

Precedence: defaults < YAML file < command-line overrides (left to right). Each section is a frozen
``kw_only`` dataclass that converts and validates its fields in ``__post_init__``; a bad key or value
raises :class:`ConfigError` naming the dotted path, prefixed by ``file:line`` or the override
(loading lives in :mod:`mgrpo_fast.config.loading`)::

    from mgrpo_fast.config.loading import load_config

    cfg = load_config("configs/mgrpo_default.yaml", ["--layer2.group_size=2", "--loss.delta", "null"])
    cfg.save_resolved()  # {logging.run_dir}/config.yaml, written atomically

YAML floats such as ``1e-6`` are numbers (YAML 1.2). An override value is read as YAML
(``--layer2.guiding_phrases='["a", "b"]'``, ``--loss.delta=null``); where that does not fit a string
field the raw text is kept (``--data.system_prompt='Be: brief'``).

**Equal rollout budget.** Per question MGRPO generates ``G1`` layer-1 completions (at most
``T1 = rollout.max_new_tokens`` tokens each) and ``G2`` continuations (at most
``T2 = layer2.max_new_tokens``) for each of ``|S|`` selected first answers: ``|S| = G1`` for
``all``, ``min(k, G1)`` for ``sample:k``, at most ``G1`` for ``wrong_only`` (charged at that bound, so
GRPO never gets less). GRPO, which has layer 1 only, gets ``G1' = G1 + ceil(|S| * G2 * T2 / T1)``
(``G1 * (1 + G2)`` = 40 for the defaults): the same completion tokens per question at the
``max_new_tokens`` caps, the same number of completions when ``T2 = T1``, and the same
``optim.questions_per_step``. Prefill is not counted (layer-2 prompts also hold ``o_i``).
``layer1.group_size: auto`` (default) resolves to ``layer1.mgrpo_group_size`` (8) for ``mgrpo`` and to
``G1'`` for ``grpo`` in :meth:`TrainConfig.resolved`, so one file run with ``--algo grpo`` and with
``--algo mgrpo`` compares at equal budget; an explicit ``group_size`` is used as given.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from mgrpo_fast.config.fields import (
    ConfigError,
    Section,
    YamlDumper,
    fail,
    from_dict,
    setting,
    to_plain,
)
from mgrpo_fast.data.problems import FORMATS
from mgrpo_fast.data.prompts import DEFAULT_GUIDING_PHRASES, DEFAULT_INSTRUCTION
from mgrpo_fast.ops.dispatch import IMPLS
from mgrpo_fast.ops.options import ADVANTAGE_SCALES, LossOptions

ALGOS = ("mgrpo", "grpo")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
_LOSS = LossOptions()  # its defaults are the loss section's


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """Policy and reference (``mgrpo_fast.models.policy.load_policy``).

    ``path``: local ``save_pretrained`` directory (null = the bundled demo model); ``tokenizer_path``:
    null = ``path``; ``dtype``: the parameter (master weight) dtype: ``auto`` (= ``float32``; bf16
    compute on CUDA comes from ``parallel.mixed_precision``), ``float32``, ``bfloat16``, ``float16``
    (``fp32``/``bf16``/``fp16`` accepted); ``attn_implementation``: ``mgrpo_packed`` (packed
    varlen) or a transformers one; ``gradient_checkpointing``: recompute decoder layers in the
    backward; ``liger_kernels``: liger-kernel's RMSNorm/SwiGLU/RoPE; ``ref_path``: the frozen reference,
    loaded only when ``loss.beta > 0`` (null = same as the policy, ``path``).
    """

    _section = "model"
    path: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "mgrpo_packed"
    gradient_checkpointing: bool = False
    liger_kernels: bool = False
    ref_path: str | None = None

    def _validate(self) -> None:
        object.__setattr__(self, "dtype", _DTYPE_ALIASES.get(self.dtype.lower(), self.dtype.lower()))
        self._require("dtype", self.dtype in DTYPES, f"one of {', '.join(DTYPES)}")
        self._require("attn_implementation", bool(self.attn_implementation.strip()), "a non-empty string")


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Problems and prompts (``mgrpo_fast.data.problems.load_problems`` / ``build_prompt``).

    ``train_files``, ``eval_files``: JSONL/Parquet paths (a string or a list; empty = the bundled
    task); ``format``: ``auto`` (per file), ``gsm8k``, ``math``; ``file_type``: ``auto`` (by extension),
    ``jsonl``, ``parquet``; ``question_field``, ``answer_field``, ``solution_field``, ``id_field``: null =
    the format's names; ``dedupe``: drop repeated questions; ``shuffle``: shuffle the training problems
    with ``shuffle_seed`` (null = the top-level ``seed``); ``limit``, ``eval_limit``: keep at most this
    many (null = all); ``template``: ``chat`` (the tokenizer's chat template when it has one) or
    ``plain``; ``system_prompt``: optional system turn; ``instruction``: appended to the question (null
    = none); ``max_prompt_tokens``: longer prompts are skipped and counted (null = no limit).
    """

    _section = "data"
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    format: str = setting("auto", choices=("auto", *FORMATS))
    file_type: str = setting("auto", choices=("auto", "jsonl", "parquet"))
    question_field: str | None = None
    answer_field: str | None = None
    solution_field: str | None = None
    id_field: str | None = None
    dedupe: bool = False
    shuffle: bool = True
    shuffle_seed: int | None = setting(None, ge=0)
    limit: int | None = setting(None, ge=0)
    eval_limit: int | None = setting(None, ge=0)
    template: str = setting("chat", choices=("chat", "plain"))
    system_prompt: str | None = None
    instruction: str | None = DEFAULT_INSTRUCTION
    max_prompt_tokens: int | None = setting(None, ge=1)


@dataclass(frozen=True, kw_only=True)
class RolloutConfig(Section):
    """Sampling of both layers (``mgrpo_fast.rl.rollout.base``).

    ``backend``: ``hf_generate`` (transformers ``generate``, KV cache); ``temperature`` (> 0; the
    update's log-probs use it too), ``top_p`` (1 = off), ``top_k`` (0 = off); ``max_new_tokens``: cap
    ``T1`` of a layer-1 completion; ``stop``: strings that end a completion (besides EOS);
    ``batch_size``: sequences per ``generate`` call; ``seed``: null = the top-level ``seed``;
    ``return_logprobs``: also return the sampling log-probs.
    """

    _section = "rollout"
    backend: str = setting("hf_generate", choices=("hf_generate",))
    temperature: float = setting(1.0, gt=0)
    top_p: float = setting(1.0, gt=0, le=1)
    top_k: int = setting(0, ge=0)
    max_new_tokens: int = setting(512, ge=1)
    stop: tuple[str, ...] = ()
    batch_size: int = setting(64, ge=1)
    seed: int | None = setting(None, ge=0)
    return_logprobs: bool = False

    def _validate(self) -> None:
        self._require("stop", all(self.stop), "a list of non-empty strings")


@dataclass(frozen=True, kw_only=True)
class Layer1Config(Section):
    """Layer 1 (solve): ``G1`` responses per question, advantages normalized within that group.

    ``group_size``: ``G1``; ``auto`` (or null) = ``mgrpo_group_size`` for ``mgrpo`` and the equal-budget
    ``G1'`` (module docstring, :func:`equal_budget_group_size`) for ``grpo``; an integer is used as is.
    ``mgrpo_group_size``: the MGRPO ``G1`` that ``auto`` stands for (docs/algorithm.md: 8).
    """

    _section = "layer1"
    group_size: int | Literal["auto"] | None = setting("auto", ge=1)
    mgrpo_group_size: int = setting(8, ge=1)

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
    """Layer 2 (self-correct), docs/algorithm.md.

    ``enabled``: ``auto`` = on for ``mgrpo``, off for ``grpo`` (an explicit value must agree with
    ``algo``); ``group_size``: ``G2`` continuations per selected (q, o_i); ``selection``: ``all``,
    ``wrong_only`` or ``sample:k`` (k first answers per question, drawn at random); ``guiding_phrases``:
    one drawn at random per (q, o_i) (default: the five in docs/algorithm.md); ``separator``: text
    between o_i and the
    phrase; ``shaping_alpha``: α >= 0, +α wrong->right, -α right->wrong; ``loss_weight``: λ2, weight of
    the layer-2 loss; ``max_new_tokens``: continuation cap ``T2`` (null = ``rollout.max_new_tokens``).
    """

    _section = "layer2"
    enabled: bool | Literal["auto"] = "auto"
    group_size: int = setting(4, ge=1)
    selection: str = "all"
    guiding_phrases: tuple[str, ...] = DEFAULT_GUIDING_PHRASES
    separator: str = "\n\n"
    shaping_alpha: float = setting(0.0, ge=0)
    loss_weight: float = setting(1.0, ge=0)
    max_new_tokens: int | None = setting(None, ge=1)

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


def equal_budget_group_size(g1: int, g2: int, selection: str = "all", max_new_tokens: int = 1,
                            layer2_max_new_tokens: int | None = None) -> int:  # fmt: skip
    """GRPO's group size at the rollout budget of MGRPO with ``G1 = g1``, ``G2 = g2``, ``selection``,
    ``T1 = max_new_tokens``, ``T2 = layer2_max_new_tokens`` (None = T1): ``G1 + ceil(|S| * G2 * T2 / T1)``,
    ``|S| = G1`` (``all``; ``wrong_only`` at its upper bound) or ``min(k, G1)`` (``sample:k``).
    ``equal_budget_group_size(8, 4) == 40``; ``(8, 4, "sample:2") == 16``."""
    t2 = max_new_tokens if layer2_max_new_tokens is None else layer2_max_new_tokens
    checks = {"g1": g1, "g2": g2, "max_new_tokens": max_new_tokens, "layer2_max_new_tokens": t2}
    for name, v in checks.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fail(name, "an integer >= 1", v)
    k = parse_selection(selection, "selection")[1]
    selected = g1 if k is None else min(k, g1)
    return g1 + -(-selected * g2 * t2 // max_new_tokens)


@dataclass(frozen=True, kw_only=True)
class RewardConfig(Section):
    """Rewards (``mgrpo_fast.rl.scorer.RewardScorer``; :meth:`scorer_fns` gives its entries).

    ``functions``: mapping ``"module:function"`` (or ``"file.py:function"``) -> weight (default: the
    verifier ``mgrpo_fast.rl.rewards:correctness_reward``, weight 1); ``format_weight``: weight of
    ``mgrpo_fast.rl.rewards:format_reward`` (0 = off); ``timeout_s``: per-call limit (a hanging or raising
    call scores 0 and is counted; null = none); ``num_workers``: scorer processes (0 = in-process).
    """

    _section = "reward"
    functions: dict[str, float] = setting(factory=lambda: {"mgrpo_fast.rl.rewards:correctness_reward": 1.0})
    format_weight: float = 0.0
    timeout_s: float | None = setting(10.0, gt=0)
    num_workers: int = setting(2, ge=0)

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
    """The objective of both layers (:meth:`options` gives the :class:`~mgrpo_fast.ops.options.LossOptions`).

    ``loss_type``, ``epsilon_low``, ``epsilon_high``, ``delta``, ``beta``, ``kl_estimator``,
    ``importance_sampling_level``, ``max_completion_length``: as in ``LossOptions``, with its defaults
    and checks (``dapo``, 0.2, 0.2, null = no dual clip, 0 = no reference model, ``k3``, ``token``,
    null); ``advantage_scale``: ``group`` (group std), ``batch`` or ``none`` (Dr. GRPO);
    ``advantage_eps``: added to the std; ``drop_zero_variance_groups``: drop groups whose rewards are
    all equal before the update (counted); ``mu``: updates per rollout batch (TRL's
    ``num_iterations``; > 1 computes old log-probs once); ``impl``: ``auto``, ``torch`` or ``triton``.
    """

    _section = "loss"
    loss_type: str = _LOSS.loss_type
    epsilon_low: float = _LOSS.epsilon_low
    epsilon_high: float = _LOSS.epsilon_high
    delta: float | None = _LOSS.delta
    beta: float = _LOSS.beta
    kl_estimator: str = _LOSS.kl_estimator
    importance_sampling_level: str = _LOSS.importance_sampling_level
    max_completion_length: int | None = _LOSS.max_completion_length
    advantage_scale: str = setting("group", choices=ADVANTAGE_SCALES)
    advantage_eps: float = setting(1e-6, ge=0)
    drop_zero_variance_groups: bool = True
    mu: int = setting(1, ge=1)
    impl: str = setting("auto", choices=IMPLS)

    def _validate(self) -> None:
        try:
            self.options()
        except ValueError as e:  # LossOptions' messages start with the field name
            raise ConfigError(f"loss.{e}", self._path(str(e).split(":", 1)[0])) from None

    def options(self) -> LossOptions:
        """The ``LossOptions`` for ``grpo_loss`` / ``fused_linear_grpo_loss``."""
        return LossOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossOptions)})


@dataclass(frozen=True, kw_only=True)
class OptimConfig(Section):
    """Optimizer, schedule and batch sizes.

    ``lr``: AdamW peak learning rate; ``betas``, ``eps``, ``weight_decay``: AdamW's; ``warmup_steps``:
    linear warmup from 0 (may exceed ``total_steps``: the peak is then never reached); ``schedule``:
    then ``cosine`` or ``linear`` (to ``min_lr_ratio`` * lr at ``total_steps``; ``min_lr_ratio`` in
    [0, 1]) or ``constant``; ``grad_clip``: max global grad norm (null = off);
    ``max_tokens_per_microbatch``: token budget of a packed micro-batch (both layers together);
    ``packing_balance``: ``attention`` or ``tokens`` (``plan_microbatches``); ``questions_per_step``:
    distinct questions per step over all ranks (equal for GRPO and MGRPO); ``total_steps``: training
    steps (one rollout batch each, with ``loss.mu`` optimizer updates); ``max_nonfinite_updates``: an
    update whose loss or gradient norm is NaN/Inf is skipped (logged, counted); this many in a row
    stop the run with an error.
    """

    _section = "optim"
    lr: float = setting(1e-6, gt=0)
    betas: tuple[float, float] = setting((0.9, 0.999), ge=0, lt=1)
    eps: float = setting(1e-8, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    warmup_steps: int = setting(0, ge=0)
    schedule: str = setting("cosine", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = setting(0.0, ge=0, le=1)
    grad_clip: float | None = setting(1.0, gt=0)
    max_tokens_per_microbatch: int = setting(16384, ge=1, lt=2**31)
    packing_balance: str = setting("attention", choices=("attention", "tokens"))
    questions_per_step: int = setting(32, ge=1)
    total_steps: int = setting(200, ge=1)
    max_nonfinite_updates: int = setting(3, ge=1)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(Section):
    """Checkpoints (written atomically: temp dir, then rename).

    ``dir``: null = ``{logging.run_dir}/checkpoints``; ``every``: save every K steps (0 = only at the
    end); ``keep_last``: keep the newest n (null = all); ``resume``: false = fresh run, true = the newest
    checkpoint in ``dir``, a path = that checkpoint (``--resume`` on the command line = true);
    ``export_final``: ``save_pretrained`` the final model to ``{run_dir}/final``; ``allow_changes``:
    config fields a resumed run may change besides the safe ones (``mgrpo_fast.rl.run_dir.SAFE_TO_CHANGE``:
    step counts, logging, eval), dotted keys or patterns (``"loss.*"``, ``"*"`` = anything).
    """

    _section = "checkpoint"
    dir: str | None = None
    every: int = setting(50, ge=0)
    keep_last: int | None = setting(2, ge=1)
    resume: bool | str = False
    export_final: bool = True
    allow_changes: tuple[str, ...] = ()

    def _validate(self) -> None:
        self._require("resume", self.resume != "", "true, false or a checkpoint path")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig(Section):
    """Run directory and metric sinks (rank 0 only).

    ``run_dir``: holds ``config.yaml``, metrics and checkpoints (``{algo}`` and ``{seed}`` are filled
    in by :meth:`TrainConfig.resolved`); ``jsonl``: ``metrics.jsonl``; ``tensorboard``: event files
    (skipped with a warning if not installed); ``wandb``: Weights & Biases, project ``wandb_project``;
    ``log_every``: metrics every n steps; ``progress``: a progress bar; ``overwrite``: a fresh run
    (no resume) in a directory holding another run's checkpoints/metrics deletes them first
    (``--overwrite``); without it such a run is refused.
    """

    _section = "logging"
    run_dir: str = "runs/{algo}"
    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mgrpo_fast"
    log_every: int = setting(1, ge=1)
    progress: bool = True
    overwrite: bool = False

    def _validate(self) -> None:
        try:
            ok = bool(self.run_dir.format(algo="grpo", seed=0).strip())
        except (KeyError, IndexError, ValueError):
            ok = False
        self._require("run_dir", ok, "a non-empty path whose only {placeholders} are {algo} and {seed}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Section):
    """Two-pass evaluation (``mgrpo_fast.evaluate``: Acc@t1, Acc@t2, Δ, Δi→c, Δc→i) in training and
    in ``mgrpo-eval``, on ``data.eval_files`` (empty = the bundled task's test split).

    ``every``: every K training steps (0 = off); ``at_start`` / ``at_end``: before the first and after
    the last step; ``num_problems``: the first n eval problems (null = all); ``temperature``: 0 =
    greedy (both passes); ``max_new_tokens``: null = ``rollout.max_new_tokens`` for the first answer
    and ``layer2.max_new_tokens`` for the correction; ``guiding_phrase``: null = the first of
    ``layer2.guiding_phrases``; ``seed``: sampling seed when ``temperature > 0``.
    """

    _section = "eval"
    every: int = setting(0, ge=0)
    at_start: bool = False
    at_end: bool = True
    num_problems: int | None = setting(200, ge=1)
    temperature: float = setting(0.0, ge=0)
    max_new_tokens: int | None = setting(None, ge=1)
    guiding_phrase: str | None = None
    seed: int = setting(0, ge=0)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig(Section):
    """Multi-process training under ``torchrun`` (one process without it).

    ``engine``: ``auto`` (= ``fsdp2``), ``fsdp2`` (``fully_shard`` per decoder layer) or ``deepspeed``;
    ``zero_stage``: DeepSpeed ZeRO stage 2 or 3; ``mixed_precision``: ``auto`` (bf16 on CUDA, off on
    CPU), ``bf16``, ``fp16``, ``no``; ``reduce_dtype``: gradient reduction dtype; ``backend``: ``auto``
    (nccl on CUDA, gloo on CPU), ``nccl``, ``gloo``; ``reshard_after_forward``: FSDP2 frees gathered
    parameters after the forward.
    """

    _section = "parallel"
    engine: str = setting("auto", choices=("auto", "fsdp2", "deepspeed"))
    zero_stage: int = setting(2, choices=(2, 3))
    mixed_precision: str = setting("auto", choices=("auto", "bf16", "fp16", "no"))
    reduce_dtype: str = setting("float32", choices=("float32", "bfloat16"))
    backend: str = setting("auto", choices=("auto", "nccl", "gloo"))
    reshard_after_forward: bool = True


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    """The whole run.

    ``algo``: ``mgrpo`` (both layers) or ``grpo`` (layer 1 only), compared at an equal rollout budget:
    with ``layer1.group_size: auto`` GRPO gets ``G1' = G1 + ceil(|S|·G2·T2/T1)`` (``G1·(1+G2)`` = 40
    with the defaults), the layer2 section describing the MGRPO run it is matched to (module docstring).
    ``seed``: seeds what is not seeded explicitly (data order, sampling, phrase draws). ``model``,
    ``data``, ``rollout``, ``layer1``, ``layer2``, ``reward``, ``loss``, ``optim``, ``checkpoint``,
    ``logging``, ``eval``, ``parallel``: the sections above.
    """

    algo: str = setting("mgrpo", choices=ALGOS)
    seed: int = setting(0, ge=0)
    model: ModelConfig = setting(factory=ModelConfig)
    data: DataConfig = setting(factory=DataConfig)
    rollout: RolloutConfig = setting(factory=RolloutConfig)
    layer1: Layer1Config = setting(factory=Layer1Config)
    layer2: Layer2Config = setting(factory=Layer2Config)
    reward: RewardConfig = setting(factory=RewardConfig)
    loss: LossConfig = setting(factory=LossConfig)
    optim: OptimConfig = setting(factory=OptimConfig)
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig)
    logging: LoggingConfig = setting(factory=LoggingConfig)
    eval: EvalConfig = setting(factory=EvalConfig)
    parallel: ParallelConfig = setting(factory=ParallelConfig)

    def _validate(self) -> None:
        enabled = self.layer2.enabled
        if enabled != "auto" and enabled != (self.algo == "mgrpo"):
            raise ConfigError(f"layer2.enabled: {enabled} contradicts algo: {self.algo} (mgrpo trains both "
                              "layers, grpo layer 1 only); leave it auto", "layer2.enabled")  # fmt: skip
        g1 = self.layer1.group_size
        g1 = self.layer1.mgrpo_group_size if g1 == "auto" or self.algo == "grpo" else g1
        k = self.layer2.selection_k
        if k is not None and k > g1:
            raise ConfigError(f"layer2.selection: sample:{k} selects more than the {g1} layer-1 responses "
                              "per question (layer1.group_size)", "layer2.selection")  # fmt: skip

    def resolved(self) -> TrainConfig:
        """A copy with every ``auto``/null derived value filled in (idempotent): ``layer1.group_size``
        (the equal-budget rule for grpo), ``layer2.enabled``, ``layer2.max_new_tokens``, the seeds,
        ``model.tokenizer_path``/``ref_path``, ``logging.run_dir`` and ``checkpoint.dir``."""
        l1, l2, rep, seed = self.layer1, self.layer2, dataclasses.replace, self.seed
        t2 = l2.max_new_tokens or self.rollout.max_new_tokens
        g1 = l1.mgrpo_group_size if l1.group_size == "auto" else l1.group_size
        if l1.group_size == "auto" and self.algo == "grpo":
            g1 = equal_budget_group_size(g1, l2.group_size, l2.selection, self.rollout.max_new_tokens, t2)
        run_dir = self.logging.run_dir.format(algo=self.algo, seed=seed)
        ckpt = os.path.join(run_dir, "checkpoints") if self.checkpoint.dir is None else self.checkpoint.dir

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return rep(
            self,
            model=rep(self.model, tokenizer_path=pick(self.model.tokenizer_path, self.model.path),
                      ref_path=pick(self.model.ref_path, self.model.path)),
            data=rep(self.data, shuffle_seed=pick(self.data.shuffle_seed, seed)),
            rollout=rep(self.rollout, seed=pick(self.rollout.seed, seed)),
            layer1=rep(l1, group_size=g1),
            layer2=rep(l2, enabled=self.algo == "mgrpo", max_new_tokens=t2),
            checkpoint=rep(self.checkpoint, dir=ckpt),
            logging=rep(self.logging, run_dir=run_dir),
        )  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From nested dicts; unknown keys and bad values raise :class:`ConfigError`."""
        return from_dict(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=YamlDumper, sort_keys=False, allow_unicode=True, width=10**6)

    def save_resolved(self, run_dir: str | os.PathLike | None = None) -> str:
        """Write ``self.resolved()`` to ``{run_dir}/config.yaml`` (default: its ``logging.run_dir``)
        atomically (temp file in that directory, fsync, ``os.replace``); returns the file's path."""
        cfg = self.resolved()
        run_dir = os.fspath(cfg.logging.run_dir if run_dir is None else run_dir)
        os.makedirs(run_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".config.yaml.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(cfg.to_yaml())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, os.path.join(run_dir, "config.yaml"))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return os.path.join(run_dir, "config.yaml")
