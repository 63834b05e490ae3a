"""``FusedGRPOTrainer`` against TRL's own ``GRPOTrainer`` loss, on a tiny random Qwen2 (CPU).

The comparison runs TRL's ``_compute_loss`` and the fused one on the SAME micro-batch of one
``_generate_and_score_completions`` call (no second generation), on the same trainer instance:
loss values within 1e-5 and parameter gradients within 1e-4 (relative), logged metrics equal.
Old and reference log-probs are perturbed and the advantages drawn at random so that ratios are
far from 1, both clip sides fire and the KL is non-zero.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers")

from mgrpo_fast.integrations import trl as integration  # noqa: E402
from mgrpo_fast.ops.options import LOSS_TYPES  # noqa: E402

FusedGRPOTrainer = integration.FusedGRPOTrainer
GRPOConfig = trl.GRPOConfig
GRPOTrainer = trl.GRPOTrainer

PROMPTS = ["1+1=", "2+3=", "abc?", "hello "]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?.")


def char_reward(completions, **kwargs):
    """Number of distinct characters: varies across the random completions of a group."""
    return [float(len(set(c))) for c in completions]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A char-level tokenizer and a 2-layer Qwen2 saved to disk (TRL reloads it for the reference)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("trl_assets")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(config).save_pretrained(root / "model")
    return root


def make_config(out_dir, **overrides) -> GRPOConfig:
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # steps_per_generation = 2: a generation batch is 2 micro-batches
        num_generations=2,
        max_completion_length=6,
        temperature=0.9,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        learning_rate=1e-2,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        beta=0.0,
        dataloader_num_workers=0,
        bf16=False,  # fp32 throughout (TRL's default bf16 autocast rounds its logits tiles to bf16)
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def make_trainer(assets, out_dir, cls=FusedGRPOTrainer, **overrides):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    return cls(
        model=str(assets / "model"),
        reward_funcs=char_reward,
        args=make_config(out_dir, **overrides),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def scored(assets, tmp_path_factory):
    """One trainer (beta = 0.04, so TRL computes reference log-probs; num_iterations = 2, so it
    computes old log-probs) and the first micro-batch of ONE generation batch, perturbed."""
    from trl.trainer.utils import split_tensor_dict

    torch.manual_seed(0)
    trainer = make_trainer(assets, tmp_path_factory.mktemp("cmp"), beta=0.04, num_iterations=2)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; TRL's normalizers read it
    batch = next(iter(trainer.get_train_dataloader()))
    full = trainer._generate_and_score_completions(batch)
    assert full["old_per_token_logps"] is not None and full["ref_per_token_logps"] is not None
    # The random model never samples EOS: cut completions to ragged lengths (as EOS would), so the
    # loss types' normalizers differ (with equal lengths grpo, bnpo and dr_grpo coincide).
    lengths = torch.tensor([6, 3, 5, 1, 2, 6, 4, 6])
    width = full["completion_mask"].size(1)
    assert width == 6 and full["completion_mask"].size(0) == len(lengths)
    full["completion_mask"] = (torch.arange(width) < lengths.unsqueeze(1)).to(full["completion_mask"].dtype)
    full["num_items_in_batch"] = full["completion_mask"].sum()
    inputs = split_tensor_dict(full, trainer.args.steps_per_generation)[0]
    gen = torch.Generator().manual_seed(1)
    mask = inputs["completion_mask"].float()
    shape = mask.shape
    # Alternating signs: ratios on both sides of 1, about half of them outside the clip range.
    signs = (-1.0) ** torch.arange(shape[1])
    inputs["old_per_token_logps"] = (
        inputs["old_per_token_logps"] + 0.4 * signs * torch.randn(shape, generator=gen).abs()
    )
    inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] + 0.5 * torch.randn(shape, generator=gen)
    assert shape[0] == 4
    inputs["advantages"] = torch.tensor([-0.9, 1.1, -0.4, 0.6])  # both signs: both clip sides fire
    # The micro-batch holds fewer tokens than the generation batch: the dapo rescale is not 1.
    assert int(inputs["num_items_in_batch"]) > int(mask.sum())
    return trainer, inputs


ENTROPY_STATE = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")


def run_both(trainer, inputs, autocast=None):
    """(loss, grads, metrics, entropy-control state) of TRL's _compute_loss and of the fused one, on the
    same inputs and from the same entropy-control state (``autocast``: a dtype to run both under)."""
    results = []
    start = {n: getattr(trainer, n) for n in ENTROPY_STATE}
    for compute in (GRPOTrainer._compute_loss, FusedGRPOTrainer._compute_loss):
        for n, v in start.items():
            setattr(trainer, n, v)
        trainer.model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            loss = compute(trainer, trainer.model, inputs)
        loss.backward()
        grads = {
            n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        state = {n: getattr(trainer, n) for n in ENTROPY_STATE}
        results.append((loss.detach(), grads, metrics, state))
    for n, v in start.items():
        setattr(trainer, n, v)
    trainer.model.zero_grad(set_to_none=True)
    return results


def assert_same(trainer, inputs, expect_clipping=True):
    (loss_trl, g_trl, m_trl, s_trl), (loss_fused, g_fused, m_fused, s_fused) = run_both(trainer, inputs)
    assert torch.isfinite(loss_trl)
    assert abs(loss_fused.item() - loss_trl.item()) <= 1e-5, (loss_fused.item(), loss_trl.item())
    assert g_trl.keys() == g_fused.keys() and len(g_trl) > 0
    for name, g in g_trl.items():
        err = (g_fused[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
    assert m_trl.keys() == m_fused.keys(), (sorted(m_trl), sorted(m_fused))
    for key, value in m_trl.items():
        other = m_fused[key]
        assert (math.isnan(value) and math.isnan(other)) or abs(other - value) <= 1e-5, (key, value, other)
    for name in ENTROPY_STATE:  # the adaptive entropy controller moves the same way
        a, b = s_trl[name], s_fused[name]
        if isinstance(a, torch.Tensor) or a is None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert a == pytest.approx(b, rel=1e-5, abs=1e-7), (name, a, b)
    if expect_clipping and "clip_ratio/region_mean" in m_trl:
        assert m_trl["clip_ratio/low_mean"] > 0 and m_trl["clip_ratio/high_mean"] > 0
    return m_fused


@pytest.fixture
def configure(scored):
    """Set trainer attributes for one case (TRL and the fused loss read them per call); restore after."""
    trainer, _ = scored
    names = (
        "loss_type",
        "beta",
        "importance_sampling_level",
        "use_vllm",
        "vllm_importance_sampling_correction",
        "off_policy_mask_threshold",
        "top_entropy_quantile",
        "scale_rewards",
        "epsilon_low",
        "epsilon_high",
        "entropy_coef",
        "use_adaptive_entropy",
        "_entropy_bonus_enabled",
        "_last_world_entropy",
        "_entropy_window_stats",
    )
    arg_names = (
        "delta",
        "use_bias_correction_kl",
        "sapo_temperature_pos",
        "sapo_temperature_neg",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
        "entropy_target",
        "entropy_coef_delta",
    )
    saved = {n: getattr(trainer, n) for n in names}
    saved_args = {n: getattr(trainer.args, n) for n in arg_names}

    def apply(delta=None, use_bias_correction_kl=True, **attrs):
        trainer.args.delta = delta
        trainer.args.use_bias_correction_kl = use_bias_correction_kl
        for n, v in attrs.items():
            setattr(trainer.args if n in arg_names else trainer, n, v)
        trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
        return trainer

    yield apply
    for n, v in saved.items():
        setattr(trainer, n, v)
    for n, v in saved_args.items():
        setattr(trainer.args, n, v)


EPSILONS = {
    "eps-asymmetric": dict(epsilon_low=0.2, epsilon_high=0.28),
    "eps-wide": dict(epsilon_low=0.5, epsilon_high=2.0),  # cispo: the IS weight capped at 2
}
BETAS = {
    "beta0": dict(beta=0.0),
    "beta0.04": dict(beta=0.04, use_bias_correction_kl=True),
    "beta0.04-uncorrected": dict(beta=0.04, use_bias_correction_kl=False),
}


@pytest.mark.parametrize("epsilons", EPSILONS, ids=list(EPSILONS))
@pytest.mark.parametrize("betas", BETAS, ids=list(BETAS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_configuration_matrix_matches_trl(scored, configure, loss_type, level, betas, epsilons):
    """TRL accepts every loss type at both importance-sampling levels, with or without the KL term
    (importance-weighted or not) and any clip range: each combination gives TRL's loss, gradients
    and metrics. (``scale_rewards`` acts on the advantages before the loss: test below.)"""
    trainer, inputs = scored
    configure(loss_type=loss_type, importance_sampling_level=level, **BETAS[betas], **EPSILONS[epsilons])
    clips = loss_type not in ("cispo", "sapo", "vespo")
    both_sides_clip = clips and level == "token" and epsilons == "eps-asymmetric"  # on this batch
    metrics = assert_same(trainer, inputs, expect_clipping=both_sides_clip)
    assert ("kl" in metrics) == (BETAS[betas]["beta"] != 0.0)
    assert "entropy" in metrics
    clip_keys = ("clip_ratio/low_min", "clip_ratio/high_max", "clip_ratio/region_mean")
    assert all(key in metrics for key in clip_keys) == clips
    assert ("vespo/phi_seq_mean" in metrics) == (loss_type == "vespo")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_scale_rewards_matches_trl(scored, configure, loss_type):
    """Advantages scaled as each ``scale_rewards`` says (TRL's own code: the fused trainer only replaces
    the loss), then the loss on them: TRL's."""
    from trl.trainer.utils import split_tensor_dict

    trainer, _ = scored
    advantages = {}
    for scale_rewards in ("group", "batch", "none"):
        configure(loss_type=loss_type, scale_rewards=scale_rewards)
        torch.manual_seed(0)  # the same completions and rewards each time
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = trainer._generate_and_score_completions(batch)
        advantages[scale_rewards] = inputs["advantages"]
        micro_batch = split_tensor_dict(inputs, trainer.args.steps_per_generation)[0]
        assert_same(trainer, micro_batch, expect_clipping=False)
    group, batch_scaled, none = advantages.values()
    assert none.abs().sum() > 0 and not torch.allclose(group, none) and not torch.allclose(batch_scaled, none)


