"""The two MGRPO layers (docs/algorithm.md) as plain functions, one per step of the algorithm.

One training step of MGRPO is::

    r1 = rollout_layer1(problems, tokenizer, backend, params1, G1, seed)      # G1 answers per q
    s1 = score_layer1(r1, scorer)                                              # rewards, correctness
    sel = select_for_correction(s1.correct, "all" | "wrong_only" | "sample:k", rng)
    r2 = rollout_layer2(r1, sel, tokenizer, backend, params2, G2, seed2)      # G2 continuations each
    s2 = score_layer2(r2, scorer, s1.correct, alpha)                           # verifier (+ shaping)
    adv = compute_advantages(s1, s2, scale=..., eps=..., drop_zero_variance_groups=...)
    batch = build_training_sequences(r1, adv, r2, layer2_loss_weight=λ2, algo="mgrpo")
    metrics = step_metrics(r1, s1, adv, r2, s2)

GRPO is the same with layer 2 skipped (``r2 = s2 = None``, ``algo="grpo"``). Nothing here owns an
optimizer or a model; the trainer feeds ``batch.sequences`` with ``batch.advantages`` /
``batch.loss_weight`` / ``batch.old_logprobs`` to the packed loss.

Conventions:

* Layer-1 groups are the G1 answers of one question (group id ``q``); layer-2 groups are the G2
  continuations of one selected pair ``(q, i)`` (group id ``Q + p`` for the ``p``-th selected pair), so
  the ids of both layers are distinct and can go to :func:`group_advantages` together.
* Layer-2 training sequence: prompt = the correction prompt ids (q, then o_i as sampled, then separator
  and guiding phrase), completion = the continuation; only continuation tokens carry the loss.
* Correctness (``answers_match(extract_answer(text), problem.answer)``) is kept apart from the reward,
  which may contain a format term or the layer-2 shaping.
* Δi→c / Δc→i (per selected first answer o_i, using the *mean* correctness ``s_p`` of its G2
  continuations, so a pair with 3 of 4 right continuations counts 0.75): over the P selected pairs,
  ``Δi→c = (1/P) Σ_p [o_p wrong] s_p`` and ``Δc→i = (1/P) Σ_p [o_p right] (1 − s_p)``; then
  ``acc_t2 − acc_t1 = Δi→c − Δc→i`` holds exactly on the selected pairs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mgrpo_fast.config.sections import parse_selection
from mgrpo_fast.data.answers import answers_match, extract_answer
from mgrpo_fast.data.problems import Problem
from mgrpo_fast.data.prompts import (
    DEFAULT_GUIDING_PHRASES,
    DEFAULT_INSTRUCTION,
    CorrectionPrompt,
    build_correction_prompt,
    build_prompt_ids,
)
from mgrpo_fast.ops.advantages import group_advantages
from mgrpo_fast.packing.microbatch import SequenceSpec
from mgrpo_fast.rl.rollout.base import Completion, RolloutBackend, SamplingParams
from mgrpo_fast.rl.scorer import RewardScorer, ScoreResult

__all__ = [
    "Advantages",
    "Layer1Rollout",
    "Layer2Rollout",
    "LayerScores",
    "TrainingBatch",
    "build_training_sequences",
    "compute_advantages",
    "rollout_layer1",
    "rollout_layer2",
    "score_layer1",
    "score_layer2",
    "select_for_correction",
    "step_metrics",
]

ALGOS = ("mgrpo", "grpo")


# ------------------------------------------------------------------------------------------------
# Containers
# ------------------------------------------------------------------------------------------------
@dataclass
class Layer1Rollout:
    """G1 completions per question. ``completions[q * G1 + i]`` is o_i of ``problems[q]``;
    ``prompt_ids[q]`` its prompt; ``prompt_options`` the prompt keywords (reused by layer 2)."""

    problems: list[Problem]
    prompt_ids: list[list[int]]
    completions: list[Completion]
    group_size: int
    prompt_options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_questions(self) -> int:
        return len(self.problems)

    def completion(self, q: int, i: int) -> Completion:
        return self.completions[q * self.group_size + i]

    @property
    def texts(self) -> list[list[str]]:
        g = self.group_size
        return [[c.text for c in self.completions[q * g : (q + 1) * g]] for q in range(self.num_questions)]


@dataclass
class Layer2Rollout:
    """G2 continuations per selected pair: ``pairs[p] = (q, i)``, ``corrections[p]`` its correction
    prompt, ``completions[p * G2 + j]`` the continuation c_pj."""

    problems: list[Problem]
    pairs: list[tuple[int, int]]
    corrections: list[CorrectionPrompt]
    completions: list[Completion]
    group_size: int

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    @property
    def texts(self) -> list[list[str]]:
        g = self.group_size
        return [[c.text for c in self.completions[p * g : (p + 1) * g]] for p in range(self.num_pairs)]


@dataclass
class LayerScores:
    """``rewards`` ``(groups, G)`` float32 (what the advantages use), ``correct`` ``(groups, G)`` bool.
    Layer 2 also has ``verifier_rewards`` (before shaping) and ``first_correct`` ``(P,)``."""

    rewards: torch.Tensor
    correct: torch.Tensor
    result: ScoreResult | None = None
    verifier_rewards: torch.Tensor | None = None
    first_correct: torch.Tensor | None = None


@dataclass
class Advantages:
    """Per-completion advantages ``adv1 (Q, G1)`` / ``adv2 (P, G2)`` and the kept groups
    ``keep1 (Q,)`` / ``keep2 (P,)`` (False = dropped as zero-variance)."""

    adv1: torch.Tensor
    keep1: torch.Tensor
    adv2: torch.Tensor | None = None
    keep2: torch.Tensor | None = None

    @property
    def dropped1(self) -> int:
        return int((~self.keep1).sum())

    @property
    def dropped2(self) -> int:
        return 0 if self.keep2 is None else int((~self.keep2).sum())


@dataclass
class TrainingBatch:
    """The sequences to train, with per-sequence ``advantages`` (N,) f32, ``layer`` (N,) int64 (1|2),
    ``loss_weight`` (N,) f32 (1 or λ2), ``group_id`` (N,) int64 (q, or Q + p), ``question_index`` (N,)
    int64; ``old_logprobs[n]`` the sampling log-probs of the completion tokens, or ``None`` when the
    backend did not return them for every kept sequence."""

    sequences: list[SequenceSpec]
    advantages: torch.Tensor
    layer: torch.Tensor
    loss_weight: torch.Tensor
    group_id: torch.Tensor
    question_index: torch.Tensor
    old_logprobs: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_loss_tokens(self) -> int:
        return sum(s.num_loss_tokens for s in self.sequences)

    @classmethod
    def concat(cls, batches: Sequence[TrainingBatch]) -> TrainingBatch:
        """The batches of all ranks end to end (rank order); ``group_id`` stays rank-local."""
        cat = lambda name, dtype: torch.cat(
            [getattr(b, name) for b in batches] or [torch.zeros(0, dtype=dtype)]
        )  # noqa: E731
        old = None
        if batches and all(b.old_logprobs is not None for b in batches):
            old = [lp for b in batches for lp in b.old_logprobs]
        return cls(
            [s for b in batches for s in b.sequences],
            cat("advantages", torch.float32),
            cat("layer", torch.int64),
            cat("loss_weight", torch.float32),
            cat("group_id", torch.int64),
            cat("question_index", torch.int64),
            old,
        )


# ------------------------------------------------------------------------------------------------
# Layer 1
# ------------------------------------------------------------------------------------------------
def _check_generated(out: list[Completion], n_prompts: int, num_samples: int) -> list[Completion]:
    if len(out) != n_prompts * num_samples:
        raise RuntimeError(
            f"backend returned {len(out)} completions, expected {n_prompts} prompts x {num_samples}"
        )
    for k, c in enumerate(out):
        if (c.prompt_index, c.sample_index) != divmod(k, num_samples):
            raise RuntimeError(
                f"backend output {k} is not prompt-major (got {c.prompt_index}, {c.sample_index})"
            )
    return list(out)


def rollout_layer1(
    problems: Sequence[Problem],
    tokenizer: Any,
    backend: RolloutBackend,
    params: SamplingParams,
    group_size: int,
    seed: int,
    *,
    system_prompt: str | None = None,
    template: str = "chat",
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> Layer1Rollout:
    """Sample ``group_size`` (G1) completions of every problem's prompt (:func:`build_prompt_ids`)."""
    if group_size < 1:
        raise ValueError(f"group_size: expected >= 1, got {group_size}")
    opts = {"system_prompt": system_prompt, "template": template, "instruction": instruction}
    problems = list(problems)
    prompts = [build_prompt_ids(p, tokenizer, **opts) for p in problems]
    out = backend.generate(prompts, num_samples=group_size, params=params, seed=seed) if prompts else []
    return Layer1Rollout(problems, prompts, _check_generated(out, len(prompts), group_size), group_size, opts)


