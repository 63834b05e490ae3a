"""The whole run's configuration: :class:`TrainConfig` nests the sections of :mod:`.sections`, fills in
the derived values (:meth:`TrainConfig.resolved`: the equal-budget group size, seeds, paths) and writes
the resolved config into the run directory.

**Equal rollout budget.** Per question MGRPO generates ``G1`` layer-1 completions (at most
``T1 = rollout.max_new_tokens`` tokens each) and ``G2`` continuations (at most
``T2 = layer2.max_new_tokens``) for each of ``|S|`` selected first answers: ``|S| = G1`` for
``all``, ``min(k, G1)`` for ``sample:k``, at most ``G1`` for ``wrong_only`` (charged at that bound, so
GRPO never gets less). GRPO, which has layer 1 only, gets ``G1' = G1 + ceil(|S| * G2 * T2 / T1)``
(``G1 * (1 + G2)`` = 40 for the defaults): the same completion tokens per question at the
``max_new_tokens`` caps, the same number of completions when ``T2 = T1``, and the same
``train.questions_per_step``. Prefill is not counted (layer-2 prompts also hold ``o_i``).
``layer1.group_size: auto`` (default) resolves to ``layer1.mgrpo_group_size`` (8) for ``mgrpo`` and to
``G1'`` for ``grpo`` in :meth:`~mgrpo_fast.config.run.TrainConfig.resolved`, so one file run with
``--algo grpo`` and with ``--algo mgrpo`` compares at equal budget; an explicit ``group_size`` is used
as given.

Precedence: defaults < YAML file < command-line overrides (left to right). A bad key or value raises
:class:`~mgrpo_fast.config.fields.ConfigError` naming the dotted path, prefixed by ``file:line`` or the
override (loading lives in :mod:`mgrpo_fast.config.loading`)::

    from mgrpo_fast.config.loading import load_config

    cfg = load_config("configs/mgrpo_default.yaml", ["--layer2.group_size=2", "--loss.delta", "null"])
    cfg.save_resolved()  # {logging.run_dir}/config.yaml, written atomically

YAML floats such as ``1e-6`` are numbers (YAML 1.2). An override value is read as YAML
(``--layer2.guiding_phrases='["a", "b"]'``, ``--loss.delta=null``); where that does not fit a string
field the raw text is kept (``--data.system_prompt='Be: brief'``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml

from mgrpo_fast.config.fields import ConfigError, Section, YamlDumper, fail, from_dict, setting, to_plain
from mgrpo_fast.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    Layer1Config,
    Layer2Config,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    TrainLoopConfig,
    parse_selection,
)

__all__ = ["ALGOS", "TrainConfig", "equal_budget_group_size"]

ALGOS = ("mgrpo", "grpo")


def equal_budget_group_size(
    g1: int,
    g2: int,
    selection: str = "all",
    max_new_tokens: int = 1,
    layer2_max_new_tokens: int | None = None,
) -> int:
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
class TrainConfig(Section):
    """The whole run: the algorithm, the seed and one section per concern (``--help`` lists them)."""

    algo: str = setting(
        "mgrpo",
        choices=ALGOS,
        doc="mgrpo trains both layers; grpo layer 1 only, at the rollout budget of the MGRPO run the layer2 "
        "section describes.",
    )
    seed: int = setting(
        0, ge=0, doc="Seeds what is not seeded explicitly: data order, sampling, phrase draws."
    )
    model: ModelConfig = setting(factory=ModelConfig, doc="The policy and its frozen reference.")
    data: DataConfig = setting(factory=DataConfig, doc="Training and evaluation problems, and the prompt.")
    rollout: RolloutConfig = setting(factory=RolloutConfig, doc="Sampling (both layers).")
    layer1: Layer1Config = setting(factory=Layer1Config, doc="Layer 1 (solve): G1 answers per question.")
    layer2: Layer2Config = setting(
        factory=Layer2Config,
        doc="Layer 2 (self-correct): G2 continuations of each selected answer after a guiding phrase.",
    )
    reward: RewardConfig = setting(factory=RewardConfig, doc="Reward functions and the scorer.")
    loss: LossConfig = setting(factory=LossConfig, doc="The GRPO objective and advantages of both layers.")
    train: TrainLoopConfig = setting(
        factory=TrainLoopConfig, doc="The loop: steps, questions per step, packed micro-batches."
    )
    optim: OptimConfig = setting(factory=OptimConfig, doc="AdamW and its learning-rate schedule.")
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, doc="Checkpoints and resume.")
    logging: LoggingConfig = setting(factory=LoggingConfig, doc="Run directory and metrics.")
    eval: EvalConfig = setting(factory=EvalConfig, doc="Two-pass evaluation during training.")
    parallel: ParallelConfig = setting(
        factory=ParallelConfig, doc="torchrun: FSDP2 or DeepSpeed, mixed precision."
    )

    def _validate(self) -> None:
        enabled = self.layer2.enabled
        if enabled != "auto" and enabled != (self.algo == "mgrpo"):
            raise ConfigError(
                f"layer2.enabled: {enabled} contradicts algo: {self.algo} (mgrpo trains both "
                "layers, grpo layer 1 only); leave it auto",
                "layer2.enabled",
            )
        g1 = self.layer1.group_size
        g1 = self.layer1.mgrpo_group_size if g1 == "auto" or self.algo == "grpo" else g1
        k = self.layer2.selection_k
        if k is not None and k > g1:
            raise ConfigError(
                f"layer2.selection: sample:{k} selects more than the {g1} layer-1 responses "
                "per question (layer1.group_size)",
                "layer2.selection",
            )

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
            model=rep(
                self.model,
                tokenizer_path=pick(self.model.tokenizer_path, self.model.path),
                ref_path=pick(self.model.ref_path, self.model.path),
            ),
            data=rep(self.data, shuffle_seed=pick(self.data.shuffle_seed, seed)),
            rollout=rep(
                self.rollout, seed=pick(self.rollout.seed, seed), backend=self.rollout.resolved_backend()
            ),
            layer1=rep(l1, group_size=g1),
            layer2=rep(l2, enabled=self.algo == "mgrpo", max_new_tokens=t2),
            checkpoint=rep(self.checkpoint, dir=ckpt),
            logging=rep(self.logging, run_dir=run_dir),
        )

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
