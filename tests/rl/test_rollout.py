"""``mgrpo_fast.rl.rollout.base``: the transformers ``generate`` backend on a tiny random Qwen2 and a tiny
character-level tokenizer, both built here.

The tokenizer has one token per character plus a few multi-character tokens (``"the"``, ``"ab"``,
``"xyz"``) the model can sample but encoding never produces, so a stop string can end inside a token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tokenizers import Regex, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config  # noqa: E402

from mgrpo_fast.models.attention import ATTN_IMPLEMENTATION  # noqa: E402
from mgrpo_fast.models.policy import load_policy, packed_logprobs  # noqa: E402
from mgrpo_fast.packing.microbatch import build_microbatch  # noqa: E402
from mgrpo_fast.rl.rollout.base import Completion, RolloutBackend, SamplingParams, to_sequence_specs
from mgrpo_fast.rl.rollout.hf import HFGenerateBackend

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +-=.\n")
MULTI = ["the", "ab", "xyz"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + MULTI)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    specials = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(7)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger logits: a peakier, less uniform next-token distribution
        for p in model.parameters():
            p.mul_(4.0) if p.ndim == 2 else p.add_(0.1 * torch.randn_like(p))
    # a checkpoint default that must not leak into rollouts
    model.generation_config.repetition_penalty = 1.5
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def backend(model, tokenizer):
    return HFGenerateBackend(model, tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["q: 1+2=", "the answer is", "hello world. ", "x", "compute 12 - 7 = "]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def teacher_forced_logprobs(model, prompt, completion, temperature=1.0):
    """``log_softmax(logits / T)`` of each completion token: one full forward, no cache, no padding."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    targets = torch.tensor(completion)[:, None]
    return torch.log_softmax(logits[rows] / temperature, -1).gather(1, targets)[:, 0]


def as_tuples(completions):
    return [(c.prompt_index, c.sample_index, c.token_ids, c.finish_reason) for c in completions]


# ------------------------------------------------------------------------------------------------
def test_interface_shapes_and_order(backend, prompts, tokenizer):
    assert isinstance(backend, RolloutBackend)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, batch_size=2)
    out = backend.generate(prompts, num_samples=3, params=params, seed=0)
    assert len(out) == len(prompts) * 3
    assert all(isinstance(c, Completion) for c in out)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(p, s) for p in range(5) for s in range(3)]
    for c in out:
        assert 1 <= len(c.token_ids) <= 12 and c.logprobs is None
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason in ("eos", "length")
        assert (c.finish_reason == "length") == (len(c.token_ids) == 12 and c.token_ids[-1] != 1)
    # samples of one prompt differ (different random streams)
    assert len({tuple(c.token_ids) for c in out[:3]}) > 1
    specs = to_sequence_specs(prompts, out)
    assert [list(s.prompt_ids) for s in specs[:3]] == [prompts[0]] * 3
    assert [list(s.completion_ids) for s in specs] == [c.token_ids for c in out]
    assert backend.generate([], num_samples=2, params=params, seed=0) == []


def test_seeded_and_independent_of_batch_size(backend, prompts):
    params = dict(temperature=0.9, top_p=0.95, top_k=20, max_new_tokens=16, return_logprobs=True)
    rng_before = torch.get_rng_state()
    runs = {
        bs: backend.generate(prompts, num_samples=2, params=SamplingParams(**params, batch_size=bs), seed=123)
        for bs in (1, 2, 5)
    }
    assert torch.equal(torch.get_rng_state(), rng_before), "generate must not touch the global torch RNG"
    again = backend.generate(prompts, num_samples=2, params=SamplingParams(**params, batch_size=2), seed=123)
    assert again == runs[2]  # same seed, same batch size: identical, log-probs included
    for bs in (1, 5):
        assert as_tuples(runs[bs]) == as_tuples(runs[2])
        for a, b in zip(runs[bs], runs[2]):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    other = backend.generate(prompts, num_samples=2, params=SamplingParams(**params, batch_size=2), seed=124)
    assert as_tuples(other) != as_tuples(runs[2])


