"""Packed forwards through real transformers causal LMs (``mgrpo_fast.models.policy``): no leakage
between packed sequences, gradient checkpointing, other attention implementations, bf16, and clear
errors. Packed == unpacked log-probs and gradients for every architecture of the matrix
(``tests/architectures.py``) are in ``test_architectures.py``.
"""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from architectures import (  # noqa: E402
    VOCAB,
    assert_grads_close,
    grads_of,
    loss_weights,
    make_config,
    make_sequences,
    save_architecture,
)
from transformers import AutoModelForCausalLM, T5Config  # noqa: E402

from mgrpo_fast.models.attention import ATTN_IMPLEMENTATION  # noqa: E402
from mgrpo_fast.models.policy import decoder_of, load_policy, packed_hidden_states, packed_logprobs
from mgrpo_fast.packing.microbatch import SequenceSpec, build_microbatch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``name -> directory`` of the tiny random models these tests use, written once per module."""
    names = ("llama", "qwen2", "mistral")
    return {name: save_architecture(name, tmp_path_factory.mktemp(name)) for name in names}


def test_no_cross_sequence_leakage(model_dirs):
    """Changing one sequence's tokens leaves every other sequence's log-probs bit-identical."""
    policy = load_policy(model_dirs["qwen2"], dtype=torch.float32, device="cpu")
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
    path = model_dirs["llama"]
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
    path = model_dirs["mistral"]
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
    policy = load_policy(model_dirs["qwen2"], dtype="bf16", device="cpu")
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
        load_policy(model_dirs["llama"], dtype="float8", device="cpu")


def test_sequence_longer_than_max_position_embeddings(model_dirs):
    policy = load_policy(model_dirs["llama"], dtype=torch.float32, device="cpu")
    batch = build_microbatch([SequenceSpec([1] * 400, [2] * 113)])  # 513 > 512
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        packed_logprobs(policy, batch)


def test_out_of_vocabulary_token(model_dirs):
    policy = load_policy(model_dirs["llama"], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="input_ids"):
        packed_logprobs(policy, build_microbatch([SequenceSpec([1, 2], [VOCAB])]))


def test_padding_mask_is_refused(model_dirs):
    policy = load_policy(model_dirs["llama"], dtype=torch.float32, device="cpu")
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
        load_policy(model_dirs["qwen2"], dtype=torch.float32, device="cpu", liger_kernels=True)


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
    policy = load_policy(model_dirs["qwen2"], dtype=torch.float32, device="cpu", liger_kernels=True)
    assert calls == [
        dict(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True,
             model=policy)
    ]  # fmt: skip
    llama = load_policy(model_dirs["llama"], dtype=torch.float32, device="cpu")
    assert apply_liger_kernels(llama) is False  # no kernels for this model type: left as it is
    assert len(calls) == 1


def test_attention_dropout_is_zero_by_default(tmp_path):
    config = make_config("llama", attention_dropout=0.3)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    policy = load_policy(tmp_path, dtype=torch.float32, device="cpu")
    assert policy.config.attention_dropout == 0.0 and policy.training
    kept = load_policy(tmp_path, dtype=torch.float32, device="cpu", attention_dropout=None)
    assert kept.config.attention_dropout == 0.3
    batch = build_microbatch(make_sequences()[:5])
    with torch.no_grad():  # training mode, yet the same function twice
        assert torch.equal(packed_logprobs(policy, batch), packed_logprobs(policy, batch))
