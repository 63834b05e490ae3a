"""The Triton paths of the public loss API against the torch paths and the fp64 reference.

``fused_linear_grpo_loss(impl="triton")`` with token-level importance sampling runs the one-pass
fused path (``mgrpo_fast.ops.fused_triton``: stats kernel with z stash, elementwise GRPO kernel,
dlogits from the stash, cuBLAS/torch GEMMs); with sequence-level importance sampling it runs the
Triton log-probs plus the torch loss. ``grpo_loss(impl="triton")`` runs the elementwise kernel.
On CPU the kernels run under the Triton interpreter (small shapes); on a GPU the same tests run on
CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / the kernels are imported

pytest.importorskip("triton")

from conftest import assert_within_rule  # noqa: E402

from mgrpo_fast import fused_linear_grpo_loss, grpo_loss  # noqa: E402
from mgrpo_fast.ops.layout import cu_seqlens_from_lengths  # noqa: E402
from mgrpo_fast.reference import grpo_loss_ref, linear_logprobs_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, H, V = 3, 7, 24, 67


def make_batch(dtype, *, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, dtype=torch.float64, generator=g).to(dtype)
    weight = (torch.randn(V, H, dtype=torch.float64, generator=g) / H**0.5).to(dtype)
    bias = (0.1 * torch.randn(V, dtype=torch.float64, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, :3] = 0
    targets[mask == 0] = -100  # padding ids: only masked-in rows are computed
    with torch.no_grad():
        logp, _, _ = linear_logprobs_ref(
            hidden.double(), weight.double(), targets.clamp(min=0), bias.double()
        )
    # old/ref policies close to the current one, ratios on both sides of the clip range
    old = logp + 0.3 * torch.randn(B, T, dtype=torch.float64, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, dtype=torch.float64, generator=g)
    shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(shape, dtype=torch.float64, generator=g)
    # sampler corrections (vllm_is_ratio) per token and per sequence, some truncated to 0
    is_token = 0.5 + torch.rand(B, T, dtype=torch.float64, generator=g)
    is_token[0, 1] = 0.0
    move = lambda x: x.to(DEVICE)  # noqa: E731
    return {
        k: move(v)
        for k, v in dict(
            hidden=hidden,
            weight=weight,
            bias=bias,
            targets=targets,
            mask=mask,
            old=old.float(),
            ref=ref.float(),
            adv=adv.float(),
            is_token=is_token.float(),
            is_seq=is_token[:, 0].float() + 0.3,
        ).items()
    }


def sampler_correction(d, options):
    """``(options without the test key "is", the vllm_is_ratio it names)``."""
    options = dict(options)
    which = options.pop("is", None)
    return options, None if which is None else d[f"is_{which}"]


def run(d, impl, **options):
    options, is_ratio = sampler_correction(d, options)
    h = d["hidden"].detach().clone().requires_grad_()
    w = d["weight"].detach().clone().requires_grad_()
    b = d["bias"].detach().clone().requires_grad_()
    loss, metrics = fused_linear_grpo_loss(
        h,
        w,
        d["targets"],
        d["adv"],
        d["mask"],
        old_logp=d["old"],
        ref_logp=d["ref"],
        bias=b,
        temperature=0.8,
        vllm_is_ratio=is_ratio,
        impl=impl,
        **options,
    )
    grads = torch.autograd.grad(loss, (h, w, b))
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def run_reference(d, **options):
    options, is_ratio = sampler_correction(d, options)
    h, w, b = (d[k].detach().double().requires_grad_() for k in ("hidden", "weight", "bias"))
    logp, entropy, _ = linear_logprobs_ref(h, w, d["targets"].clamp(min=0), b, temperature=0.8)
    loss, metrics = grpo_loss_ref(
        logp,
        d["old"].double(),
        d["ref"].double(),
        d["adv"].double(),
        d["mask"].double(),
        entropy=entropy,
        vllm_is_ratio=None if is_ratio is None else is_ratio.double(),
        **options,
    )
    return loss.detach(), metrics, torch.autograd.grad(loss, (h, w, b))


LOSS_CASES = [
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", delta=1.5, kl_estimator="k2"),
    dict(loss_type="dr_grpo", max_completion_length=9, beta=0.1, kl_estimator="k1"),
    dict(loss_type="cispo", epsilon_high=1.1),
    dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04),
    dict(loss_type="sapo", beta=0.04, sapo_temperature_neg=2.0),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="luspo", beta=0.04, use_bias_correction_kl=True),
    dict(loss_type="vespo", beta=0.04, vespo_k_neg=2.5),  # two-stage: Triton log-probs, torch loss
    dict(loss_type="vespo", **{"is": "token"}),
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=True, **{"is": "token"}),
    dict(loss_type="grpo", entropy_coef=0.05, **{"is": "seq"}),
    dict(loss_type="cispo", epsilon_high=1.1, entropy_coef=-0.02, **{"is": "seq"}),
    dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.05, **{"is": "token"}),
]


@pytest.mark.parametrize("options", LOSS_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fused_triton_fp32_matches_reference(options):
    d = make_batch(torch.float32)
    loss, metrics, grads = run(d, "triton", **options)
    ref_loss, ref_metrics, ref_grads = run_reference(d, **options)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-6)
    for key in (
        "ratio",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "kl",
        "entropy",
        "vespo/phi_seq_mean",
    ):
        if key not in ref_metrics:
            assert key not in metrics, key
            continue
        torch.testing.assert_close(
            metrics[key].double().cpu(), ref_metrics[key], rtol=1e-5, atol=1e-6, msg=key
        )
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), r, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("per_token_adv", [False, True])
def test_fused_triton_equals_torch_path_packed(per_token_adv):
    d = make_batch(torch.float32, seed=3, per_token_adv=per_token_adv)
    keep = d["mask"].bool()
    lengths = d["mask"].sum(1).long().tolist()
    packed = dict(
        d,
        hidden=d["hidden"][keep],
        targets=d["targets"][keep],
        mask=None,
        old=d["old"][keep],
        ref=d["ref"][keep],
        adv=d["adv"][keep] if per_token_adv else d["adv"],
    )
    cu = cu_seqlens_from_lengths(lengths, device=DEVICE)

    def run_packed(impl):
        h = packed["hidden"].detach().clone().requires_grad_()
        w = packed["weight"].detach().clone().requires_grad_()
        loss, metrics = fused_linear_grpo_loss(
            h,
            w,
            packed["targets"],
            packed["adv"],
            cu_seqlens=cu,
            old_logp=packed["old"],
            ref_logp=packed["ref"],
            loss_type="grpo",
            beta=0.04,
            impl=impl,
        )
        return loss.detach(), metrics, torch.autograd.grad(loss, (h, w))

    loss_t, metrics_t, grads_t = run_packed("triton")
    loss_c, metrics_c, grads_c = run_packed("torch")
    torch.testing.assert_close(loss_t, loss_c, rtol=1e-5, atol=1e-6)
    for key in metrics_c:
        torch.testing.assert_close(metrics_t[key], metrics_c[key], rtol=1e-5, atol=1e-6, msg=key)
    for g_t, g_c in zip(grads_t, grads_c):
        torch.testing.assert_close(g_t, g_c, rtol=1e-4, atol=1e-6)


def test_fused_triton_bf16_within_tolerance_rule():
    d = make_batch(torch.bfloat16, seed=5)
    options = dict(loss_type="dapo", beta=0.04)
    _, _, grads = run(d, "triton", **options)
    _, _, plain = run(d, "torch", **options)  # the chunked torch path on the same bf16 inputs
    _, _, ref_grads = run_reference(d, **options)
    for name, g, p, r in zip(("hidden", "weight", "bias"), grads, plain, ref_grads):
        assert_within_rule(g.double().cpu(), p.double().cpu(), r, torch.bfloat16, what=name)


def test_fused_triton_is_deterministic_and_chunking_invariant():
    d = make_batch(torch.float32, seed=7)
    first = run(d, "triton", loss_type="dapo", beta=0.04)
    second = run(d, "triton", loss_type="dapo", beta=0.04)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))
    chunked = run(d, "triton", loss_type="dapo", beta=0.04, chunk_size=5)  # several stash chunks
    torch.testing.assert_close(chunked[0], first[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(chunked[2], first[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="grpo"),
        dict(loss_type="dapo", use_bias_correction_kl=True),
        dict(loss_type="cispo", epsilon_high=1.2),
        dict(loss_type="sapo"),
        dict(loss_type="luspo", kl_estimator="k2"),
        dict(loss_type="vespo"),
        dict(loss_type="dapo", entropy_coef=0.1),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("is_ratio", [None, "token", "seq"])
def test_grpo_loss_triton_matches_torch(options, is_ratio):
    g = torch.Generator().manual_seed(11)
    logp = (-torch.rand(B, T, generator=g) * 3).to(DEVICE).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    ref = logp.detach() + 0.2 * torch.randn(B, T, generator=g).to(DEVICE)
    adv = torch.randn(B, generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.2).float().to(DEVICE)
    entropy = (torch.rand(B, T, generator=g) * 2).to(DEVICE).requires_grad_()
    v = {None: None, "token": torch.rand(B, T, generator=g) + 0.3, "seq": torch.rand(B, generator=g) + 0.3}
    v = None if v[is_ratio] is None else v[is_ratio].to(DEVICE)
    kw = dict(beta=0.04, entropy=entropy, vllm_is_ratio=v, **options)
    loss_t, metrics_t = grpo_loss(logp, old, ref, adv, mask, impl="triton", **kw)
    loss_c, metrics_c = grpo_loss(logp, old, ref, adv, mask, impl="torch", **kw)
    torch.testing.assert_close(loss_t, loss_c, rtol=1e-5, atol=1e-7)
    assert metrics_t.keys() == metrics_c.keys()
    for key in metrics_c:
        torch.testing.assert_close(metrics_t[key], metrics_c[key], rtol=1e-5, atol=1e-7, msg=key)
    g_t = torch.autograd.grad(loss_t, (logp, entropy), allow_unused=True)
    g_c = torch.autograd.grad(loss_c, (logp, entropy), allow_unused=True)
    for a, b in zip(g_t, g_c):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grpo_loss_triton_rejects_sequence_level():
    logp = torch.zeros(B, T, device=DEVICE)
    with pytest.raises(ValueError, match="impl"):
        grpo_loss(
            logp,
            None,
            None,
            torch.zeros(B, device=DEVICE),
            importance_sampling_level="sequence",
            impl="triton",
        )