def test_left_padding_does_not_change_greedy(backend, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=20, return_logprobs=True, batch_size=8)
    short, long = prompts[3], prompts[4]  # 1 token vs 17 tokens
    assert len(long) > len(short) + 10
    alone = backend.generate([short], num_samples=1, params=params, seed=0)[0]
    batched = backend.generate([long, short], num_samples=1, params=params, seed=0)[1]
    assert batched.token_ids == alone.token_ids and batched.text == alone.text
    lp_batched, lp_alone = torch.tensor(batched.logprobs), torch.tensor(alone.logprobs)
    torch.testing.assert_close(lp_batched, lp_alone, rtol=0, atol=1e-5)


def test_greedy_is_argmax_and_ignores_checkpoint_defaults(backend, model, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=10, return_logprobs=True)
    out = backend.generate(prompts[:2], num_samples=2, params=params, seed=5)
    assert out[0].token_ids == out[1].token_ids  # greedy: every sample the same
    assert model.generation_config.repetition_penalty == 1.5  # restored, but not applied:
    for c in out:
        ids = list(prompts[c.prompt_index])
        for t in c.token_ids:  # plain argmax of the raw logits, token by token
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert t == int(logits.argmax())
            ids.append(t)
        ref = teacher_forced_logprobs(model, list(prompts[c.prompt_index]), c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_equal_teacher_forced(backend, model, prompts, temperature):
    params = SamplingParams(temperature=temperature, max_new_tokens=24, return_logprobs=True, batch_size=3)
    out = backend.generate(prompts, num_samples=2, params=params, seed=11)
    for c in out:
        assert len(c.logprobs) == len(c.token_ids)
        ref = teacher_forced_logprobs(model, list(prompts[c.prompt_index]), c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=0, atol=1e-5)


def test_top_k_top_p_restrict_the_sampled_tokens(backend, model, prompts):
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=16, return_logprobs=True)
    out = backend.generate(prompts, num_samples=2, params=params, seed=3)
    for c in out:
        full = teacher_forced_logprobs(model, list(prompts[c.prompt_index]), c.token_ids)
        ids = torch.tensor([list(prompts[c.prompt_index]) + c.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompts[c.prompt_index]) - 1 : -1]
        top3 = logits.topk(3, dim=-1)
        assert all(t in row.tolist() for t, row in zip(c.token_ids, top3.indices))
        # renormalized over the 3 kept tokens: log p_k = log p - log(sum of the kept p)
        expected = full - torch.logsumexp(torch.log_softmax(logits, -1).gather(1, top3.indices), -1)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=0, atol=1e-5)
    nucleus = SamplingParams(temperature=1.0, top_p=0.3, max_new_tokens=16, return_logprobs=True)
    for c in backend.generate(prompts, num_samples=2, params=nucleus, seed=3):
        ref = teacher_forced_logprobs(model, list(prompts[c.prompt_index]), c.token_ids)
        # the kept set holds >= 30% of the mass, so log p_nucleus >= log p and <= 0
        assert all(lp >= r - 1e-5 and lp <= 1e-6 for lp, r in zip(c.logprobs, ref.tolist()))


