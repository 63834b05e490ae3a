"""The vLLM rollout backend on the real engine (the CPU build in CI): greedy equals HF, the weight sync
after an optimizer step, MGRPO steps + resume with ``rollout.backend=vllm``, TIS in the trainer."""

from __future__ import annotations

import pytest
import torch

from mgrpo_fast.rl.rollout.vllm import vllm_unavailable_reason

_REASON = vllm_unavailable_reason()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=str(_REASON)),
    pytest.mark.usefixtures("one_thread"),
]

SMALL = [
    "--logging.tensorboard=false",
    "--logging.progress=false",
    "--rollout.backend=vllm",
    "--rollout.max_new_tokens=24",
    "--layer1.mgrpo_group_size=4",
    "--layer2.group_size=2",
    "--layer2.selection=sample:2",
    "--layer2.max_new_tokens=24",
    "--train.questions_per_step=4",
    "--optim.lr=3e-3",
    "--optim.warmup_steps=0",
    "--optim.schedule=constant",
    "--reward.num_workers=0",
    "--eval.at_start=false",
    "--eval.at_end=false",
    "--data.instruction=null",
    "--checkpoint.every=1",
]


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoTokenizer

    from mgrpo_fast.data.arithmetic import bundled_problems
    from mgrpo_fast.data.prompts import build_prompt_ids
    from mgrpo_fast.data.train_data import default_model_path
    from mgrpo_fast.models.policy import load_policy

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    policy = load_policy(path, dtype=torch.float32, device=torch.device("cpu"), attn_implementation="sdpa")
    problems = bundled_problems("test", 16)
    prompts = [build_prompt_ids(p, tok, template="plain", instruction=None) for p in problems]
    return policy, tok, prompts


@pytest.fixture(scope="module")
def engine(bundled):
    from mgrpo_fast.rl.rollout.vllm import VLLMBackend

    policy, tok, _ = bundled
    backend = VLLMBackend(policy, tok, kv_cache_gib=1)
    backend.load_weights(policy.named_parameters())
    yield backend
    backend.close()


def test_greedy_tokens_and_logprobs_equal_hf(bundled, engine):
    from mgrpo_fast.rl.rollout.base import SamplingParams
    from mgrpo_fast.rl.rollout.hf import HFGenerateBackend

    policy, tok, prompts = bundled
    params = SamplingParams(temperature=0, max_new_tokens=40, return_logprobs=True)
    got = engine.generate(prompts, num_samples=1, params=params, seed=0)
    want = HFGenerateBackend(policy, tok).generate(prompts, num_samples=1, params=params, seed=0)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [(c.text, c.finish_reason) for c in got] == [(c.text, c.finish_reason) for c in want]
    assert any(c.finish_reason == "eos" for c in got)  # EOS ids stop the engine and are kept
    err = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs))
    assert err < 1e-4, err


def test_samples_are_seeded_prompt_major_and_cut_at_stop_strings(bundled, engine):
    from mgrpo_fast.rl.rollout.base import SamplingParams

    _, tok, prompts = bundled
    params = SamplingParams(temperature=1.0, max_new_tokens=32, stop=("=",), return_logprobs=True)
    a = engine.generate(prompts[:6], num_samples=3, params=params, seed=11)
    b = engine.generate(prompts[:6], num_samples=3, params=params, seed=11)
    c = engine.generate(prompts[:6], num_samples=3, params=params, seed=12)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert [(x.prompt_index, x.sample_index) for x in a] == [(p, s) for p in range(6) for s in range(3)]
    for x in a:
        assert len(x.logprobs) == len(x.token_ids) and all(lp <= 0 for lp in x.logprobs)
        assert x.text == tok.decode(x.token_ids, skip_special_tokens=True)
        if x.finish_reason == "stop":  # cut right after the token completing "="
            assert x.text.endswith("=") and "=" not in tok.decode(x.token_ids[:-1])
    assert any(x.finish_reason == "stop" for x in a)