def test_loss_types_differ_on_this_batch(scored, configure):
    """Guard for the comparisons: on this ragged batch each normalizer gives its own value."""
    trainer, inputs = scored
    values = {}
    for loss_type in LOSS_TYPES:
        configure(loss_type=loss_type)
        with torch.no_grad():
            values[loss_type] = GRPOTrainer._compute_loss(trainer, trainer.model, inputs).item()
    assert len({round(v, 6) for v in values.values()}) == len(LOSS_TYPES), values


# the adaptive entropy control after a window whose entropy was 0 (the coefficient moves)
ADAPTIVE = dict(use_adaptive_entropy=True, entropy_coef=0.02, _last_world_entropy=0.0)


@pytest.mark.parametrize(
    "case",
    [
        dict(loss_type="grpo", importance_sampling_level="sequence"),
        dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04),
        dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=False),
        dict(loss_type="dapo", delta=1.5),
        dict(loss_type="cispo", epsilon_high=1.1, beta=0.04),
        dict(loss_type="cispo", epsilon_high=1.1, beta=0.04, use_bias_correction_kl=False),
        dict(loss_type="dapo", use_vllm=True, vllm_importance_sampling_correction=True),
        dict(loss_type="bnpo", off_policy_mask_threshold=0.05),
        dict(loss_type="dapo", top_entropy_quantile=0.5),
        dict(loss_type="sapo", sapo_temperature_pos=0.6, sapo_temperature_neg=2.0, beta=0.04),
        dict(loss_type="sapo", importance_sampling_level="sequence"),
        dict(loss_type="cispo", epsilon_high=1.1, importance_sampling_level="sequence"),
        dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.04),
        dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=1.0),
        dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True, beta=0.04),
        dict(loss_type="sapo", use_vllm=True, vllm_importance_sampling_correction=True),
        dict(loss_type="luspo", use_vllm=True, vllm_importance_sampling_correction=True),
        dict(loss_type="grpo", entropy_coef=0.05, beta=0.04),
        dict(loss_type="dapo", entropy_coef=0.05),
        dict(loss_type="dr_grpo", entropy_coef=-0.02),
        dict(loss_type="vespo", entropy_coef=0.05),
        dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.5),
        dict(ADAPTIVE, loss_type="grpo", entropy_target=5.0),
        dict(ADAPTIVE, loss_type="dapo", entropy_target=0.5),
        dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.02, entropy_target=5.0),
        dict(ADAPTIVE, loss_type="grpo", entropy_target=5.0, top_entropy_quantile=0.5),
        dict(loss_type="dapo", delta=0.9),
        dict(loss_type="grpo", epsilon_low=1.2, epsilon_high=0.1),
    ],
    ids=[
        "gspo-grpo",
        "gspo-dapo-kl",
        "gspo-grpo-uncorrected-kl",
        "delta",
        "cispo",
        "cispo-uncorrected-kl",
        "vllm-is",
        "off-policy-mask",
        "top-entropy",
        "sapo-temperatures",
        "sapo-sequence",
        "cispo-sequence",
        "luspo-sequence-kl",
        "vespo-gamma",
        "vespo-vllm-is",
        "sapo-vllm-is",
        "luspo-vllm-is",
        "entropy-grpo",
        "entropy-dapo",
        "entropy-negative-dr_grpo",
        "entropy-vespo",
        "entropy-top-entropy",
        "adaptive-entropy-grpo",
        "adaptive-entropy-above-target",
        "adaptive-entropy-first-window",
        "adaptive-entropy-top-entropy",
        "delta-below-1",
        "epsilon-low-above-1",
    ],
)
def test_other_options_match_trl(scored, configure, case):
    trainer, inputs = scored
    inputs = dict(inputs)
    if case.get("use_vllm"):  # TRL's vLLM path would provide this; some tokens masked out (0)
        gen = torch.Generator().manual_seed(2)
        ratio = torch.rand(inputs["completion_mask"].shape, generator=gen) + 0.5
        inputs["importance_sampling_ratio"] = ratio.masked_fill(ratio > 1.4, 0.0)
    configure(**case)
    sequence_level = case.get("importance_sampling_level") == "sequence"
    clipping = not sequence_level and case["loss_type"] not in ("cispo", "sapo", "vespo")
    clipping = clipping and "epsilon_low" not in case and (case.get("delta") or 2.0) > 1.0
    metrics = assert_same(trainer, inputs, expect_clipping=clipping)
    if case.get("entropy_coef") or case.get("use_adaptive_entropy"):
        assert "policy_loss" in metrics and "entropy_coef" in metrics


