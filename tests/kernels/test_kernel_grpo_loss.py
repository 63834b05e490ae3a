"""The per-token GRPO kernel (``mgrpo_fast.kernels.grpo_loss``) against ``reference.grpo_loss_ref``.

Inputs are fp32 (what the caller passes); the reference runs in fp64 on the same values, and its
gradient w.r.t. ``logp`` comes from torch autograd through the reference expression. Ratios are
placed in every region (below the clip range, inside it, above it, above the dual-clip delta, and
exactly 1) with both advantage signs and zero advantages, away from the region boundaries so fp32
and fp64 agree on the region. Masked rows hold inf/NaN garbage.

Runs on CUDA when available, else under the Triton interpreter on CPU.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mgrpo_fast.kernels.grpo_loss import (  # noqa: E402
    TritonTokenGRPOLoss,
    aot_specs,
    grpo_token_terms,
    triton_token_grpo_loss,
)
from mgrpo_fast.reference import (  # noqa: E402
    KL_ESTIMATORS,
    LOSS_TYPES,
    grpo_loss_ref,
    vespo_weights_ref,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64
EPS_LOW = 0.2
# Ratio bands (clip range [0.8, 1.28], delta 2.0, cispo cap 1.1), each >= 0.02 from any boundary.
RATIO_BANDS = ((0.3, 0.75), (0.85, 1.05), (1.12, 1.23), (1.33, 1.9), (2.1, 4.0))
# (B, T) with N = B * T in {1, 7, 333, 5000}; the flat rows are the padded batch, row-major.
SHAPES = {1: (1, 1), 7: (1, 7), 333: (9, 37), 5000: (50, 100)}


def eps_high(loss_type: str) -> float:
    return 1.1 if loss_type == "cispo" else 0.28


def make_batch(num_seqs: int, length: int, seed: int = 0) -> dict:
    """fp32 inputs (B, T); masked rows of logp/old/ref hold inf/-inf/NaN garbage."""
    g = torch.Generator().manual_seed(seed)
    n = num_seqs * length
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)  # noqa: E731
    logp = -u(0.05, 3.0)
    band = torch.randint(0, len(RATIO_BANDS), (n,), generator=g)
    lo = torch.tensor([b[0] for b in RATIO_BANDS], dtype=F64)[band]
    hi = torch.tensor([b[1] for b in RATIO_BANDS], dtype=F64)[band]
    ratio = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    logp32 = logp.float()
    old32 = (logp32.double() - ratio.log()).float()
    exact_one = torch.rand(n, generator=g) < 0.1
    old32[exact_one] = logp32[exact_one]  # ratio exactly 1: the tie of both branches
    # KL argument y = ref - logp: ordinary, large, tiny (k3 cancellation) and exactly 0.
    y = torch.randn(n, generator=g, dtype=F64) * 0.7
    kind = torch.rand(n, generator=g)
    y = torch.where(kind < 0.1, torch.sign(y) * u(1.5, 3.0), y)
    y = torch.where((kind >= 0.1) & (kind < 0.2), y * 1e-3, y)
    y = torch.where((kind >= 0.2) & (kind < 0.25), torch.zeros_like(y), y)
    ref32 = (logp32.double() + y).float()
    adv = torch.sign(torch.randn(n, generator=g, dtype=F64)) * u(0.1, 2.0)
    # the sampler correction (vllm_is_ratio): finite everywhere, some exactly 0 (masked by TIS)
    is_ratio = u(0.2, 1.6)
    is_ratio[torch.rand(n, generator=g) < 0.05] = 0.0
    adv[torch.rand(n, generator=g) < 0.05] = 0.0
    mask = (torch.rand(n, generator=g) > 0.2).float()
    mask[torch.rand(n, generator=g) < 0.05] = 0.5  # fractional weights are honoured as weights
    if num_seqs > 1:
        mask[:length] = 0.0  # sequence 0 is all masked out
    off = mask == 0
    garbage = torch.tensor([math.inf, -math.inf, math.nan])[torch.randint(0, 3, (n,), generator=g)]
    clean_logp = logp32.clone()
    logp32, old32, ref32 = logp32.clone(), old32.clone(), ref32.clone()
    logp32[off], old32[off], ref32[off] = garbage[off], garbage.flip(0)[off], -garbage[off]
    shape = (num_seqs, length)
    return {
        "logp": logp32,
        "clean_logp": clean_logp,
        "old": old32,
        "ref": ref32,
        "adv": adv.float(),
        "is_ratio": is_ratio.float(),
        "mask": mask,
        "shape": shape,
    }


def token_weight(loss_type: str, mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The caller's reduction weights (kernels/grpo_loss.py docstring), computed in fp64."""
    b, t = shape
    m = mask.to(F64).view(b, t)
    if loss_type in ("grpo", "sapo"):
        w = (1.0 / (b * m.sum(-1).clamp(min=1.0)))[:, None].expand(b, t)
    elif loss_type == "dr_grpo":
        w = torch.full((b, t), 1.0 / (b * t), dtype=F64)
    elif loss_type == "luspo":
        w = torch.full((b, t), 1.0 / b, dtype=F64)
    else:
        w = torch.full((b, t), 1.0 / float(m.sum().clamp(min=1.0)), dtype=F64)
    return w.reshape(-1).float()


