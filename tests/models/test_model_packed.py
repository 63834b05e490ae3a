"""Packed log-probs through real transformers causal LMs (``mgrpo_fast.models.policy``) equal unpacked ones.

Tiny random-initialized Qwen2 / Llama / Mistral models (GQA, tied and untied lm_head, sliding
windows) are built here, written with ``save_pretrained`` and loaded back with ``load_policy``. The
reference is transformers itself: each sequence alone, unpadded, through the stock ``"sdpa"``
model and its full logits.
"""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, T5Config  # noqa: E402

from mgrpo_fast.models.attention import ATTN_IMPLEMENTATION  # noqa: E402
from mgrpo_fast.models.policy import decoder_of, load_policy, packed_hidden_states, packed_logprobs
from mgrpo_fast.packing.microbatch import SequenceSpec, build_microbatch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
)  # fmt: skip

CONFIGS = {
    "qwen2_untied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    # layer 1 uses a 24-token sliding window (Qwen2: layers >= max_window_layers slide)
    "qwen2_tied_sliding": lambda: Qwen2Config(
        **COMMON, tie_word_embeddings=True, use_sliding_window=True, sliding_window=24, max_window_layers=1
    ),
    "llama_tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama_untied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=False),
    "mistral_sliding": lambda: MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=40),
}

# 13 sequences, total lengths 1..300: (prompt length, completion length, loss mask kind)
SHAPES = [
    (1, 0, "all"), (1, 1, "all"), (3, 4, "random"), (16, 1, "none"), (5, 28, "prefix"), (40, 24, "all"),
    (7, 83, "random"), (60, 68, "all"), (33, 117, "prefix"), (12, 187, "random"), (90, 150, "all"),
    (100, 171, "random"), (44, 256, "all"),
]  # fmt: skip


def make_sequences(seed: int = 0) -> list[SequenceSpec]:
    rng = random.Random(seed)
    out = []
    for prompt_len, completion_len, kind in SHAPES:
        prompt = [rng.randrange(VOCAB) for _ in range(prompt_len)]
        completion = [rng.randrange(VOCAB) for _ in range(completion_len)]
        if kind == "all":
            mask = None
        elif kind == "none":
            mask = [0] * completion_len
        elif kind == "prefix":  # a layer-2 correction: the earlier answer is context only
            cut = completion_len // 2
            mask = [0] * cut + [1] * (completion_len - cut)
        else:
            mask = [rng.random() < 0.6 for _ in range(completion_len)]
        out.append(SequenceSpec(prompt, completion, mask))
    assert len(out) == 13 and max(s.num_tokens for s in out) == 300
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``name -> directory`` of each tiny random model, written once per test module."""
    dirs = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(1234)
        config = make()
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # break the tiny init's symmetry a little more: larger logits
            for p in model.parameters():
                p.mul_(3.0) if p.ndim == 2 else p.add_(0.1 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        dirs[name] = path
    return dirs


def load_reference(path):
    """The stock transformers model (sdpa), fp32, same weights."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def reference_logprobs(model, sequences, temperature=1.0):
    """Each sequence alone, unpadded, full logits: ``(logp, entropy)`` of the loss tokens, packed order."""
    logps, ents = [], []
    for seq in sequences:
        ids = torch.tensor([*seq.prompt_ids, *seq.completion_ids])[None]
        logits = model(input_ids=ids, use_cache=False).logits[0].float() / temperature
        logsm = logits.log_softmax(-1)
        p0 = len(seq.prompt_ids)
        mask = seq.loss_mask if seq.loss_mask is not None else [1] * len(seq.completion_ids)
        for j, keep in enumerate(mask):
            if keep:
                row = p0 + j - 1
                logps.append(logsm[row, ids[0, p0 + j]])
                ents.append(-(logsm[row].exp() * logsm[row]).sum())
    return torch.stack(logps), torch.stack(ents)


def loss_weights(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) / n, torch.randn(n, generator=g) / n


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual, expected, what):
    assert actual.keys() == expected.keys(), f"{what}: parameters with gradients differ"
    for name, g in expected.items():
        # max abs diff <= 1e-5 and <= 1e-5 relative to the tensor's largest gradient
        err = (actual[name] - g).abs().max().item()
        scale = g.abs().max().item()
        bound = min(1e-5, 1e-5 * scale + 1e-10)
        assert err <= bound, f"{what}: {name}: max abs diff {err:.3e} (max |grad| {scale:.3e})"