def test_on_policy_batch_without_old_logps(scored, configure):
    """num_iterations = 1: TRL passes no old log-probs; the ratio is exactly 1, nothing is clipped."""
    trainer, inputs = scored
    inputs = {k: v for k, v in inputs.items() if k != "old_per_token_logps"}
    configure(loss_type="dapo", beta=0.04)
    metrics = assert_same(trainer, inputs, expect_clipping=False)
    assert metrics["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize(
    "overrides",
    [
        # the one-pass fused loss with a KL term and old log-probs (num_iterations = 2), fp32
        dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False, num_iterations=2),
        # TRL's defaults (bf16 autocast, bias-corrected KL) and the adaptive entropy bonus
        dict(loss_type="grpo", beta=0.04, bf16=True, use_adaptive_entropy=True, entropy_target=10.0),
        # the bonus over the high-entropy tokens only: the two-stage path
        dict(loss_type="vespo", entropy_coef=0.01, top_entropy_quantile=0.5),
    ],
    ids=["fused-fp32", "fused-bf16-adaptive-entropy", "two-stage-top-entropy-bonus"],
)
def test_two_training_steps_end_to_end(assets, tmp_path, monkeypatch, overrides):
    calls = {"fused": 0, "two_stage": 0}
    for name, key in (("fused_linear_grpo_loss", "fused"), ("grpo_loss", "two_stage")):
        original = getattr(integration, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(integration, name, counted)
    torch.manual_seed(0)
    trainer = make_trainer(assets, tmp_path, max_steps=2, **overrides)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 2
    assert math.isfinite(result.training_loss)
    # 2 optimizer steps x 2 accumulation micro-batches, each one loss call on the expected path
    expected = "two_stage" if "top_entropy_quantile" in overrides else "fused"
    assert calls[expected] == 4 and sum(calls.values()) == 4, calls
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    keys = ["entropy"] + (["kl"] if overrides.get("beta") else [])
    if overrides["loss_type"] != "vespo":
        keys += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
        keys += ["clip_ratio/low_min", "clip_ratio/high_max"]
    if "entropy_coef" in overrides or "use_adaptive_entropy" in overrides:
        keys += ["policy_loss", "entropy_coef"]
    for key in keys:
        assert all(key in entry and math.isfinite(entry[key]) for entry in logs), key
    if overrides.get("use_adaptive_entropy"):  # entropy <= target: the coefficient grew each step
        assert trainer.entropy_coef == pytest.approx(2 * trainer.args.entropy_coef_delta)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in changed and len(changed) > 1


def test_dr_grpo_without_max_completion_length_fails_in_trl_too(scored, configure):
    """The one configuration refused for the loss: TRL's own loss cannot compute it either."""
    trainer, inputs = scored
    configure(loss_type="dr_grpo")
    saved = trainer.max_completion_length
    trainer.max_completion_length = None
    try:
        with pytest.raises(TypeError):
            GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    finally:
        trainer.max_completion_length = saved


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_bf16_within_twice_trl_error(scored, configure, loss_type):
    """Under bf16 autocast (TRL's default), the fused loss's error against the same loss on an fp64
    copy of the model is at most twice TRL's own (loss and every parameter gradient)."""
    trainer, inputs = scored
    extra = dict(epsilon_high=1.1) if loss_type == "cispo" else {}
    configure(loss_type=loss_type, beta=0.04, entropy_coef=0.01, **extra)
    model64 = copy.deepcopy(trainer.model).double()
    inputs64 = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()
    }
    loss64 = GRPOTrainer._compute_loss(trainer, model64, inputs64)
    loss64.backward()
    grads64 = {n: p.grad.detach() for n, p in model64.named_parameters() if p.grad is not None}
    (loss_trl, g_trl, _, _), (loss_fused, g_fused, _, _) = run_both(trainer, inputs, autocast=torch.bfloat16)
    floor = 1e-3
    trl_err, fused_err = abs(loss_trl.double() - loss64.detach()), abs(loss_fused.double() - loss64.detach())
    assert fused_err <= 2 * trl_err + floor * max(1.0, abs(loss64.item())), (fused_err, trl_err)
    for name, g in grads64.items():
        scale = g.norm().clamp(min=1e-12)
        trl_e = float((g_trl[name].double() - g).norm() / scale)
        fused_e = float((g_fused[name].double() - g).norm() / scale)
        assert fused_e <= 2 * trl_e + floor, (name, fused_e, trl_e)