def ref_options(opts: dict) -> dict:
    """The kernel options as ``grpo_loss_ref`` keywords (``use_pw``: the sampler correction is on)."""
    return {k: v for k, v in opts.items() if k != "use_pw"}


def vespo_phi_rows(batch: dict, use_old: bool, use_pw: bool) -> torch.Tensor:
    """``(N,)`` VESPO's ``φ`` of every row, from the reference (per-token advantages: per row)."""
    b, t = batch["shape"]
    mask = batch["mask"].to(F64).view(b, t)
    logp = batch["clean_logp"].to(F64).view(b, t)
    old = batch["old"].to(F64).view(b, t) if use_old else logp
    log_ratio = torch.where(mask != 0, logp - old, 0.0)
    v = batch["is_ratio"].to(F64).view(b, t) if use_pw else None
    adv = batch["adv"].to(F64).view(b, t)
    phi = vespo_weights_ref(log_ratio, mask, adv, v, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
    return phi.expand(b, t).reshape(-1)


def reference(batch: dict, opts: dict, use_old: bool, use_ref: bool):
    """fp64 reference on the whole batch: ``(loss, metrics, d loss / d logp)`` (autograd)."""
    b, t = batch["shape"]
    # Masked logp garbage would give the reference itself NaN (inf * 0); it contributes nothing,
    # so the reference sees finite values there. old/ref keep their garbage.
    logp = batch["clean_logp"].to(F64).view(b, t).requires_grad_(True)
    old = batch["old"].to(F64).view(b, t) if use_old else None
    ref = batch["ref"].to(F64).view(b, t) if use_ref else None
    mask = batch["mask"].to(F64).view(b, t)
    adv = batch["adv"].to(F64).view(b, t)
    v = batch["is_ratio"].to(F64).view(b, t) if opts.get("use_pw") else None
    loss, metrics = grpo_loss_ref(logp, old, ref, adv, mask, vllm_is_ratio=v, **ref_options(opts))
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), metrics, grad.reshape(-1)


