"""The MGRPO / GRPO trainer (docs/algorithm.md), one process or one rank of a ``torchrun`` job.

One training step (``train_step``)::

    rollout              layer 1: G1 answers per question; layer 2: G2 continuations per selected answer
    score                verifier (+ format, + shaping) rewards, correctness, failures counted
    compute_advantages   group-normalized per layer, zero-variance groups dropped
    pack                 both layers' sequences into packed micro-batches under the token budget,
                         global per-sequence loss weights (``mgrpo_fast.rl.update``)
    logprobs             old log-probs (μ > 1) and reference log-probs (β > 0), once per step
    forward_backward     per micro-batch: decoder -> loss rows -> fused GRPO loss -> backward
    optimizer_step       LR schedule, the engine's clip + AdamW step (μ times per step)
    sync_rollout_weights the new weights into the rollout engine (vLLM; docs/rollout.md)

Everything random is a function of ``(seed, step)``: the questions (``train_data.QuestionOrder``),
the sampling seeds of both layers, the selection and the guiding phrases. With the model, the AdamW
state and the step restored, a resumed run repeats the uninterrupted one exactly (tested on CPU).
Metrics go to ``{run_dir}/metrics.jsonl`` (and TensorBoard / wandb) on rank 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mgrpo_fast.config.run import TrainConfig
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.data.train_data import (
    QuestionOrder,
    drop_overlong_prompts,
    load_eval_problems,
    load_train_problems,
    step_seed,
)
from mgrpo_fast.engines.base import NonFiniteLossError
from mgrpo_fast.engines.distributed import init_distributed
from mgrpo_fast.engines.factory import make_engine, make_reference
from mgrpo_fast.engines.optim import lr_at
from mgrpo_fast.packing.planner import plan_microbatches
from mgrpo_fast.rl import layers as mgrpo
from mgrpo_fast.rl.checkpoint import latest_checkpoint, load_run_checkpoint, save_run_checkpoint
from mgrpo_fast.rl.evaluate import TwoPassResult, configured_two_pass_correctness, summarize_two_pass
from mgrpo_fast.rl.mismatch import MismatchSums, microbatch_sampler_logprobs, truncated_is_weights
from mgrpo_fast.rl.run_dir import check_checkpoint_config, own_run_directory
from mgrpo_fast.rl.run_log import MetricsWriter, Progress, combine_rank_metrics
from mgrpo_fast.rl.scorer import RewardScorer
from mgrpo_fast.rl.setup import (
    autocast_dtype,
    load_model,
    load_run_tokenizer,
    make_rollout_backend,
    prompt_token_limit,
    sampling_params,
)
from mgrpo_fast.rl.signals import GracefulStop
from mgrpo_fast.rl.update import MetricSums, PackedPolicy, global_sequence_weights, microbatch_targets

logger = logging.getLogger(__name__)

__all__ = ["MGRPOTrainer", "NonFiniteLossError", "lr_at"]


@dataclass
class StepRollouts:
    """Layer-1 and layer-2 rollouts and scores of one step (layer 2 is None for GRPO)."""

    layer1: mgrpo.Layer1Rollout
    scores1: mgrpo.LayerScores
    layer2: mgrpo.Layer2Rollout | None = None
    scores2: mgrpo.LayerScores | None = None


class MGRPOTrainer:
    """Trains a causal LM with MGRPO (or GRPO, ``config.algo``) on one process.

    Args:
        config: the run's :class:`TrainConfig` (resolved here).
        model, tokenizer: optional, already loaded (tests, custom models); default ``model.path``.
        train_problems, eval_problems: optional problem lists; default ``data.*_files`` or the bundled task.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        train_problems: list[Problem] | None = None,
        eval_problems: list[Problem] | None = None,
    ) -> None:
        self.config = cfg = config.resolved()
        self.dist = init_distributed(cfg.parallel.backend)  # None without torchrun
        self.device = (
            self.dist.device if self.dist else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.policy = model if model is not None else load_model(cfg, cfg.model.path, self.device)
        self.tokenizer = tokenizer if tokenizer is not None else load_run_tokenizer(cfg)
        options, temperature = cfg.loss.options(), cfg.rollout.temperature
        wrap = dict(
            temperature=temperature, autocast_dtype=autocast_dtype(cfg, self.device), impl=cfg.loss.impl
        )
        module = PackedPolicy(self.policy, options, **wrap)
        self.engine = make_engine(self.policy, module, cfg, self.dist, self.device)
        self.ref_module = None
        if cfg.loss.beta > 0:  # β = 0 skips the reference model entirely (docs/algorithm.md)
            ref = PackedPolicy(load_model(cfg, cfg.model.ref_path, self.device, frozen=True), options, **wrap)
            self.ref_module = make_reference(ref, cfg, self.dist)
        self.backend = make_rollout_backend(
            cfg, self.policy, self.tokenizer, self.device, self.dist is not None
        )
        self.sync_rollout_weights()  # a vLLM engine starts without the policy's weights
        self.scorer = RewardScorer(cfg.reward.scorer_fns(), cfg.reward.timeout_s, cfg.reward.num_workers)
        problems = train_problems if train_problems is not None else load_train_problems(cfg.data)
        self.train_problems = self._fitting(problems, "the training problems")
        self._eval_problems = eval_problems
        self.order = QuestionOrder(
            len(self.train_problems),
            cfg.train.questions_per_step,
            shuffle=cfg.data.shuffle,
            seed=cfg.data.shuffle_seed,
        )
        self.step = 0  # training steps completed
        self.updates = 0  # optimizer updates attempted (μ per step)
        self.nonfinite_in_a_row = 0
        self.run_dir = Path(cfg.logging.run_dir)
        self.stopped_early = False  # a signal stopped train() before total_steps (checkpoint written)
        self.is_main = self.engine.is_main

    # ------------------------------------------------------------------ set-up
    def _fitting(self, problems: list[Problem], source: str) -> list[Problem]:
        """``problems`` whose prompts fit the context (``data.max_prompt_tokens``, ``data.overlong``)."""
        d = self.config.data
        return drop_overlong_prompts(
            problems,
            self.tokenizer,
            limit=prompt_token_limit(self.config, self.policy, self.tokenizer),
            mode=d.overlong,
            source=source,
            prompt_options=dict(
                system_prompt=d.system_prompt, template=d.template, instruction=d.instruction
            ),
        )

    @property
    def eval_problems(self) -> list[Problem]:
        if self._eval_problems is None:
            problems = load_eval_problems(
                self.config.data.eval_files, self.config.eval.num_problems, self.config.data
            )
            self._eval_problems = self._fitting(problems, "the eval problems")
        return self._eval_problems

    def _seed(self, step: int, stream: int) -> int:
        """The seed of one random stream of ``step`` on this rank (ranks sample independently)."""
        return step_seed(self.config.rollout.seed, step, stream * 4096 + self.engine.rank)

    # ------------------------------------------------------------------ the algorithm's steps
    def rollout(self, step: int, timings: dict[str, float]) -> StepRollouts:
        """Both layers' rollouts and their scores for ``step`` (timed as rollout / scoring)."""
        cfg, e = self.config, self.engine
        problems = [self.train_problems[i] for i in self.order.indices(step, e.rank, e.world_size)]
        d = cfg.data
        t = time.perf_counter()
        with e.generation():
            r1 = mgrpo.rollout_layer1(
                problems,
                self.tokenizer,
                self.backend,
                sampling_params(cfg, cfg.rollout.max_new_tokens),
                cfg.layer1.group_size,
                self._seed(step, 1),
                system_prompt=d.system_prompt,
                template=d.template,
                instruction=d.instruction,
            )
        timings["rollout"] += time.perf_counter() - t
        out = StepRollouts(r1, self.score(r1, timings))
        if cfg.algo == "mgrpo":
            l2 = cfg.layer2
            pairs = mgrpo.select_for_correction(
                out.scores1.correct, l2.selection, random.Random(self._seed(step, 3))
            )
            t = time.perf_counter()
            with e.generation():
                out.layer2 = mgrpo.rollout_layer2(
                    r1,
                    pairs,
                    self.tokenizer,
                    self.backend,
                    sampling_params(cfg, l2.max_new_tokens),
                    l2.group_size,
                    self._seed(step, 2),
                    phrases=l2.guiding_phrases,
                    separator=l2.separator,
                    rng=random.Random(self._seed(step, 4)),
                    guiding_turn=l2.guiding_turn,
                )
            timings["rollout"] += time.perf_counter() - t
            out.scores2 = self.score(out.layer2, timings, first_correct=out.scores1.correct)
        return out

    def score(self, rollout, timings: dict[str, float], first_correct: torch.Tensor | None = None):
        """Rewards and correctness of one layer (``first_correct`` given: layer 2, with shaping)."""
        t = time.perf_counter()
        if first_correct is None:
            scores = mgrpo.score_layer1(rollout, self.scorer)
        else:
            scores = mgrpo.score_layer2(rollout, self.scorer, first_correct, self.config.layer2.shaping_alpha)
        timings["scoring"] += time.perf_counter() - t
        return scores

    def compute_advantages(self, r: StepRollouts) -> tuple[mgrpo.Advantages, mgrpo.TrainingBatch]:
        """Per-layer group advantages and the training sequences of both layers."""
        lc = self.config.loss
        adv = mgrpo.compute_advantages(
            r.scores1,
            r.scores2,
            scale=lc.advantage_scale,
            eps=lc.advantage_eps,
            drop_zero_variance_groups=lc.drop_zero_variance_groups,
        )
        batch = mgrpo.build_training_sequences(
            r.layer1, adv, r.layer2, layer2_loss_weight=self.config.layer2.loss_weight, algo=self.config.algo
        )
        return adv, batch

    def pack(self, batch: mgrpo.TrainingBatch) -> tuple[list, torch.Tensor]:
        """This rank's packed micro-batches of the step's (all-rank) batch, balanced across ranks with
        the same count on every rank, and the global per-sequence loss weights ``(S,)``."""
        cfg = self.config
        m = torch.tensor([s.num_loss_tokens for s in batch.sequences], dtype=torch.float64)
        weights = global_sequence_weights(
            m, batch.loss_weight, cfg.loss.loss_type, max_completion_length=cfg.loss.max_completion_length
        )
        if not batch.sequences:
            return [], weights
        plan = plan_microbatches(
            batch.sequences,
            max_tokens_per_microbatch=cfg.train.max_tokens_per_microbatch,
            world_size=self.engine.world_size,
            balance=cfg.train.packing_balance,
            max_model_len=getattr(self.policy.config, "max_position_embeddings", None),
        )
        return plan.microbatches_for(self.engine.rank, batch.sequences), weights

    def logprobs(self, module: torch.nn.Module, microbatches: list) -> list[torch.Tensor]:
        """``(L,)`` f32 CPU log-probs of the loss rows of each micro-batch under ``module`` (no graph)."""
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                return [module(mb).cpu() for mb in microbatches]
        finally:
            module.train(was_training)

    def forward_backward(self, microbatches: list, targets: list, sums: MetricSums) -> float:
        """Loss and backward of every micro-batch (gradients accumulate); returns the loss of the whole
        batch over all ranks (the micro-batch losses sum to it). Every rank runs every micro-batch, even
        after a NaN/Inf, so the collectives stay matched; ``optimizer_step`` then skips the update."""
        total = torch.zeros((), dtype=torch.float64)
        for k, (mb, tg) in enumerate(zip(microbatches, targets)):
            loss, metrics = self.engine.module(mb, tg)
            self.engine.backward(loss, last=k == len(microbatches) - 1)
            total += loss.detach().double().cpu()
            sums.add(metrics, mb.num_loss_tokens)
        return self.engine.all_reduce([float(total)])[0]

    def optimizer_step(self, loss: float) -> dict[str, float]:
        """The engine's clip + AdamW step at the scheduled LR (it skips a NaN/Inf update, the same
        decision on every rank); stops the run after ``train.max_nonfinite_updates`` skips in a row.
        ``loss``: the update's all-rank loss. Returns the update's ``grad_norm``, ``lr``, ``skipped``."""
        o, t = self.config.optim, self.config.train
        mu = self.config.loss.mu
        lr = lr_at(
            self.updates,
            peak=o.lr,
            total=t.total_steps * mu,
            warmup=o.warmup_steps * mu,
            schedule=o.schedule,
            min_ratio=o.min_lr_ratio,
        )
        result = self.engine.optimizer_step(lr, o.grad_clip, loss)
        if not result.skipped:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            logger.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s): the hidden states or log-probs "
                "hold NaN/Inf; this update is skipped",
                self.step + 1,
                loss,
                result.grad_norm,
            )
            if self.nonfinite_in_a_row >= t.max_nonfinite_updates:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} updates in a row had a NaN/Inf loss or gradient norm "
                    f"(train.max_nonfinite_updates={t.max_nonfinite_updates}); stopping at step "
                    f"{self.step + 1}. Lower optim.lr, check the data, or resume from the last checkpoint"
                )
        self.updates += 1
        return {"grad_norm": result.grad_norm, "lr": result.lr, "skipped": float(result.skipped)}

    def update(self, batch: mgrpo.TrainingBatch, timings: dict[str, float]) -> dict[str, float]:
        """μ optimizer updates on one rollout batch; returns the ``train/*`` metrics."""
        cfg = self.config
        microbatches, weights = self.pack(batch)
        t = time.perf_counter()
        none = [None] * len(microbatches)
        old = self.logprobs(self.engine.module, microbatches) if cfg.loss.mu > 1 else none
        ref = self.logprobs(self.ref_module, microbatches) if self.ref_module is not None else none
        timings["logprob"] += time.perf_counter() - t
        targets = [
            microbatch_targets(mb, batch.advantages, weights, o, r)
            for mb, o, r in zip(microbatches, old, ref)
        ]
        out: dict[str, float] = {
            "train/sequences": float(len(batch)),
            "train/microbatches": float(len(microbatches)),  # per rank (the same on every rank)
            "train/tokens": float(sum(s.num_tokens for s in batch.sequences)),
            "train/loss_tokens": float(batch.num_loss_tokens),
        }
        r, step = cfg.rollout, self.step + 1
        wanted = r.is_correction != "none" or (r.mismatch_every and step % r.mismatch_every == 0)
        if batch.old_logprobs is not None and wanted:  # the same on every rank (the batch is all ranks')
            t = time.perf_counter()
            targets, mismatch = self.sampler_mismatch(microbatches, targets, old, batch.old_logprobs)
            out.update(mismatch)
            timings["mismatch"] = time.perf_counter() - t
        t = time.perf_counter()
        skipped = 0.0
        for _ in range(cfg.loss.mu):
            if not microbatches:  # every group dropped: nothing to learn from this step
                self.updates += 1
                continue
            sums = MetricSums()
            loss = self.forward_backward(microbatches, targets, sums)
            stats = self.optimizer_step(loss)
            skipped += stats.pop("skipped")
            means = MetricSums.merge(self.engine.all_gather_object(sums.sums()))
            out.update({f"train/{k}": v for k, v in {**means, "loss": loss, **stats}.items()})
        timings["update"] += time.perf_counter() - t
        out["train/skipped_updates"] = skipped
        return out

    def sampler_mismatch(
        self, microbatches: list, targets: list, old: list, sampler_logprobs: list[list[float]]
    ) -> tuple[list, dict[str, float]]:
        """The sampler–trainer mismatch metrics (``mgrpo_fast.rl.mismatch``) and, with
        ``rollout.is_correction: tis``, the targets with the truncated IS weights as their ``is_ratio``
        (the loss's ``vllm_is_ratio``: it scales the policy term, not the KL). The trainer's side is the
        old log-probs: computed anyway when μ > 1; with μ = 1 they equal the current ones, computed here
        in one extra pass without a graph."""
        r = self.config.rollout
        if self.config.loss.mu == 1:
            old = self.logprobs(self.engine.module, microbatches)
        sums = MismatchSums(r.is_cap)
        for k, (mb, tg, trainer) in enumerate(zip(microbatches, targets, old)):
            sampler = microbatch_sampler_logprobs(mb, sampler_logprobs)
            sums.add(trainer, sampler)
            if r.is_correction == "tis":
                w = truncated_is_weights(trainer, sampler, r.is_cap, r.is_level, tg.cu_seqlens)
                targets[k] = dataclasses.replace(tg, is_ratio=w.to(tg.token_weight))
        return targets, MetricSums.merge(self.engine.all_gather_object(sums.sums()))

    def sync_rollout_weights(self) -> float:
        """Stream the policy's weights into the rollout engine (a no-op for ``hf``, which samples with
        the policy itself); collective under torchrun. Returns the seconds it took."""
        load = getattr(self.backend, "load_weights", None)
        if load is None:
            return 0.0
        return load(self.engine.full_parameters())

    def train_step(self) -> dict[str, float]:
        """One MGRPO step: rollout, score, advantages, μ packed updates. Returns the step's metrics."""
        step = self.step + 1
        timings = {"rollout": 0.0, "scoring": 0.0, "logprob": 0.0, "update": 0.0}
        t0 = time.perf_counter()
        cache_counts = getattr(self.backend, "prefix_cache_counts", None)  # vLLM's prefix cache
        cached0, submitted0 = cache_counts() if cache_counts is not None else (0, 0)
        r = self.rollout(step, timings)
        adv, batch = self.compute_advantages(r)
        metrics = mgrpo.step_metrics(r.layer1, r.scores1, adv, r.layer2, r.scores2)
        if cache_counts is not None:
            cached, submitted = cache_counts()
            metrics["rollout/prefix_cache_hit"] = (cached - cached0) / max(submitted - submitted0, 1)
        for tag, s in (("reward1/", r.scores1), ("reward2/", r.scores2)):
            if s is not None and s.result is not None:
                metrics.update(s.result.metrics(tag))
        if self.engine.world_size > 1:  # each rank rolled out its own questions: merge, then balance
            metrics = combine_rank_metrics(self.engine.all_gather_object(metrics))
            batch = mgrpo.TrainingBatch.concat(self.engine.all_gather_object(batch))
        sleep = getattr(self.backend, "sleep", None)
        if sleep is not None:  # the rollout engine frees its GPU memory for the update (CUDA)
            sleep()
        metrics.update(self.update(batch, timings))
        timings["weight_sync"] = self.sync_rollout_weights()
        self.step = step
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics["time/step"] = time.perf_counter() - t0
        metrics["train/epoch"] = self.order.epoch_of(step)
        return metrics

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> TwoPassResult:
        """Two-pass evaluation (``eval`` section) of the current policy; each rank evaluates its share
        ``r::W`` of the problems and the correctness is gathered."""
        cfg, e = self.config, self.engine
        with e.generation():
            c1, c2 = configured_two_pass_correctness(
                cfg, self.eval_problems[e.rank :: e.world_size], self.tokenizer, self.backend
            )
        parts = e.all_gather_object((c1, c2))
        return summarize_two_pass(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state (the engine saves the model and optimizer)."""
        return {"step": self.step, "updates": self.updates, "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.updates = int(state["step"]), int(state["updates"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))

    def save_checkpoint(self) -> Path:
        """Write ``{checkpoint.dir}/step-XXXXXXXX`` atomically (collective under torchrun)."""
        ck = self.config.checkpoint
        meta = {**self.state_dict(), "algo": self.config.algo, "seed": self.config.seed}
        path = save_run_checkpoint(ck.dir, self.step, self.engine, meta, self.config.to_yaml(), ck.keep_last)
        logger.info("saved checkpoint %s", path)
        return path

    def resume(self, checkpoint: str | os.PathLike | bool = True) -> Path | None:
        """Load ``checkpoint`` (a path, or True = the newest in ``checkpoint.dir``; None if there is none)."""
        path = latest_checkpoint(self.config.checkpoint.dir) if checkpoint is True else Path(checkpoint)
        if path is None:
            logger.warning("resume: no checkpoint in %s; starting from step 0", self.config.checkpoint.dir)
            return None
        check_checkpoint_config(Path(path), self.config)
        self.load_state_dict(load_run_checkpoint(path, self.engine))
        self.sync_rollout_weights()
        logger.info("resumed from %s at step %d", path, self.step)
        return Path(path)

    def export(self, out_dir: str | os.PathLike) -> Path:
        """``save_pretrained`` the policy and its tokenizer to ``out_dir`` (loadable by transformers)."""
        return self.engine.export(out_dir, self.tokenizer)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        """Run (or resume) to ``train.total_steps``; checkpoints, metrics, eval and the final export."""
        cfg = self.config
        owned = own_run_directory(
            self.engine,
            self.run_dir,
            cfg.checkpoint.dir,
            resume=bool(cfg.checkpoint.resume),
            overwrite=cfg.logging.overwrite,
        )
        with owned, GracefulStop() as stop:
            return self._train(stop)

    def _train(self, stop: GracefulStop) -> dict[str, float]:
        cfg = self.config
        resumed = self.resume(cfg.checkpoint.resume) if cfg.checkpoint.resume else None
        if self.is_main:
            cfg.save_resolved()
        writer = (
            MetricsWriter(
                self.run_dir,
                jsonl=cfg.logging.jsonl,
                tensorboard=cfg.logging.tensorboard,
                wandb=cfg.logging.wandb,
                wandb_project=cfg.logging.wandb_project,
                resume_step=self.step if resumed else None,
                config=cfg.to_dict(),
            )
            if self.is_main
            else None
        )
        bar = Progress(cfg.train.total_steps, self.step, cfg.logging.progress and self.is_main)
        last: dict[str, float] = {}
        try:
            if cfg.eval.at_start and self.step == 0:
                self._log(writer, 0, self.evaluate().as_metrics())
            while self.step < cfg.train.total_steps:
                try:
                    last = self.train_step()
                except NonFiniteLossError:
                    self.save_checkpoint()  # the last good state: skipped updates changed nothing
                    raise
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    last.update(self.evaluate().as_metrics())
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.total_steps:
                    self._log(writer, self.step, last)
                bar.update(last)
                stopping = self.engine.all_reduce([float(stop.requested)], "max")[0] > 0
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or self.step == cfg.train.total_steps or stopping:
                    self.save_checkpoint()
                if stopping:
                    logger.warning(
                        "stopped by a signal after step %d of %d; the checkpoint is in %s: run the same "
                        "command with --resume to continue",
                        self.step,
                        cfg.train.total_steps,
                        cfg.checkpoint.dir,
                    )
                    self.stopped_early = True
                    return last
            if cfg.eval.at_end and not (cfg.eval.every and self.step % cfg.eval.every == 0):
                final = self.evaluate().as_metrics()
                last.update(final)
                self._log(writer, self.step, final)
            if cfg.checkpoint.export_final:  # collective under torchrun; rank 0 writes
                self.export(self.run_dir / "final")
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            self.scorer.close()
            close = getattr(self.backend, "close", None)
            if close is not None:
                close()
        return last

    def _log(self, writer: MetricsWriter | None, step: int, metrics: dict[str, float]) -> None:
        if writer is not None:
            writer.log(step, metrics)