def test_max_new_tokens_and_eos(model, tokenizer, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=9)
    free = HFGenerateBackend(model, tokenizer, eos_token_ids=[])  # nothing ends a completion early
    ref = free.generate(prompts, num_samples=1, params=params, seed=0)
    assert all(len(c.token_ids) == 9 and c.finish_reason == "length" for c in ref)
    # make the 4th greedy token of prompt 0 the EOS: completions end there and include it
    eos = ref[0].token_ids[3]
    backend = HFGenerateBackend(model, tokenizer, eos_token_ids=[eos])
    assert backend.pad_token_id == tokenizer.pad_token_id
    out = backend.generate(prompts, num_samples=1, params=params, seed=0)
    for c, r in zip(out, ref):
        if eos in r.token_ids:
            cut = r.token_ids.index(eos) + 1
            assert c.token_ids == r.token_ids[:cut] and c.finish_reason == "eos"
        else:
            assert c.token_ids == r.token_ids and c.finish_reason == "length"
    assert out[0].finish_reason == "eos" and len(out[0].token_ids) <= 4
    # defaults: the tokenizer's EOS (+ the model's generation_config EOS)
    assert HFGenerateBackend(model, tokenizer).eos_token_ids == [tokenizer.eos_token_id]


def test_eos_text_is_skipped(model, tokenizer, prompts):
    backend = HFGenerateBackend(model, tokenizer)
    out = backend.generate(prompts, num_samples=8, params=SamplingParams(max_new_tokens=40), seed=2)
    ended = [c for c in out if c.finish_reason == "eos"]
    assert ended, "a sampled completion should hit <eos> within 40 tokens"
    for c in ended:
        assert c.token_ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in c.token_ids[:-1]
        assert "<eos>" not in c.text


def test_stop_strings_truncate(backend, tokenizer, prompts):
    base = SamplingParams(temperature=1.0, max_new_tokens=30, return_logprobs=True)
    ref = backend.generate(prompts, num_samples=4, params=base, seed=9)
    target = next(c for c in ref if len(c.token_ids) >= 12 and c.finish_reason == "length")
    text = tokenizer.decode(target.token_ids, skip_special_tokens=False)
    stop = text[6:9]  # a stop string spanning several tokens, first seen at or before char 9
    params = SamplingParams(**{**vars(base), "stop": [stop]})
    out = backend.generate(prompts, num_samples=4, params=params, seed=9)
    for c, r in zip(out, ref):
        assert c.token_ids == r.token_ids[: len(c.token_ids)]  # same random stream, then cut
        assert c.logprobs == r.logprobs[: len(c.token_ids)]
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        decoded = lambda k: tokenizer.decode(r.token_ids[:k], skip_special_tokens=False)  # noqa: B023
        if c.finish_reason == "stop":
            k = len(c.token_ids)
            assert stop in decoded(k) and stop not in decoded(k - 1)  # cut right after the completing token
        else:
            assert c.token_ids == r.token_ids and stop not in decoded(len(r.token_ids))
    hit = out[ref.index(target)]
    assert hit.finish_reason == "stop" and len(hit.token_ids) <= 9


def test_stop_string_inside_a_multichar_token(backend, tokenizer, prompts):
    ref = backend.generate(prompts, num_samples=4, params=SamplingParams(max_new_tokens=30), seed=1)
    multi = {tokenizer.convert_tokens_to_ids(t): t for t in MULTI}
    # a multi-character token whose 2nd character (e.g. "h" of "the") does not occur before it
    c, j = next(
        (c, j)
        for c in ref
        for j, t in enumerate(c.token_ids)
        if t in multi and multi[t][1] not in tokenizer.decode(c.token_ids[:j], skip_special_tokens=False)
    )
    token_text = multi[c.token_ids[j]]
    stop = token_text[1]  # completed mid-token: the token stays whole
    params = SamplingParams(max_new_tokens=30, stop=stop, batch_size=1)
    out = backend.generate(prompts, num_samples=4, params=params, seed=1)
    got = out[ref.index(c)]
    assert got.finish_reason == "stop" and got.token_ids == c.token_ids[: j + 1]
    assert got.text.endswith(token_text)