def _score(
    texts: list[str], answers: list[str], scorer: RewardScorer
) -> tuple[torch.Tensor, torch.Tensor, ScoreResult]:
    res = scorer.score(texts, answers)
    correct = torch.tensor(
        [answers_match(extract_answer(t), a) for t, a in zip(texts, answers)], dtype=torch.bool
    )
    return res.rewards.to(torch.float32), correct, res


def score_layer1(rollout: Layer1Rollout, scorer: RewardScorer) -> LayerScores:
    """Rewards ``(Q, G1)`` from ``scorer`` and correctness ``(Q, G1)`` of every first answer."""
    q, g = rollout.num_questions, rollout.group_size
    texts = [c.text for c in rollout.completions]
    answers = [rollout.problems[k // g].answer for k in range(len(texts))]
    rewards, correct, res = _score(texts, answers, scorer)
    return LayerScores(rewards.reshape(q, g), correct.reshape(q, g), res)


def select_for_correction(correct: torch.Tensor, selection: str, rng: random.Random) -> list[tuple[int, int]]:
    """The first answers ``(q, i)`` that get a correction round, sorted by ``(q, i)``.

    ``all``: every answer; ``wrong_only``: the incorrect ones; ``sample:k``: ``min(k, G1)`` answers per
    question drawn without replacement with ``rng`` (one ``rng.sample`` call per question)."""
    mode, k = parse_selection(selection)
    num_q, g1 = correct.shape
    pairs: list[tuple[int, int]] = []
    for q in range(num_q):
        if mode == "all":
            idx = list(range(g1))
        elif mode == "wrong_only":
            idx = [i for i in range(g1) if not bool(correct[q, i])]
        else:
            idx = sorted(rng.sample(range(g1), min(k, g1)))
        pairs += [(q, i) for i in idx]
    return pairs


# ------------------------------------------------------------------------------------------------
# Layer 2
# ------------------------------------------------------------------------------------------------
def rollout_layer2(
    rollout: Layer1Rollout,
    pairs: Sequence[tuple[int, int]],
    tokenizer: Any,
    backend: RolloutBackend,
    params: SamplingParams,
    group_size: int,
    seed: int,
    *,
    phrases: Sequence[str] = DEFAULT_GUIDING_PHRASES,
    separator: str = "\n\n",
    rng: random.Random | None = None,
    guiding_turn: str = "assistant",
) -> Layer2Rollout:
    """Build the correction prompt of every selected ``(q, i)`` and sample ``group_size`` (G2)
    continuations of each. One guiding phrase per pair, drawn in pair order with ``rng`` (default
    ``random.Random(seed)``), placed as ``guiding_turn`` says (``build_correction_prompt``). o_i enters
    the context as its sampled token ids (token-exact)."""
    if group_size < 1:
        raise ValueError(f"group_size: expected >= 1, got {group_size}")
    rng = random.Random(seed) if rng is None else rng
    pairs = [(int(q), int(i)) for q, i in pairs]
    corrections = []
    for q, i in pairs:
        o = rollout.completion(q, i)
        corrections.append(
            build_correction_prompt(
                rollout.problems[q],
                o.text,
                None,
                tokenizer,
                rng=rng,
                phrases=phrases,
                first_answer_ids=o.token_ids,
                separator=separator,
                guiding_turn=guiding_turn,
                **rollout.prompt_options,
            )
        )
    prompts = [c.prompt_ids for c in corrections]
    out = backend.generate(prompts, num_samples=group_size, params=params, seed=seed) if prompts else []
    out = _check_generated(out, len(prompts), group_size)
    return Layer2Rollout(list(rollout.problems), pairs, corrections, out, group_size)


def score_layer2(
    rollout: Layer2Rollout, scorer: RewardScorer, first_correct: torch.Tensor, shaping_alpha: float = 0.0
) -> LayerScores:
    """r2_pj = verifier reward of the continuation c_pj (alone), plus the optional shaping:
    ``+α`` when o_p was wrong and c_pj is right, ``−α`` when o_p was right and c_pj is wrong.
    ``first_correct`` is the layer-1 correctness ``(Q, G1)``."""
    if shaping_alpha < 0:
        raise ValueError(f"shaping_alpha: expected >= 0, got {shaping_alpha}")
    p, g = rollout.num_pairs, rollout.group_size
    texts = [c.text for c in rollout.completions]
    answers = [rollout.problems[rollout.pairs[k // g][0]].answer for k in range(len(texts))]
    if texts:
        verifier, correct, res = _score(texts, answers, scorer)
    else:
        verifier, correct, res = torch.zeros(0), torch.zeros(0, dtype=torch.bool), None
    verifier, correct = verifier.reshape(p, g), correct.reshape(p, g)
    first = torch.tensor([bool(first_correct[q, i]) for q, i in rollout.pairs], dtype=torch.bool)
    first = first.reshape(p)
    shaping = torch.zeros_like(verifier)
    if shaping_alpha:
        f = first[:, None]
        shaping = torch.where(~f & correct, shaping_alpha, shaping)
        shaping = torch.where(f & ~correct, -shaping_alpha, shaping)
    return LayerScores(verifier + shaping, correct, res, verifier_rewards=verifier, first_correct=first)


# ------------------------------------------------------------------------------------------------
# Advantages, training sequences, metrics
# ------------------------------------------------------------------------------------------------
def _layer_advantages(
    rewards: torch.Tensor, scale: str, eps: float, drop: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n, g = rewards.shape
    if n == 0:
        return rewards.new_zeros(0, g), torch.zeros(0, dtype=torch.bool)
    gid = torch.arange(n).repeat_interleave(g)
    adv = group_advantages(rewards.reshape(-1), gid, scale=scale, eps=eps).reshape(n, g)
    constant = rewards.amax(dim=1) == rewards.amin(dim=1)
    keep = ~constant if drop else torch.ones(n, dtype=torch.bool)
    return adv, keep


def compute_advantages(
    scores1: LayerScores,
    scores2: LayerScores | None = None,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    drop_zero_variance_groups: bool = True,
) -> Advantages:
    """Group-normalized advantages per layer (``scale``/``eps`` as ``LossConfig.advantage_scale`` /
    ``advantage_eps``). Layer-1 groups: the G1 answers of q; layer-2 groups: the G2 continuations of
    one (q, o_i). With ``scale="batch"`` the std is that of the layer's rewards. Zero-variance groups
    (all rewards equal) get ``keep = False`` when ``drop_zero_variance_groups``."""
    adv1, keep1 = _layer_advantages(scores1.rewards, scale, eps, drop_zero_variance_groups)
    if scores2 is None:
        return Advantages(adv1, keep1)
    adv2, keep2 = _layer_advantages(scores2.rewards, scale, eps, drop_zero_variance_groups)
    return Advantages(adv1, keep1, adv2, keep2)


def build_training_sequences(
    rollout1: Layer1Rollout,
    advantages: Advantages,
    rollout2: Layer2Rollout | None = None,
    *,
    layer2_loss_weight: float = 1.0,
    algo: str = "mgrpo",
) -> TrainingBatch:
    """Every completion of a kept group as a ``SequenceSpec`` (layer 1 first, then layer 2, in rollout
    order). Layer 2's prompt is the correction prompt, its completion the continuation (the only trained
    part), its ``loss_weight`` λ2. ``algo="grpo"`` trains layer 1 only (``rollout2`` is ignored)."""
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    seqs: list[SequenceSpec] = []
    adv, layer, weight, gid, qidx = [], [], [], [], []
    logps: list[list[float] | None] = []
    g1, num_q = rollout1.group_size, rollout1.num_questions

    def add(prompt, c: Completion, a: float, lay: int, w: float, group: int, q: int) -> None:
        seqs.append(SequenceSpec(list(prompt), list(c.token_ids)))
        adv.append(a), layer.append(lay), weight.append(w), gid.append(group), qidx.append(q)
        logps.append(None if c.logprobs is None else list(c.logprobs))

    for q in range(num_q):
        if bool(advantages.keep1[q]):
            for i in range(g1):
                add(
                    rollout1.prompt_ids[q],
                    rollout1.completion(q, i),
                    float(advantages.adv1[q, i]),
                    1,
                    1.0,
                    q,
                    q,
                )
    if algo == "mgrpo" and rollout2 is not None:
        if advantages.adv2 is None:
            raise ValueError("build_training_sequences: rollout2 given but advantages have no layer 2")
        g2 = rollout2.group_size
        for p, (q, _) in enumerate(rollout2.pairs):
            if bool(advantages.keep2[p]):
                for j in range(g2):
                    c = rollout2.completions[p * g2 + j]
                    add(
                        rollout2.corrections[p].prompt_ids,
                        c,
                        float(advantages.adv2[p, j]),
                        2,
                        float(layer2_loss_weight),
                        num_q + p,
                        q,
                    )
    old = None if any(lp is None for lp in logps) else logps
    return TrainingBatch(
        seqs,
        torch.tensor(adv, dtype=torch.float32),
        torch.tensor(layer, dtype=torch.int64),
        torch.tensor(weight, dtype=torch.float32),
        torch.tensor(gid, dtype=torch.int64),
        torch.tensor(qidx, dtype=torch.int64),
        old,
    )


def _mean(t: torch.Tensor) -> float:
    return float(t.float().mean()) if t.numel() else 0.0


def step_metrics(
    rollout1: Layer1Rollout,
    scores1: LayerScores,
    advantages: Advantages,
    rollout2: Layer2Rollout | None = None,
    scores2: LayerScores | None = None,
) -> dict[str, float]:
    """Flat scalars: reward / accuracy / completion tokens per layer, dropped groups per layer, and for
    layer 2 the first-answer accuracy of the selected pairs (``acc_t1``), the continuations' accuracy
    (``acc_t2``), ``delta = acc_t2 − acc_t1``, ``delta_i_to_c`` and ``delta_c_to_i`` (module docstring:
    mean of the continuations' correctness per selected first answer, over the selected pairs)."""
    tok1 = [len(c.token_ids) for c in rollout1.completions]
    m = {
        "layer1/reward_mean": _mean(scores1.rewards),
        "layer1/accuracy": _mean(scores1.correct),
        "layer1/completion_tokens": float(sum(tok1)),
        "layer1/completion_tokens_mean": sum(tok1) / len(tok1) if tok1 else 0.0,
        "layer1/groups": float(advantages.keep1.numel()),
        "layer1/groups_dropped": float(advantages.dropped1),
    }
    if rollout2 is None or scores2 is None:
        return m
    tok2 = [len(c.token_ids) for c in rollout2.completions]
    first = scores2.first_correct
    s = scores2.correct.float().mean(dim=1) if scores2.correct.numel() else torch.zeros(first.shape)
    p = max(first.numel(), 1)
    acc_t1, acc_t2 = _mean(first), _mean(s)
    m.update(
        {
            "layer2/reward_mean": _mean(scores2.rewards),
            "layer2/verifier_reward_mean": _mean(scores2.verifier_rewards),
            "layer2/accuracy": _mean(scores2.correct),
            "layer2/pairs": float(first.numel()),
            "layer2/acc_t1": acc_t1,
            "layer2/acc_t2": acc_t2,
            "layer2/delta": acc_t2 - acc_t1,
            "layer2/delta_i_to_c": float((s * (~first).float()).sum()) / p,
            "layer2/delta_c_to_i": float(((1 - s) * first.float()).sum()) / p,
            "layer2/completion_tokens": float(sum(tok2)),
            "layer2/completion_tokens_mean": sum(tok2) / len(tok2) if tok2 else 0.0,
            "layer2/groups": float(advantages.keep2.numel()) if advantages.keep2 is not None else 0.0,
            "layer2/groups_dropped": float(advantages.dropped2),
        }
    )
    return m
