"""The two MGRPO layers (mgrpo_fast/mgrpo.py) on a scripted fake backend and a tiny byte-level tokenizer."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import CHATML, byte_tokenizer

from mgrpo_fast.data.problems import Problem
from mgrpo_fast.data.prompts import DEFAULT_GUIDING_PHRASES, DEFAULT_INSTRUCTION, build_prompt_ids
from mgrpo_fast.ops.advantages import group_advantages
from mgrpo_fast.rl.layers import (
    build_training_sequences,
    compute_advantages,
    rollout_layer1,
    rollout_layer2,
    score_layer1,
    score_layer2,
    select_for_correction,
    step_metrics,
)
from mgrpo_fast.rl.rewards import correctness_reward
from mgrpo_fast.rl.rollout.base import Completion, RolloutBackend, SamplingParams
from mgrpo_fast.rl.scorer import RewardScorer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(CHATML)


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer([correctness_reward], timeout_s=None, num_workers=0) as s:
        yield s


PROBLEMS = [
    Problem(id="a", question="What is 2+3?", answer="5"),
    Problem(id="b", question="What is 1+1?", answer="2"),
    Problem(id="c", question="What is 3+3?", answer="6"),
]
GOLD = {p.question: p.answer for p in PROBLEMS}
# Layer 1 (G1 = 4): q0 right/wrong alternating, q1 all right, q2 all wrong.
L1_PATTERN = {"What is 2+3?": "RWRW", "What is 1+1?": "RRRR", "What is 3+3?": "WWWW"}
# Layer 2 (G2 = 4): after a right o_i "RRRW"; after a wrong o_i "RWWW" (q0) or "WWWW" (q2).
L2_AFTER_RIGHT, L2_AFTER_WRONG = "RRRW", {"What is 2+3?": "RWWW", "What is 3+3?": "WWWW"}


class FakeBackend:
    """Scripted ``RolloutBackend``: the answer (right/wrong) depends on the question, the sample index
    and, for a correction prompt, on whether the first answer in it is right. Records its prompts."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.calls: list[tuple[list[list[int]], int, int]] = []

    def generate(self, prompts, *, num_samples, params, seed):
        self.calls.append(([list(p) for p in prompts], num_samples, seed))
        out = []
        for pi, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            question = next(q for q in GOLD if q in text)
            gold = GOLD[question]
            head, _, tail = text.partition("<|im_start|>assistant\n")
            if not tail:  # layer 1
                pattern = L1_PATTERN[question]
            else:  # layer 2: o_i is in the tail
                pattern = L2_AFTER_RIGHT if f"\\boxed{{{gold}}}" in tail else L2_AFTER_WRONG[question]
            for s in range(num_samples):
                right = pattern[s % len(pattern)] == "R"
                filler = "ab"[: random.Random(f"{seed}|{pi}|{s}").randrange(3)]
                ans = gold if right else str(int(gold) + 1)
                body = f"{filler}So \\boxed{{{ans}}}."
                ids_out = self.tok.encode(body, add_special_tokens=False) + [self.tok.eos_token_id]
                lps = [-0.5] * len(ids_out) if params.return_logprobs else None
                out.append(Completion(pi, s, ids_out, body + "<|im_end|>", "eos", lps))
        return out


PARAMS = SamplingParams(max_new_tokens=32, return_logprobs=True)


def _run(tok, scorer, *, selection="all", alpha=0.0, seed=0, lam=1.0, drop=True, algo="mgrpo"):
    backend = FakeBackend(tok)
    r1 = rollout_layer1(PROBLEMS, tok, backend, PARAMS, 4, seed)
    s1 = score_layer1(r1, scorer)
    pairs = select_for_correction(s1.correct, selection, random.Random(seed))
    r2 = rollout_layer2(r1, pairs, tok, backend, PARAMS, 4, seed + 1)
    s2 = score_layer2(r2, scorer, s1.correct, alpha)
    adv = compute_advantages(s1, s2, drop_zero_variance_groups=drop)
    batch = build_training_sequences(r1, adv, r2, layer2_loss_weight=lam, algo=algo)
    return backend, r1, s1, pairs, r2, s2, adv, batch


def test_fake_backend_is_a_rollout_backend(tok):
    assert isinstance(FakeBackend(tok), RolloutBackend)


def test_layer1_rollout_and_scores(tok, scorer):
    backend, r1, s1, *_ = _run(tok, scorer)
    assert r1.prompt_ids == [build_prompt_ids(p, tok) for p in PROBLEMS]
    assert backend.calls[0][1:] == (4, 0)
    assert s1.correct.tolist() == [[c == "R" for c in L1_PATTERN[p.question]] for p in PROBLEMS]
    assert torch.equal(s1.rewards, s1.correct.float())
    assert r1.texts[0][1].endswith("\\boxed{6}.<|im_end|>")