def token_reference(batch: dict, opts: dict, use_old: bool, use_ref: bool) -> dict:
    """fp64 reference per token: every token is its own (1, 1) batch with mask 1 (``vmap``), so
    the reference's loss is that token's ``ℓ`` and its metrics are the token's ratio/flags/kl.

    VESPO's weight ``φ`` couples the tokens of a sequence; its token term is ``-φ A logp`` with the
    batch's ``φ`` (``vespo_phi_rows``), plus the KL part, taken from a zero-advantage token."""
    n = batch["logp"].numel()
    use_pw = bool(opts.get("use_pw"))
    vespo = opts["loss_type"] == "vespo"
    names = ["logp", "adv"] + (["is_ratio"] if use_pw else []) + (["old"] if use_old else [])
    names += ["ref"] if use_ref else []
    token_opts = {**ref_options(opts), "loss_type": "dapo"} if vespo else ref_options(opts)

    def one(logp, adv, *rest):
        extra = dict(zip(names[2:], rest))
        v = lambda x: None if x is None else x.view(1, 1)  # noqa: E731
        loss, met = grpo_loss_ref(
            v(logp),
            v(extra.get("old")),
            v(extra.get("ref")),
            v(adv * 0 if vespo else adv),
            torch.ones(1, 1, dtype=F64),
            max_completion_length=1,
            vllm_is_ratio=None if vespo else v(extra.get("is_ratio")),
            **token_opts,
        )
        aux = (
            met["ratio"],
            met["clip_ratio/low_mean"],
            met["clip_ratio/high_mean"],
            met["kl"] if use_ref else torch.zeros((), dtype=F64),
        )
        return loss, aux

    # Masked rows are evaluated on finite stand-ins (their expected terms are 0 anyway).
    active = batch["mask"] != 0
    clean = batch["clean_logp"]
    inputs = [clean if k == "logp" else torch.where(active, batch[k], clean) for k in names]
    grad, (loss, (ratio, low, high, kl)) = torch.func.vmap(torch.func.grad_and_value(one, has_aux=True))(
        *[x.to(F64).reshape(n) for x in inputs]
    )
    if vespo:  # the policy term -φ A logp (φ detached); vespo never clips
        phi = vespo_phi_rows(batch, use_old, use_pw)
        adv = batch["adv"].to(F64)
        loss = loss - phi * adv * clean.to(F64)
        grad = grad - phi * adv
        low, high = torch.zeros_like(low), torch.zeros_like(high)
    return {
        "loss": loss,
        "grad": grad,
        "ratio": ratio,
        "low": low != 0,
        "high": high != 0,
        "kl": kl if use_ref else None,
    }


def run_kernel(batch: dict, opts: dict, use_old: bool, use_ref: bool, compute_grad: bool = True) -> dict:
    d = lambda x: x.to(DEVICE)  # noqa: E731
    weight = token_weight(opts["loss_type"], batch["mask"], batch["shape"])
    policy_weight = batch["is_ratio"] if opts.get("use_pw") else None
    if opts["loss_type"] == "vespo":
        policy_weight = vespo_phi_rows(batch, use_old, bool(opts.get("use_pw"))).float()
    out = grpo_token_terms(
        d(batch["logp"]),
        d(batch["old"]) if use_old else None,
        d(batch["ref"]) if use_ref else None,
        d(batch["adv"]),
        d(batch["mask"]),
        d(weight),
        None if policy_weight is None else d(policy_weight),
        compute_grad=compute_grad,
        **{k: v for k, v in opts.items() if k != "use_pw"},
    )
    return {k: (None if v is None else v.cpu()) for k, v in out.items()}


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    """fp32 kernel vs fp64 reference: ``rtol`` per element, plus ``rtol / 10`` of the largest
    magnitude (cancellation between the surrogate and the KL term loses relative accuracy)."""
    expected = expected.detach().to(F64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(F64),
        expected,
        rtol=rtol,
        atol=0.1 * rtol * scale + 1e-30,
        equal_nan=False,
        msg=lambda m: f"{what}: {m}",
    )