def test_prefix_cache_reuses_shared_prompts_until_the_weights_change(bundled, engine):
    from mgrpo_fast.rl.rollout.base import SamplingParams

    policy, tok, prompts = bundled
    # a layer-2 shaped prompt: question + a first answer + a phrase, several KV blocks (32 tokens) long
    answer = tok.encode(" 12+34=46. Let me add the tens and the units again: 10+30=40, 2+4=6, so 46.")
    context = (prompts[0] + answer * 3)[:100]
    correction = context + tok.encode(" Wait, let me double-check that.")
    params = SamplingParams(temperature=1.0, max_new_tokens=4)

    def cached_tokens(batch, num_samples=1):
        cached0, submitted0 = engine.prefix_cache_counts()
        engine.generate(batch, num_samples=num_samples, params=params, seed=0)
        cached, submitted = engine.prefix_cache_counts()
        assert submitted - submitted0 == sum(len(p) for p in batch)
        return cached - cached0

    engine.load_weights(policy.named_parameters())  # a clean cache
    assert cached_tokens([context]) == 0
    # the full blocks of the shared prefix come from the cache (the last partial block is recomputed)
    full_blocks = 32 * (len(context) // 32)
    assert cached_tokens([correction]) == full_blocks > 0
    engine.load_weights(policy.named_parameters())  # same weights, but a sync always resets the cache
    assert cached_tokens([correction]) == 0
    # the G samples of a new prompt share its prefilled blocks
    assert cached_tokens([context[1:]], num_samples=4) > 0


def _trainer_config(run_dir, *extra):
    from mgrpo_fast.config.loading import load_config

    return load_config(None, [*SMALL, f"--logging.run_dir={run_dir}", *extra])


def test_engine_logprobs_equal_the_policy_after_an_optimizer_step(tmp_path):
    from mgrpo_fast.packing.microbatch import SequenceSpec, build_microbatch
    from mgrpo_fast.rl.rollout.base import SamplingParams
    from mgrpo_fast.rl.trainer import MGRPOTrainer

    no_drop = "--loss.drop_zero_variance_groups=false"
    config = _trainer_config(tmp_path / "run", "--algo=grpo", no_drop, "--rollout.mismatch_every=1")
    trainer = MGRPOTrainer(config)
    try:
        prompt = trainer.tokenizer.encode("12+34=")
        greedy = SamplingParams(temperature=0, max_new_tokens=16, return_logprobs=True)

        def engine_and_policy():
            (c,) = trainer.backend.generate([prompt], num_samples=1, params=greedy, seed=0)
            mb = build_microbatch([SequenceSpec(prompt, c.token_ids)])
            policy = trainer.logprobs(trainer.engine.module, [mb])[0]
            return torch.tensor(c.logprobs), policy, c.token_ids

        before, policy_before, ids_before = engine_and_policy()
        torch.testing.assert_close(before, policy_before, atol=1e-4, rtol=0)
        metrics = trainer.train_step()
        assert metrics["train/skipped_updates"] == 0 and metrics["time/weight_sync"] > 0
        after, policy_after, ids_after = engine_and_policy()
        if ids_after == ids_before:  # the step changed the weights, and the engine has them
            assert float((policy_after - policy_before).abs().max()) > 1e-3
        torch.testing.assert_close(after, policy_after, atol=1e-4, rtol=0)
        assert metrics["rollout/mismatch_abs"] < 1e-4  # sampled with the same weights
    finally:
        trainer.backend.close()


def test_three_mgrpo_steps_on_vllm_then_resume(tmp_path):
    from mgrpo_fast.rl.run_log import read_metrics
    from mgrpo_fast.rl.trainer import MGRPOTrainer

    run = tmp_path / "run"
    tis = ["--rollout.is_correction=tis", "--rollout.is_cap=2.0", "--loss.drop_zero_variance_groups=false"]
    trainer = MGRPOTrainer(_trainer_config(run, "--train.total_steps=3", *tis))
    assert trainer.config.rollout.backend == "vllm"
    trainer.train()
    resumed = MGRPOTrainer(_trainer_config(run, "--train.total_steps=4", "--resume", *tis))
    resumed.train()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["train/skipped_updates"] == 0 and r["train/loss_tokens"] > 0
        # the engine samples with the trainer's weights: after resume too (the checkpoint is synced)
        assert r["rollout/mismatch_abs"] < 1e-4, r
        assert r["rollout/is_beyond_cap"] == 0 and abs(r["rollout/is_weight_mean"] - 1) < 1e-3
        assert r["time/weight_sync"] > 0