def test_selection_modes():
    correct = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    rng = random.Random(0)
    assert select_for_correction(correct, "all", rng) == [(q, i) for q in range(3) for i in range(3)]
    assert select_for_correction(correct, "wrong_only", rng) == [(0, 1), (1, 0), (1, 1), (1, 2)]
    picked = select_for_correction(correct, "sample:2", random.Random(7))
    assert [q for q, _ in picked] == [0, 0, 1, 1, 2, 2]
    assert all(len({i for q2, i in picked if q2 == q}) == 2 for q in range(3))
    assert picked == select_for_correction(correct, "sample:2", random.Random(7))
    assert len(select_for_correction(correct, "sample:9", rng)) == 9  # k capped at G1
    with pytest.raises(ValueError, match="selection"):
        select_for_correction(correct, "some", rng)


def test_layer2_prompt_contents(tok, scorer):
    backend, r1, s1, pairs, r2, *_ = _run(tok, scorer, seed=3)
    draws = random.Random(4)  # rollout_layer2 seed = 3 + 1, one draw per pair in pair order
    expected_phrases = [DEFAULT_GUIDING_PHRASES[draws.randrange(len(DEFAULT_GUIDING_PHRASES))] for _ in pairs]
    assert [c.phrase for c in r2.corrections] == expected_phrases
    for (q, i), c in zip(pairs, r2.corrections):
        o = r1.completion(q, i)
        user = f"{PROBLEMS[q].question}\n\n{DEFAULT_INSTRUCTION}"
        chat_prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        o_text = o.text[: -len("<|im_end|>")]
        # q, then o_i (without its EOS), then separator + phrase, in that order
        assert c.text == chat_prompt + o_text + "\n\n" + c.phrase
        assert tok.decode(c.prompt_ids) == c.text
        assert c.prompt_ids[: c.question_end] == r1.prompt_ids[q]
        assert c.prompt_ids[c.question_end : c.answer_end] == o.token_ids[:-1]
    # the backend was asked exactly for these prompts, G2 samples each
    assert backend.calls[1][0] == [c.prompt_ids for c in r2.corrections]
    assert backend.calls[1][1:] == (4, 4)


def test_shaping_signs(tok, scorer):
    *_, s1, pairs, r2, s2_plain, _, _ = _run(tok, scorer)
    s2 = score_layer2(r2, scorer, s1.correct, 0.5)
    for p, (q, i) in enumerate(pairs):
        first = bool(s1.correct[q, i])
        assert bool(s2.first_correct[p]) == first
        for j in range(4):
            right = bool(s2.correct[p, j])
            v = float(s2.verifier_rewards[p, j])
            assert v == float(right) == float(s2_plain.rewards[p, j])
            bonus = 0.5 if (not first and right) else -0.5 if (first and not right) else 0.0
            assert float(s2.rewards[p, j]) == v + bonus
    assert (s2.rewards == 1.5).any() and (s2.rewards == -0.5).any()


def test_advantages_per_group_and_drops(tok, scorer):
    _, r1, s1, pairs, r2, s2, adv, batch = _run(tok, scorer)
    for q in range(3):
        ref = group_advantages(s1.rewards[q], torch.zeros(4, dtype=torch.long))
        assert torch.allclose(adv.adv1[q], ref)
    for p in range(len(pairs)):
        ref = group_advantages(s2.rewards[p], torch.zeros(4, dtype=torch.long))
        assert torch.allclose(adv.adv2[p], ref)
    # layer 1: q1 (all right) and q2 (all wrong) dropped; layer 2: the 4 pairs of q2 (all wrong)
    assert adv.keep1.tolist() == [True, False, False]
    assert adv.keep2.tolist() == [q != 2 for q, _ in pairs]
    assert (adv.dropped1, adv.dropped2) == (2, 4)
    # the batch holds exactly the kept groups, with their advantages and ids
    assert len(batch) == 4 + 8 * 4
    assert batch.layer.tolist() == [1] * 4 + [2] * 32
    assert batch.group_id[:4].tolist() == [0] * 4
    kept_pairs = [p for p, (q, _) in enumerate(pairs) if q != 2]
    assert batch.group_id[4:].tolist() == [3 + p for p in kept_pairs for _ in range(4)]
    assert torch.equal(batch.advantages[:4], adv.adv1[0])
    assert torch.equal(batch.advantages[4:], adv.adv2[kept_pairs].reshape(-1))
    assert batch.question_index[4:].tolist() == [pairs[p][0] for p in kept_pairs for _ in range(4)]
    # layer-2 sequences: prompt = correction prompt, completion = continuation only
    p0 = kept_pairs[0]
    assert list(batch.sequences[4].prompt_ids) == r2.corrections[p0].prompt_ids
    assert list(batch.sequences[4].completion_ids) == r2.completions[p0 * 4].token_ids
    assert batch.sequences[4].num_loss_tokens == len(r2.completions[p0 * 4].token_ids)
    assert batch.old_logprobs is not None
    assert [len(lp) for lp in batch.old_logprobs] == [len(s.completion_ids) for s in batch.sequences]
    m = step_metrics(r1, s1, adv, r2, s2)
    assert (m["layer1/groups_dropped"], m["layer2/groups_dropped"]) == (2.0, 4.0)