def check_against_reference(
    n: int,
    loss_type: str,
    kl: str,
    beta: float,
    delta,
    use_old: bool,
    use_ref: bool,
    seed: int = 0,
    use_pw: bool = False,
    bias_correct: bool = False,
) -> None:
    batch = make_batch(*SHAPES[n], seed=seed)
    opts = dict(
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=eps_high(loss_type),
        delta=delta,
        beta=beta,
        kl_estimator=kl,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        use_bias_correction_kl=bias_correct,
        use_pw=use_pw,
    )
    out = run_kernel(batch, opts, use_old, use_ref)
    loss, metrics, grad = reference(batch, opts, use_old, use_ref)
    tok = token_reference(batch, opts, use_old, use_ref)
    mask = batch["mask"].to(F64)
    active = mask != 0
    wm = token_weight(loss_type, batch["mask"], batch["shape"]).to(F64) * mask

    for key in ("loss_terms", "dlogp", "ratio"):
        assert out[key].dtype == torch.float32 and out[key].shape == (n,), key
        assert torch.isfinite(out[key]).all(), key
    # Per token: w m ℓ and w m dℓ/dlogp.
    close(out["loss_terms"], wm * tok["loss"], "loss_terms")
    close(out["dlogp"], wm * tok["grad"], "dlogp per token")
    assert (out["loss_terms"][~active] == 0).all() and (out["dlogp"][~active] == 0).all()
    # The batch: the loss (summed by the caller; here in fp64 to isolate the kernel's error) and
    # the gradient autograd gives through the whole reference.
    terms = out["loss_terms"].to(F64)
    tol = 2e-6 * float(terms.abs().sum()) + 1e-30
    assert abs(float(terms.sum()) - float(loss)) <= tol, (float(terms.sum()), float(loss))
    close(out["dlogp"], grad, "dlogp")
    # Metrics per token (active rows), and the masked-row conventions.
    close(out["ratio"][active], tok["ratio"][active], "ratio")
    assert (out["ratio"][~active] == 1.0).all()
    if not use_old:
        assert (out["ratio"] == 1.0).all()
    assert out["clip_low"].dtype == torch.bool and out["clip_high"].dtype == torch.bool
    assert torch.equal(out["clip_low"], tok["low"] & active)
    assert torch.equal(out["clip_high"], tok["high"] & active)
    tokens = float(mask.sum().clamp(min=1.0))
    for name, flag in (
        ("low", out["clip_low"]),
        ("high", out["clip_high"]),
        ("region", out["clip_low"] | out["clip_high"]),
    ):
        expected = float(metrics[f"clip_ratio/{name}_mean"])
        assert abs(float((flag.to(F64) * mask).sum()) / tokens - expected) <= 1e-12
    assert abs(float((out["ratio"].to(F64) * mask).sum()) / tokens - float(metrics["ratio"])) <= 1e-6
    if use_ref:
        assert out["kl"].dtype == torch.float32 and (out["kl"][~active] == 0).all()
        close(out["kl"][active], tok["kl"][active], f"kl {kl}")
        kl_mean = float((out["kl"].to(F64) * mask).sum()) / tokens
        assert abs(kl_mean - float(metrics["kl"])) <= 1e-6 * max(1.0, abs(float(metrics["kl"])))
    else:
        assert out["kl"] is None and "kl" not in metrics


def _cases():
    for loss_type in LOSS_TYPES:
        for delta in (None, 2.0):
            for use_old in (False, True):
                yield loss_type, "k3", 0.0, delta, use_old, False
                for kl in KL_ESTIMATORS:
                    for beta in (0.0, 0.04):
                        yield loss_type, kl, beta, delta, use_old, True


def _case_id(case) -> str:
    loss_type, kl, beta, delta, use_old, use_ref = case
    ref = f"ref-{kl}-b{beta}" if use_ref else "noref"
    return f"{loss_type}-d{delta}-{'old' if use_old else 'noold'}-{ref}"


@pytest.mark.parametrize("case", list(_cases()), ids=_case_id)
def test_matches_reference_all_options(case) -> None:
    check_against_reference(333, *case)