def test_version_check():
    integration.check_trl_version("1.16.0")
    integration.check_trl_version("1.10.0")
    integration.check_trl_version("1.16.1.dev0")
    for bad in ("1.9.2", "1.17.0", "2.0.0", "0.29.1"):
        with pytest.raises(ImportError, match=r"trl>=1\.10,<1\.17"):
            integration.check_trl_version(bad)


def test_softcapped_models_rejected():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
        )
    )
    assert integration._logit_scale(model) == 1.0
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        integration._logit_scale(model)


def test_loss_options_of_config(tmp_path):
    """A GRPOConfig read as TRL reads it: one LossOptions, TRL-only fields mapped or dropped."""
    LossOptions = integration.LossOptions
    options = integration.loss_options_of(make_config(tmp_path, loss_type="grpo", beta=0.04, delta=1.5))
    assert options == LossOptions(
        loss_type="grpo",
        epsilon_low=0.2,
        epsilon_high=0.28,
        delta=1.5,
        beta=0.04,
        use_bias_correction_kl=True,
    )
    # epsilon_high defaults to epsilon; max_completion_length only normalizes dr_grpo
    options = integration.loss_options_of(make_config(tmp_path, loss_type="dr_grpo", epsilon_high=None))
    assert (options.epsilon_high, options.max_completion_length) == (0.2, 6)
    # cispo has no dual clip: TRL ignores delta there, and so does the fused loss
    cispo = make_config(tmp_path, loss_type="cispo", epsilon_high=5.0, delta=1.5)
    options = integration.loss_options_of(cispo)
    assert (options.delta, options.epsilon_high, options.max_completion_length) == (None, 5.0, None)


# Last: constructing GRPOConfigs resets accelerate's shared state, which the `scored` trainer uses.
def test_unsupported_fields_fail_before_loading(tmp_path):
    """Checked before the model is loaded: the bogus model path is never reached."""
    for overrides, field in [
        (dict(loss_type="dr_grpo", max_completion_length=None), "max_completion_length"),
        (dict(delta=float("nan")), "delta"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    ]:
        with pytest.raises(ValueError, match=field):
            FusedGRPOTrainer(
                model="/nonexistent/model", reward_funcs=char_reward, args=make_config(tmp_path, **overrides)
            )


def test_configurations_trl_accepts_are_accepted(tmp_path):
    """Every loss type, the entropy terms and bounds TRL does not check pass the construction checks."""
    for overrides in [
        *[dict(loss_type=t) for t in LOSS_TYPES],
        dict(entropy_coef=0.01),
        dict(use_adaptive_entropy=True),
        dict(delta=0.9),
        dict(epsilon=1.5),
        dict(beta=-0.01),
        dict(loss_type="cispo", importance_sampling_level="sequence"),
    ]:
        assert integration.unsupported_config_fields(make_config(tmp_path, **overrides)) == [], overrides