# --------------------------------------------------------------------------------------------
# Packed == unpacked
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_logprobs_and_grads_match_per_sequence(model_dirs, name):
    sequences = make_sequences()
    batch = build_microbatch(sequences)
    policy = load_policy(model_dirs[name], dtype=torch.float32, device="cpu")
    assert policy.config._attn_implementation == ATTN_IMPLEMENTATION
    reference = load_reference(model_dirs[name])

    temperature = 0.8
    logp, entropy = packed_logprobs(policy, batch, temperature=temperature, return_entropy=True)
    ref_logp, ref_entropy = reference_logprobs(reference, sequences, temperature)
    assert logp.shape == (batch.num_loss_tokens,) and logp.dtype == torch.float32
    assert (logp - ref_logp).abs().max().item() <= 1e-5
    assert (entropy - ref_entropy).abs().max().item() <= 1e-5

    w_logp, w_ent = loss_weights(logp.numel())
    (logp * w_logp + entropy * w_ent).sum().backward()
    (ref_logp * w_logp + ref_entropy * w_ent).sum().backward()
    assert_grads_close(grads_of(policy), grads_of(reference), name)
    assert len(grads_of(policy)) == len(list(policy.parameters()))  # every parameter got a gradient


def test_no_cross_sequence_leakage(model_dirs):
    """Changing one sequence's tokens leaves every other sequence's log-probs bit-identical."""
    policy = load_policy(model_dirs["qwen2_tied_sliding"], dtype=torch.float32, device="cpu")
    sequences = make_sequences()
    batch = build_microbatch(sequences)
    with torch.no_grad():
        base = packed_logprobs(policy, batch)
        victim = 9  # 199 tokens, in the middle of the packed row
        seq = sequences[victim]
        rng = random.Random(7)
        changed = list(sequences)
        changed[victim] = SequenceSpec(
            [rng.randrange(VOCAB) for _ in seq.prompt_ids], seq.completion_ids, seq.loss_mask
        )
        new = packed_logprobs(policy, build_microbatch(changed))
    inside = batch.loss_seq == victim
    assert torch.equal(base[~inside], new[~inside])
    assert not torch.equal(base[inside], new[inside])