@pytest.mark.parametrize(("use_pw", "bias_correct"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sampler_correction_and_corrected_kl(loss_type, use_pw, bias_correct) -> None:
    """The policy weight (vllm_is_ratio, or VESPO's φ with it folded in) and the importance-weighted KL."""
    for kl in KL_ESTIMATORS:
        check_against_reference(
            333, loss_type, kl, 0.04, 2.0, True, True, seed=11, use_pw=use_pw, bias_correct=bias_correct
        )


@pytest.mark.parametrize("n", [1, 7, 5000])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference_sizes(n: int, loss_type: str) -> None:
    check_against_reference(n, loss_type, "k3", 0.04, 2.0, True, True, seed=n)
    check_against_reference(n, loss_type, "k2", 0.0, None, False, False, seed=n + 1)


def test_region_gradients_by_hand() -> None:
    """One token per region/sign: the gradient autograd gives for the reference expression."""
    # ratio, advantage, expected d l / d logp (l = -min(r~ A, clip(r) A), clip [0.8, 1.28], delta 2)
    cases = [
        (1.0, 1.5, -1.5),  # inside, tie of both branches: -A r
        (1.1, -0.5, 0.5 * 1.1),  # inside, A < 0
        (0.5, 1.0, -0.5),  # below, A > 0: unclipped r A is the min -> -A r
        (0.5, -1.0, 0.0),  # below, A < 0: the clipped branch is the min and is clamped -> 0
        (1.5, 1.0, 0.0),  # above, A > 0: clipped branch active, clamped -> 0
        (1.5, -1.0, 1.5),  # above, A < 0: unclipped active -> -A r
        (3.0, -1.0, 0.0),  # above delta, A < 0: unclipped = delta active, clamped by delta -> 0
        (3.0, 1.0, 0.0),  # above delta, A > 0: clipped (1.28 A) < delta A -> clamped -> 0
        (1.0, 0.0, 0.0),  # zero advantage
    ]
    n = len(cases)
    logp = torch.full((n,), -1.0)
    old = logp - torch.tensor([math.log(c[0]) for c in cases])
    adv = torch.tensor([c[1] for c in cases])
    ones = torch.ones(n)
    out = grpo_token_terms(
        logp.to(DEVICE),
        old.to(DEVICE),
        None,
        adv.to(DEVICE),
        ones.to(DEVICE),
        ones.to(DEVICE),
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.28,
        delta=2.0,
        beta=0.0,
        kl_estimator="k3",
    )
    expected = torch.tensor([c[2] for c in cases], dtype=F64)
    close(out["dlogp"].cpu(), expected, "dlogp by hand", rtol=1e-6)
    # and autograd through the reference agrees
    lp = logp.to(F64).view(1, n).requires_grad_(True)
    loss, _ = grpo_loss_ref(
        lp,
        old.to(F64).view(1, n),
        None,
        adv.to(F64).view(1, n),
        ones.view(1, n),
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.28,
        delta=2.0,
    )
    (g,) = torch.autograd.grad(loss * n, lp)
    close(g.reshape(-1), expected, "reference autograd by hand")


def test_compute_grad_false() -> None:
    batch = make_batch(*SHAPES[333])
    opts = dict(
        loss_type="dapo", epsilon_low=EPS_LOW, epsilon_high=0.28, delta=2.0, beta=0.04, kl_estimator="k3"
    )
    with_grad = run_kernel(batch, opts, True, True)
    without = run_kernel(batch, opts, True, True, compute_grad=False)
    assert without["dlogp"] is None
    for key in ("loss_terms", "ratio", "clip_low", "clip_high", "kl"):
        assert torch.equal(with_grad[key], without[key]), key


def test_deterministic() -> None:
    batch = make_batch(*SHAPES[5000], seed=3)
    opts = dict(
        loss_type="grpo", epsilon_low=EPS_LOW, epsilon_high=0.28, delta=2.0, beta=0.04, kl_estimator="k3"
    )
    first = run_kernel(batch, opts, True, True)
    second = run_kernel(batch, opts, True, True)
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_autograd_function(loss_type: str) -> None:
    batch = make_batch(*SHAPES[333], seed=5)
    opts = dict(
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=eps_high(loss_type),
        delta=2.0,
        beta=0.04,
        kl_estimator="k3",
    )
    weight = token_weight(loss_type, batch["mask"], batch["shape"]).to(DEVICE)
    logp = batch["logp"].to(DEVICE).requires_grad_(True)
    args = (
        batch["old"].to(DEVICE),
        batch["ref"].to(DEVICE),
        batch["adv"].to(DEVICE),
        batch["mask"].to(DEVICE),
        weight,
    )
    loss, terms, ratio, low, high, kl = TritonTokenGRPOLoss.apply(logp, *args, None, opts)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad
    assert not any(t.requires_grad for t in (terms, ratio, low, high, kl))
    assert torch.equal(loss.detach(), terms.sum())
    (3.0 * loss).backward()
    ref_loss, _, ref_grad = reference(batch, opts, True, True)
    close(logp.grad.cpu() / 3.0, ref_grad, "autograd grad")
    assert abs(float(loss.detach()) - float(ref_loss)) <= 2e-6 * float(terms.abs().sum())
    direct = run_kernel(batch, opts, True, True)
    assert torch.equal(logp.grad.cpu(), 3.0 * direct["dlogp"])

    # functional form, without ref (kl None), and no grad needed
    with torch.no_grad():
        out = triton_token_grpo_loss(
            batch["logp"].to(DEVICE),
            args[0],
            None,
            *args[2:],
            loss_type=loss_type,
            epsilon_low=EPS_LOW,
            epsilon_high=eps_high(loss_type),
            delta=None,
        )
    assert out[-1] is None and out[0].dim() == 0


def test_bad_input() -> None:
    n = 8
    x = torch.zeros(n, device=DEVICE)
    kw = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, delta=None, beta=0.0, kl_estimator="k3")
    with pytest.raises(ValueError, match="beta != 0"):
        grpo_token_terms(x, None, None, x, x, x, **{**kw, "beta": 0.1})
    with pytest.raises(ValueError, match="fp32"):
        grpo_token_terms(x.double(), None, None, x, x, x, **kw)
    with pytest.raises(ValueError, match="shape"):
        grpo_token_terms(x, x[:3], None, x, x, x, **kw)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_token_terms(x, None, None, x, x, x, **{**kw, "loss_type": "ppo"})
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_token_terms(x, None, x, x, x, x, **{**kw, "kl_estimator": "k4"})
    with pytest.raises(ValueError, match="policy_weight"):
        grpo_token_terms(x, None, None, x, x, x, **{**kw, "loss_type": "vespo"})
    with pytest.raises(ValueError, match="policy_weight"):
        grpo_token_terms(x, None, None, x, x, x, x[:3], **kw)
    empty = torch.zeros(0, device=DEVICE)
    out = grpo_token_terms(empty, None, None, empty, empty, empty, **kw)
    assert out["loss_terms"].shape == (0,) and float(out["loss_terms"].sum()) == 0.0
    bool_mask = torch.ones(n, dtype=torch.bool, device=DEVICE)
    out = grpo_token_terms(x, None, None, x + 1.0, bool_mask, x + 0.125, **kw)
    assert torch.equal(out["loss_terms"].cpu(), torch.full((n,), -0.125))


def test_aot_specs_cover_the_launcher(monkeypatch) -> None:
    """Every launch the launcher can make is one of aot_specs() (same constexprs and num_warps)."""
    from mgrpo_fast.kernels import grpo_loss as module

    specs = aot_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    known = {(tuple(sorted(s.constexprs.items())), s.num_warps) for s in specs}
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, num_warps, **constexprs):
                launched.append((tuple(sorted(constexprs.items())), num_warps))

            return launch

    monkeypatch.setattr(module, "_grpo_token_terms_kernel", Recorder())
    kw = dict(epsilon_low=0.2, epsilon_high=0.2)
    for n in (1, 5000, 100_000):
        x = torch.zeros(n, device=DEVICE)
        for loss_type in LOSS_TYPES:
            for delta in (None, 2.0):
                for old in (None, x):
                    for ref, kl, beta in [(None, "k3", 0.0)] + [
                        (x, k, b) for k in KL_ESTIMATORS for b in (0.0, 0.1)
                    ]:
                        for grad, pw in ((False, x), (True, None), (True, x)):
                            if pw is None and loss_type == "vespo":
                                continue  # refused: vespo needs its weight
                            grpo_token_terms(
                                x,
                                old,
                                ref,
                                x,
                                x,
                                x,
                                pw,
                                loss_type=loss_type,
                                delta=delta,
                                beta=beta,
                                kl_estimator=kl,
                                compute_grad=grad,
                                use_bias_correction_kl=grad,
                                **kw,
                            )
    assert launched and set(launched) <= known