def test_attention_and_mode_restored_with_load_policy(model_dir, tokenizer, prompts):
    policy = load_policy(model_dir, dtype="float32", device="cpu")
    assert policy.config._attn_implementation == ATTN_IMPLEMENTATION and policy.training
    seen = []  # query lengths reaching the decoder: a KV cache feeds one token per step after the prefill
    record = lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1])
    hook = policy.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        params = SamplingParams(temperature=0.8, max_new_tokens=12, return_logprobs=True, batch_size=2)
        out = HFGenerateBackend(policy, tokenizer).generate(prompts, num_samples=2, params=params, seed=4)
    finally:
        hook.remove()
    assert policy.config._attn_implementation == ATTN_IMPLEMENTATION and policy.training
    assert policy.generation_config.repetition_penalty == 1.5
    widths = [max(len(p) for p in prompts[i : i + 2]) for i in range(0, len(prompts), 2)]
    assert [n for n in seen if n != 1] == widths and seen.count(1) > 0  # one prefill per micro-batch
    # the rollout log-probs are the packed training log-probs at the same temperature
    batch = build_microbatch(to_sequence_specs(prompts, out))
    with torch.no_grad():
        logp = packed_logprobs(policy, batch, temperature=0.8)
    expected = torch.tensor([lp for c in out for lp in c.logprobs])
    torch.testing.assert_close(logp.float(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"return_logprobs": 1}, "return_logprobs"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_sampling_params_normalizes_stop():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")


def test_bad_generate_arguments(backend, prompts):
    params = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty"):
        backend.generate([prompts[0], []], num_samples=1, params=params, seed=0)
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 999"):
        backend.generate([[1, 999]], num_samples=1, params=params, seed=0)
    with pytest.raises(ValueError, match=r"prompts\[0\]: 126 prompt tokens \+ max_new_tokens=4 exceed"):
        backend.generate([[5] * 126], num_samples=1, params=params, seed=0)
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        backend.generate(["abc"], num_samples=1, params=params, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        backend.generate(prompts, num_samples=0, params=params, seed=0)
    with pytest.raises(TypeError, match="params"):
        backend.generate(prompts, num_samples=1, params={"temperature": 1.0}, seed=0)


class _FailingTokenizer:
    """Decodes like ``inner`` until told to fail."""

    def __init__(self, inner):
        self.inner = inner
        self.pad_token_id, self.eos_token_id = inner.pad_token_id, inner.eos_token_id

    def batch_decode(self, *args, **kwargs):
        raise RuntimeError("decoder exploded")

    def decode(self, *args, **kwargs):
        raise RuntimeError("decoder exploded")


def test_state_restored_when_generation_fails(model_dir, tokenizer, prompts):
    policy = load_policy(model_dir, dtype="float32", device="cpu")
    backend = HFGenerateBackend(policy, _FailingTokenizer(tokenizer))
    with pytest.raises(RuntimeError, match="decoder exploded"):
        backend.generate(prompts, num_samples=1, params=SamplingParams(max_new_tokens=4, stop="a"), seed=0)
    assert policy.config._attn_implementation == ATTN_IMPLEMENTATION and policy.training
    assert policy.generation_config.repetition_penalty == 1.5


def test_sampler_draws_from_the_warped_distribution():
    """Inverse-CDF draws with the counter-based uniforms follow softmax(logits); filtered tokens never."""
    from mgrpo_fast.rl.rollout.hf import _inverse_cdf, _row_keys, _uniforms

    n = 20000
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).expand(n, 5)
    keys = _row_keys(3, list(range(n)), [0] * n)
    u = torch.from_numpy(_uniforms(keys, 0))
    assert 0.0 <= u.min() and u.max() < 1.0
    freq = torch.bincount(_inverse_cdf(logits, u), minlength=5).double() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), rtol=0, atol=0.015)
    filtered = logits.clone()
    filtered[:, 2] = -float("inf")
    assert not bool((_inverse_cdf(filtered, u) == 2).any())
    assert not bool((_inverse_cdf(filtered, torch.full((n,), 1.0 - 2.0**-53)) == 2).any())
    # the stream of (p, s) does not depend on which other rows are drawn with it
    assert np.array_equal(_row_keys(3, [7, 1], [2, 0])[0], _row_keys(3, [7], [2])[0])