def test_gradient_checkpointing_gives_same_grads(model_dirs):
    path = model_dirs["llama_untied"]
    batch = build_microbatch(make_sequences(seed=3))
    results = []
    for checkpointing in (False, True):
        policy = load_policy(path, dtype=torch.float32, device="cpu", gradient_checkpointing=checkpointing)
        assert policy.is_gradient_checkpointing == checkpointing and policy.training
        logp = packed_logprobs(policy, batch)
        (logp * loss_weights(logp.numel())[0]).sum().backward()
        results.append((logp.detach(), grads_of(policy)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    assert_grads_close(results[1][1], results[0][1], "gradient checkpointing")


def test_other_attention_implementations_agree(model_dirs):
    """The packing kwargs are transformers' own: sdpa (block mask from position_ids) agrees, and
    mgrpo_packed agrees when it gets only position_ids; set_attn_implementation switches."""
    path = model_dirs["mistral_sliding"]
    batch = build_microbatch(make_sequences(seed=5))
    packed = load_policy(path, dtype=torch.float32, device="cpu")
    sdpa = load_policy(path, dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    with torch.no_grad():
        h_packed = packed_hidden_states(packed, batch)
        h_sdpa = packed_hidden_states(sdpa, batch)
        h_posids = decoder_of(packed)(
            input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False
        ).last_hidden_state[0]
        sdpa.set_attn_implementation(ATTN_IMPLEMENTATION)
        assert sdpa.config._attn_implementation == ATTN_IMPLEMENTATION
        h_switched = packed_hidden_states(sdpa, batch)
    assert h_packed.shape == (batch.num_tokens, 64)
    torch.testing.assert_close(h_sdpa, h_packed, rtol=0, atol=1e-5)
    assert torch.equal(h_posids, h_packed)
    assert torch.equal(h_switched, h_packed)


def test_bf16_policy_runs_and_returns_fp32(model_dirs):
    policy = load_policy(model_dirs["qwen2_untied"], dtype="bf16", device="cpu")
    assert policy.dtype == torch.bfloat16
    batch = build_microbatch(make_sequences()[:6])
    logp, entropy = packed_logprobs(policy, batch, return_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == (batch.num_loss_tokens,)
    assert torch.isfinite(logp).all() and (logp <= 0).all() and (entropy >= 0).all()
    logp.sum().backward()


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope", dtype=torch.float32, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(tmp_path, dtype=torch.float32, device="cpu")


def test_not_a_causal_lm(tmp_path):
    config = T5Config(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal language model"):
        load_policy(tmp_path, dtype=torch.float32, device="cpu")


def test_bad_dtype(model_dirs):
    with pytest.raises(ValueError, match="dtype"):
        load_policy(model_dirs["llama_tied"], dtype="float8", device="cpu")


def test_sequence_longer_than_max_position_embeddings(model_dirs):
    policy = load_policy(model_dirs["llama_tied"], dtype=torch.float32, device="cpu")
    batch = build_microbatch([SequenceSpec([1] * 400, [2] * 113)])  # 513 > 512
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        packed_logprobs(policy, batch)


def test_out_of_vocabulary_token(model_dirs):
    policy = load_policy(model_dirs["llama_tied"], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="input_ids"):
        packed_logprobs(policy, build_microbatch([SequenceSpec([1, 2], [VOCAB])]))


def test_padding_mask_is_refused(model_dirs):
    policy = load_policy(model_dirs["llama_tied"], dtype=torch.float32, device="cpu")
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with pytest.raises(ValueError, match="padding"):
        policy(input_ids=ids, attention_mask=mask, use_cache=False)


def test_liger_kernels_without_package_is_a_clear_error(model_dirs):
    try:
        import liger_kernel  # noqa: F401

        pytest.skip("liger-kernel is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="liger_kernels"):
        load_policy(model_dirs["qwen2_untied"], dtype=torch.float32, device="cpu", liger_kernels=True)


def _fake_liger(monkeypatch, calls):
    """A stand-in ``liger_kernel`` package whose qwen2 patcher records its arguments."""
    import sys
    import types

    def apply_liger_kernel_to_qwen2(
        rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
        model=None,
    ):  # fmt: skip
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, rms_norm=rms_norm, swiglu=swiglu,
                          fused_linear_cross_entropy=fused_linear_cross_entropy, model=model))  # fmt: skip

    names = ["liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"]
    mods = {name: types.ModuleType(name) for name in names}
    mods["liger_kernel.transformers.monkey_patch"].MODEL_TYPE_TO_APPLY_LIGER_FN = {
        "qwen2": apply_liger_kernel_to_qwen2
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)


def test_liger_kernels_patch_norm_swiglu_rope_never_the_loss(model_dirs, monkeypatch):
    from mgrpo_fast.models.policy import apply_liger_kernels

    calls = []
    _fake_liger(monkeypatch, calls)
    policy = load_policy(model_dirs["qwen2_untied"], dtype=torch.float32, device="cpu", liger_kernels=True)
    assert calls == [
        dict(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True,
             model=policy)
    ]  # fmt: skip
    llama = load_policy(model_dirs["llama_tied"], dtype=torch.float32, device="cpu")
    assert apply_liger_kernels(llama) is False  # no kernels for this model type: left as it is
    assert len(calls) == 1


def test_attention_dropout_is_zero_by_default(tmp_path):
    config = LlamaConfig(**COMMON, attention_dropout=0.3)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    policy = load_policy(tmp_path, dtype=torch.float32, device="cpu")
    assert policy.config.attention_dropout == 0.0 and policy.training
    kept = load_policy(tmp_path, dtype=torch.float32, device="cpu", attention_dropout=None)
    assert kept.config.attention_dropout == 0.3
    batch = build_microbatch(make_sequences()[:5])
    with torch.no_grad():  # training mode, yet the same function twice
        assert torch.equal(packed_logprobs(policy, batch), packed_logprobs(policy, batch))