def test_keep_zero_variance_groups(tok, scorer):
    *_, adv, batch = _run(tok, scorer, drop=False)
    assert adv.keep1.all() and adv.keep2.all() and len(batch) == 12 + 48
    assert (batch.advantages[4:12] == 0).all()  # zero-variance groups carry exactly 0


def test_layer2_loss_weight_and_grpo(tok, scorer):
    _, r1, s1, _, r2, s2, adv, batch = _run(tok, scorer, lam=0.25)
    assert batch.loss_weight[batch.layer == 1].eq(1.0).all()
    assert batch.loss_weight[batch.layer == 2].eq(0.25).all()
    grpo = build_training_sequences(r1, adv, r2, algo="grpo")
    assert grpo.layer.tolist() == [1] * 4
    # GRPO proper: no layer-2 rollout at all
    adv1 = compute_advantages(s1)
    g = build_training_sequences(r1, adv1, algo="grpo")
    assert g.layer.eq(1).all() and adv1.adv2 is None
    m = step_metrics(r1, s1, adv1)
    assert not any(k.startswith("layer2/") for k in m)
    with pytest.raises(ValueError):
        build_training_sequences(r1, adv1, algo="ppo")


def test_delta_metrics_by_hand(tok, scorer):
    _, r1, s1, _, r2, s2, adv, _ = _run(tok, scorer)
    m = step_metrics(r1, s1, adv, r2, s2)
    # 12 pairs: 6 right firsts (continuations 3/4 right), 2 wrong firsts of q0 (1/4), 4 of q2 (0/4)
    assert m["layer1/accuracy"] == pytest.approx(6 / 12)
    assert m["layer2/acc_t1"] == pytest.approx(0.5)
    assert m["layer2/acc_t2"] == pytest.approx((6 * 0.75 + 2 * 0.25) / 12)
    assert m["layer2/delta_i_to_c"] == pytest.approx((2 * 0.25) / 12)
    assert m["layer2/delta_c_to_i"] == pytest.approx((6 * 0.25) / 12)
    assert m["layer2/delta"] == pytest.approx(m["layer2/delta_i_to_c"] - m["layer2/delta_c_to_i"])
    assert m["layer2/accuracy"] == m["layer2/acc_t2"] and m["layer2/pairs"] == 12
    assert m["layer1/completion_tokens"] == sum(len(c.token_ids) for c in r1.completions)
    assert m["layer2/completion_tokens"] == sum(len(c.token_ids) for c in r2.completions)
    # wrong_only: Δc→i is 0 by construction
    _, r1, s1, _, r2, s2, adv, _ = _run(tok, scorer, selection="wrong_only")
    m = step_metrics(r1, s1, adv, r2, s2)
    assert m["layer2/pairs"] == 6 and m["layer2/delta_c_to_i"] == 0.0
    assert m["layer2/delta_i_to_c"] == pytest.approx(0.5 / 6)


def test_empty_selection(tok, scorer):
    backend = FakeBackend(tok)
    r1 = rollout_layer1(PROBLEMS[1:2], tok, backend, PARAMS, 4, 0)  # all right
    s1 = score_layer1(r1, scorer)
    pairs = select_for_correction(s1.correct, "wrong_only", random.Random(0))
    r2 = rollout_layer2(r1, pairs, tok, backend, PARAMS, 4, 1)
    s2 = score_layer2(r2, scorer, s1.correct, 0.1)
    adv = compute_advantages(s1, s2)
    batch = build_training_sequences(r1, adv, r2)
    assert pairs == [] and len(backend.calls) == 1 and len(batch) == 0
    assert step_metrics(r1, s1, adv, r2, s2)["layer2/pairs"] == 0


def test_determinism(tok, scorer):
    a = _run(tok, scorer, selection="sample:2", seed=11)
    b = _run(tok, scorer, selection="sample:2", seed=11)
    assert a[3] == b[3]  # same selected pairs
    assert [c.prompt_ids for c in a[4].corrections] == [c.prompt_ids for c in b[4].corrections]
    ba, bb = a[-1], b[-1]
    assert [(s.prompt_ids, s.completion_ids) for s in ba.sequences] == [
        (s.prompt_ids, s.completion_ids) for s in bb.sequences
    ]
    assert torch.equal(ba.advantages, bb.advantages) and torch.equal(ba.group_id, bb.group_id)
    # a different seed draws other phrases / other pairs
    c = _run(tok, scorer, selection="sample:2", seed=12)
    assert (a[3], [x.phrase for x in a[4].corrections]) != (c[3], [x.phrase for x in c[4].corrections])


def test_no_sampling_logprobs(tok, scorer):
    backend = FakeBackend(tok)
    params = SamplingParams(max_new_tokens=32)  # return_logprobs=False: the fake returns none
    r1 = rollout_layer1(PROBLEMS, tok, backend, params, 4, 0)
    s1 = score_layer1(r1, scorer)
    batch = build_training_sequences(r1, compute_advantages(s1), algo="grpo")
    assert len(batch) == 4 and batch.old_logprobs is None
