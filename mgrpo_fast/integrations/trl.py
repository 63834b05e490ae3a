"""TRL drop-in: ``FusedGRPOTrainer``, TRL's ``GRPOTrainer`` with the loss of ``fused_linear_grpo_loss``.

Swap one import::

    from mgrpo_fast.integrations.trl import FusedGRPOTrainer as GRPOTrainer

Everything else stays TRL's (generation, rewards, advantages with ``scale_rewards``, reference and old
log-probs, batching over ``steps_per_generation`` / ``num_iterations``, logging, checkpoints). Only the
loss changes: the policy runs its backbone, and the loss is computed from the last hidden states of the
completion tokens and ``lm_head.weight`` by ``fused_linear_grpo_loss``, so the ``[tokens x vocab]``
logits are never built (TRL >= 1.15 computes per-token log-probs with its own chunked head and then
the loss in plain torch; earlier releases build the logits). ``GRPOConfig`` fields keep their TRL
meaning; the metrics keep TRL's names. Numerics: the logits stay fp32 here; under bf16 autocast
(``GRPOConfig``'s default ``bf16=True``) TRL's head rounds its logits tiles to bf16, so the two agree
to bf16 rounding there, and to fp32 rounding in fp32.

The exact loss TRL computes, and what this module passes (``S = Σ_{t in mask} ℓ_t``, ``M`` = mask
sum of this micro-batch, ``B`` its sequences, ``G`` = ``current_gradient_accumulation_steps`` in
training and 1 in eval, ``K`` = ``steps_per_generation`` in training and 1 in eval, ``P`` =
``num_processes``, ``N`` = ``num_items_in_batch``, the mask sum of the whole generation batch over all
processes):

* ``grpo``:    TRL ``(1/B) Σ_i S_i / max(1, M_i) / G``  = fused ``grpo`` loss ``/ G``;
* ``bnpo``:    TRL ``S / max(1, M) / G``                = fused ``bnpo`` loss ``/ G``;
* ``dr_grpo``: TRL ``S / (B · max_completion_length) / G`` = fused ``dr_grpo`` loss (with
  ``max_completion_length``) ``/ G``;
* ``dapo``, ``cispo``: TRL ``S / (max(1, N) / P · G / K)``; the fused loss is ``S / max(1, M)``, so
  it is multiplied by ``max(1, M) / (max(1, N) / P · G / K)``. Summed over the ``K`` micro-batches of a
  generation batch and the ``P`` processes (gradients are averaged over processes), each token
  weighs ``1 / N`` per optimizer step when ``G = K``: the token mean of the whole generation batch.

TRL's multiplicative corrections of the policy term (vLLM importance-sampling ratio
``vllm_importance_sampling_correction``, the off-policy sequence mask ``off_policy_mask_threshold``
and the high-entropy token mask ``top_entropy_quantile``) are non-negative and carry no gradient, so
they are folded into per-token advantages: ``-min(r A, clip(r) A) · w = -min(r (A w), clip(r) (A w))``
for ``w >= 0`` (and ``cispo``'s ``-sg(min(r, ε)) A logp · w`` is linear in ``A``); the KL term is not
multiplied, as in TRL. The clip metrics are computed from the original advantages.

With ``beta != 0`` and ``use_bias_correction_kl=True`` (TRL's default) the KL term is ``r · k3``,
differentiated through the importance weight ``r``; the one-pass kernel has no such term, so that
configuration takes two stages, still without logits: ``linear_logprobs`` (differentiable, chunked)
then ``grpo_loss`` plus the corrected KL. Every other configuration runs ``fused_linear_grpo_loss``.

Fields and features the fused loss cannot honor raise ``ValueError`` at construction, naming the field:
``loss_type`` in ``sapo | luspo | vespo``, the entropy bonus
(``entropy_coef != 0`` or ``use_adaptive_entropy``), the MoE router auxiliary loss
(``router_aux_loss_coef != 0`` on an MoE model), ``dr_grpo`` without ``max_completion_length``, models
with ``final_logit_softcapping`` or a non-positive logit scale, and DeepSpeed ZeRO-3.

Supported TRL: ``>= 1.10, < 1.17`` (``_compute_loss`` is unchanged from 1.10 to 1.16; the tests pass
with 1.10.0, 1.11.0, 1.12.0, 1.13.0, 1.14.2, 1.15.0 and 1.16.0). Another version raises ``ImportError``
at import; ``MGRPO_FAST_TRL_UNCHECKED=1`` skips the check.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import types
from contextlib import nullcontext
from typing import Any

import torch

from mgrpo_fast.ops.dispatch import IMPLS
from mgrpo_fast.ops.logprobs import linear_logprobs
from mgrpo_fast.ops.loss import fused_linear_grpo_loss, grpo_loss
from mgrpo_fast.ops.options import LOSS_TYPES, LossOptions
from mgrpo_fast.ops.validation import check_choice

TRL_MIN_VERSION = (1, 10)
TRL_MAX_VERSION = (1, 16)  # inclusive: every 1.16.x release
SUPPORTED_TRL = ">=1.10,<1.17"
UNCHECKED_ENV = "MGRPO_FAST_TRL_UNCHECKED"
SUPPORTED_LOSS_TYPES = LOSS_TYPES
# Inputs of vision-language batches that TRL's `_compute_loss` hands to the model as they are.
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def check_trl_version(version: str) -> None:
    """Raise ``ImportError`` unless ``version`` is a supported TRL release (``SUPPORTED_TRL``)."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release[:2]
    except InvalidVersion as exc:
        raise ImportError(f"mgrpo_fast.integrations.trl: cannot parse the TRL version {version!r}") from exc
    if not TRL_MIN_VERSION <= release <= TRL_MAX_VERSION:
        raise ImportError(
            f"mgrpo_fast.integrations.trl supports trl{SUPPORTED_TRL} (it overrides GRPOTrainer's loss, "
            f"whose internals change between releases), but trl {version} is installed. Install a supported "
            f"release (pip install 'trl{SUPPORTED_TRL}'), or set {UNCHECKED_ENV}=1 to skip this check at "
            "your own risk."
        )


try:
    import trl
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        f"mgrpo_fast.integrations.trl needs TRL: pip install 'trl{SUPPORTED_TRL}' ({exc})"
    ) from exc

if not os.environ.get(UNCHECKED_ENV):
    check_trl_version(trl.__version__)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanmax, nanmin  # noqa: E402

try:
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError:  # pragma: no cover - present in every supported release

    def maybe_gather_lm_head_ctx(*params):
        return nullcontext()


__all__ = [
    "FusedGRPOTrainer",
    "SUPPORTED_TRL",
    "check_trl_version",
    "loss_options_of",
    "trl_loss_options",
    "unsupported_config_fields",
]


def loss_options_of(args: GRPOConfig) -> LossOptions:
    """The ``LossOptions`` a ``GRPOConfig`` means, read as ``GRPOTrainer`` reads it (``epsilon_low =
    epsilon``; ``epsilon_high`` defaults to ``epsilon``; see :func:`trl_loss_options`). Raises
    ``ValueError`` naming the option where ``LossOptions`` rejects a value."""
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    return trl_loss_options(
        args.loss_type,
        args.epsilon,
        epsilon_high,
        args.delta,
        args.beta,
        args.importance_sampling_level,
        args.max_completion_length,
    )


def trl_loss_options(
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    importance_sampling_level: str,
    max_completion_length: int | None,
) -> LossOptions:
    """TRL's loss settings (the ``GRPOTrainer`` attributes of the same names, ``delta`` from its args)
    as the ``LossOptions`` that computes TRL's loss: ``cispo`` has no dual clip (TRL ignores ``delta``
    there), ``max_completion_length`` normalizes ``dr_grpo`` only (elsewhere it is a generation
    length), and the KL estimator is TRL's ``k3``."""
    return LossOptions(
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=None if loss_type == "cispo" else delta,
        beta=beta,
        kl_estimator="k3",
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length if loss_type == "dr_grpo" else None,
    )


def unsupported_config_fields(args: GRPOConfig) -> list[str]:
    """One message per ``GRPOConfig`` field (value) the fused loss cannot honor; empty when all can."""
    problems = []
    loss_type = args.loss_type
    if loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(
            f"loss_type={loss_type!r}: the fused loss implements {SUPPORTED_LOSS_TYPES}; use trl.GRPOTrainer "
            "for the others"
        )
    if getattr(args, "entropy_coef", 0.0) != 0.0 or getattr(args, "use_adaptive_entropy", False):
        problems.append(
            f"entropy_coef={getattr(args, 'entropy_coef', 0.0)!r} / use_adaptive_entropy="
            f"{getattr(args, 'use_adaptive_entropy', False)!r}: the entropy bonus needs the gradient of the "
            "entropy, which the fused loss does not compute; set entropy_coef=0.0 and "
            "use_adaptive_entropy=False"
        )
    if loss_type == "dr_grpo" and args.max_completion_length is None:
        problems.append(
            "max_completion_length=None: loss_type='dr_grpo' normalizes by B * max_completion_length"
        )
    if loss_type in SUPPORTED_LOSS_TYPES:
        try:
            loss_options_of(args)
        except ValueError as exc:  # names the option (epsilon_low = GRPOConfig.epsilon)
            problems.append(str(exc).replace("epsilon_low:", "epsilon (epsilon_low):", 1))
    return problems


def _logit_scale(model: torch.nn.Module) -> float:
    """The factor the model multiplies its logits by (1.0 for most); rejects soft-capped logits.

    Read from the config as TRL's fused head does (``logit_scale``, ``output_multiplier``,
    ``lm_head_multiplier``, ``1 / logits_scaling``); folded into the temperature: ``z = s·hW / T =
    hW / (T / s)``.
    """
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"model.config.final_logit_softcapping={softcap!r}: soft-capped logits are not supported by the "
            "fused loss; use trl.GRPOTrainer for this model"
        )
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1.0 / config.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0.0:
        raise ValueError(
            f"model.config logit scale {scale!r}: the fused loss folds the logit scale into the temperature, "
            "which needs a positive scale; use trl.GRPOTrainer for this model"
        )
    return scale


def _backbone_attr(model: torch.nn.Module) -> str:
    """Where the backbone (the model without its lm_head) lives, as in TRL's fused head."""
    import transformers
    from packaging.version import Version

    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version(
        "5"
    ):
        return "model"
    return "base_model"


def _install_fused_forward(model: torch.nn.Module) -> None:
    """Let ``model(..., mgrpo_fast_loss=fn)`` run the backbone and return ``fn(last_hidden, lm_head)``.

    The loss runs inside the model's forward, so DDP/FSDP wrappers see one forward as usual (and
    FSDP2 gathers the head there). Without ``mgrpo_fast_loss`` the previous forward runs unchanged
    (generation, TRL's own log-prob passes for the old and reference policies).
    """
    if getattr(model, "_mgrpo_fast_forward", False):
        return
    previous = model.forward
    backbone_attr = _backbone_attr(model)

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, mgrpo_fast_loss=None, **kwargs):
        if mgrpo_fast_loss is None:
            return previous(*args, **kwargs)
        for key in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        outputs = getattr(self, backbone_attr)(*args, **kwargs)
        return mgrpo_fast_loss(outputs.last_hidden_state, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)
    model._mgrpo_fast_forward = True


def _full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """FSDP2 shards parameters as DTensors; the fused loss needs the whole head."""
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


class FusedGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose loss is ``mgrpo_fast.fused_linear_grpo_loss`` (no logits built).

    Takes the arguments of ``trl.GRPOTrainer``, plus:

    Args:
        fused_impl: ``"auto" | "torch" | "triton"``: implementation of the fused loss (``auto``: the
            Triton kernels for CUDA tensors, the chunked torch path otherwise).
        fused_chunk_size: rows per logits block of the torch path (None: about 64 M logits).

    ``GRPOConfig`` fields used by the loss, with TRL's meaning: ``loss_type`` (grpo, bnpo, dr_grpo,
    dapo, cispo), ``epsilon``, ``epsilon_high``, ``delta``, ``beta`` (k3 KL to the reference, whose
    log-probs TRL computes), ``temperature``, ``importance_sampling_level``, ``max_completion_length``
    (``dr_grpo``'s normalizer), ``num_iterations`` / ``steps_per_generation`` (TRL provides the old
    log-probs when they differ from the current ones; the ratio is exactly 1 otherwise),
    ``cast_lm_head_to_fp32``, ``top_entropy_quantile``, ``off_policy_mask_threshold``,
    ``use_vllm`` + ``vllm_importance_sampling_correction``. ``scale_rewards`` acts on the advantages,
    which TRL computes before the loss, unchanged.

    Logged metrics, with TRL's names and formulas: ``kl`` (when ``beta != 0``), ``entropy``,
    ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``, ``clip_ratio/high_max``,
    ``clip_ratio/region_mean`` (``cispo``: ``cispo_clip_ratio``). When old log-probs exist (or a
    mask needs the current log-probs / entropies), one extra forward-only pass of the fused head over
    the loss tokens provides the per-token values (``2·N·H·V`` flops, a third of the loss's).
    """

    def __init__(
        self, *args: Any, fused_impl: str = "auto", fused_chunk_size: int | None = None, **kwargs: Any
    ):
        check_choice("fused_impl", fused_impl, IMPLS)
        if fused_chunk_size is not None and not (isinstance(fused_chunk_size, int) and fused_chunk_size > 0):
            raise ValueError(f"fused_chunk_size: expected None or a positive int, got {fused_chunk_size!r}")
        bound = inspect.signature(GRPOTrainer.__init__).bind_partial(None, *args, **kwargs).arguments
        config = bound.get("args")
        if config is not None:  # fail before loading models and datasets
            self._raise_unsupported(config)
        super().__init__(*args, **kwargs)
        self._raise_unsupported(self.args)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"router_aux_loss_coef={self.router_aux_loss_coef!r}: the MoE load-balancing loss is not "
                "computed by the fused path; set GRPOConfig(router_aux_loss_coef=0.0)"
            )
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "DeepSpeed ZeRO-3: the fused loss re-reads lm_head.weight in its backward, after ZeRO-3 has "
                "re-partitioned it; use ZeRO-2 or FSDP2"
            )
        from accelerate.utils import is_peft_model

        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._mgrpo_logit_scale = _logit_scale(base)
        self._fused_impl = fused_impl
        self._fused_chunk_size = fused_chunk_size
        _install_fused_forward(base)

    @staticmethod
    def _raise_unsupported(config: GRPOConfig) -> None:
        problems = unsupported_config_fields(config)
        if problems:
            raise ValueError(
                "FusedGRPOTrainer cannot honor these GRPOConfig fields:\n  - " + "\n  - ".join(problems)
            )

    # ------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        return self._compute_loss(model, inputs)

    def _compute_loss(self, model, inputs):
        """TRL's ``_compute_loss`` with the fused loss: same inputs, same value, same metrics."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        extra = {key: inputs[key] for key in _MULTIMODAL_KEYS if inputs.get(key) is not None}

        loss_fn = functools.partial(self._fused_policy_loss, inputs=inputs, mask=mask)
        with self.accelerator.autocast():
            loss, logp, metrics = model(
                input_ids=input_ids, attention_mask=attention_mask, **extra, mgrpo_fast_loss=loss_fn
            )
        mask = mask.to(loss.device)
        count = mask.sum().float()

        # Normalizers: see the module docstring. The fused loss is normalized within this call.
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type in ("grpo", "bnpo", "dr_grpo"):
            loss = loss / accumulation
        else:  # dapo, cispo: TRL divides the masked sum by the tokens of one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = (
                    normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
                )
            loss = loss * count.clamp(min=1.0) / normalizer.to(loss.device)

        self._log_fused_metrics(mode, inputs, mask, count, logp, metrics)
        return loss

    def _fused_policy_loss(self, last_hidden, lm_head, *, inputs, mask):
        """Runs inside the model's forward: ``(loss, logp or None, metrics)`` of this micro-batch."""
        completion_ids = inputs["completion_ids"]
        width = completion_ids.size(1)
        weight, bias = _full_tensor(lm_head.weight), _full_tensor(lm_head.bias)
        device = weight.device
        # Position p predicts token p + 1: the completion tokens are predicted by the positions
        # just before them (TRL: hidden[:, :-1] against labels[:, 1:], last `width` columns).
        hidden = last_hidden[:, -width - 1 : -1].to(device)
        if getattr(self.args, "cast_lm_head_to_fp32", False):
            hidden = hidden.float()
        elif torch.is_autocast_enabled(device.type):
            # The GEMM operands take the autocast dtype, as TRL's head does; the logits stay fp32 here
            # (TRL's head rounds each logits tile to that dtype), and autograd casts the weight
            # gradient back to the parameter's dtype.
            dtype = torch.get_autocast_dtype(device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with (
            torch.autocast(device.type, enabled=False),
            maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias),
        ):
            return self._fused_loss_on_head(
                hidden, weight, bias, completion_ids.to(device), mask.to(device), inputs
            )

    def _fused_loss_on_head(self, hidden, weight, bias, targets, mask, inputs):
        device = hidden.device
        temperature = self.temperature / self._mgrpo_logit_scale
        advantages = inputs["advantages"].to(device)
        adv2d = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        old = None if old is None else old.to(device)
        ref = inputs["ref_per_token_logps"].to(device) if self.beta != 0.0 else None
        opsm = self.off_policy_mask_threshold is not None
        has_sampling = "sampling_per_token_logps" in inputs
        # TRL's default with beta != 0: the KL term is multiplied by the (differentiable) ratio. The
        # one-pass kernel has no such term, so the log-probs are taken first (still without logits).
        two_stage = self.beta != 0.0 and getattr(self.args, "use_bias_correction_kl", False)
        need_logp = old is not None or (opsm and has_sampling)
        need_entropy = self.top_entropy_quantile < 1.0
        head = dict(
            bias=bias, temperature=temperature, chunk_size=self._fused_chunk_size, impl=self._fused_impl
        )

        logp = entropy = logp_grad = None
        if two_stage or need_logp or need_entropy:
            rows = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
            scatter = lambda x: x.new_zeros(mask.numel()).index_copy(0, rows, x).view(mask.shape)  # noqa: E731
            if two_stage:  # differentiable log-probs: they carry the loss
                lp_rows, ent_rows = linear_logprobs(
                    hidden, weight, targets, return_entropy=True, row_index=rows, **head
                )
                logp_grad = scatter(lp_rows)
                logp, entropy = logp_grad.detach(), scatter(ent_rows.detach())
            else:  # per-token values of the current policy for masks and metrics, no gradient
                with torch.no_grad():
                    detached = dict(head, bias=None if bias is None else bias.detach())
                    out = linear_logprobs(
                        hidden.detach(),
                        weight.detach(),
                        targets,
                        return_entropy=need_entropy,
                        row_index=rows,
                        **detached,
                    )
                lp_rows, ent_rows = out if need_entropy else (out, None)
                logp = scatter(lp_rows)
                entropy = None if ent_rows is None else scatter(ent_rows)

        # Non-negative, gradient-free factors of the policy term, folded into the advantages.
        factor = None

        def fold(w: torch.Tensor) -> None:
            nonlocal factor
            w = w.to(device=device, dtype=adv2d.dtype)
            factor = w if factor is None else factor * w

        if opsm:
            current = logp if logp is not None else torch.zeros(mask.shape, device=device)
            sampling = inputs.get("sampling_per_token_logps", old if old is not None else current)
            fold(
                self.get_off_policy_mask(
                    advantages=adv2d,
                    per_token_logps=current,
                    sampling_per_token_logps=sampling.to(device),
                    mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold,
                )
            )
        if need_entropy:
            fold(self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            fold(inputs["importance_sampling_ratio"])
        loss_advantages = advantages if factor is None else (adv2d * factor).expand(mask.shape)

        # TRL's loss reads these attributes at every call (a callback may change them between steps).
        options = trl_loss_options(
            self.loss_type,
            self.epsilon_low,
            self.epsilon_high,
            self.args.delta,
            self.beta,
            self.importance_sampling_level,
            self.max_completion_length,
        )
        if not two_stage:
            loss, metrics = fused_linear_grpo_loss(
                hidden,
                weight,
                targets,
                loss_advantages,
                mask,
                old_logp=old,
                ref_logp=ref,
                options=options,
                **head,
            )
            return loss, logp, metrics

        # The policy term here, the bias-corrected KL below.
        policy_options = dataclasses.replace(options, beta=0.0)
        loss, metrics = grpo_loss(
            logp_grad,
            old,
            None,
            loss_advantages,
            mask,
            entropy=entropy,
            impl=self._fused_impl,
            options=policy_options,
        )
        kl = self._bias_corrected_kl(logp_grad, old, ref, mask)
        loss = loss + self.beta * self._reduce(kl, mask)
        m = mask.to(kl.dtype)
        metrics["kl"] = (kl.detach() * m).sum() / m.sum().clamp(min=1.0)
        return loss, logp, metrics

    def _bias_corrected_kl(self, logp, old, ref, mask):
        """TRL's ``use_bias_correction_kl``: ``r · k3(ref - logp)``, ``r`` the (differentiable)
        importance weight of ``importance_sampling_level`` (exactly 1 in value without old log-probs)."""
        m = mask.to(logp.dtype)
        old = logp.detach() if old is None else old
        log_ratio = torch.where(mask != 0, logp - old, 0.0)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        x = torch.where(mask != 0, ref - logp, 0.0)
        return torch.exp(log_ratio) * (torch.exp(x) - x - 1.0)

    def _reduce(self, per_token, mask):
        """The loss type's reduction of a ``(B, T)`` per-token term over this micro-batch (TRL's)."""
        m = mask.to(per_token.dtype)
        masked = torch.where(mask != 0, per_token, 0.0)
        if self.loss_type == "grpo":
            return (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        if self.loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length)
        return masked.sum() / m.sum().clamp(min=1.0)

    # ------------------------------------------------------------------------------------------
    # metrics (TRL's names and formulas)
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _log_fused_metrics(self, mode, inputs, mask, count, logp, metrics):
        device = mask.device
        advantages = inputs["advantages"].to(device)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)

        def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> float:
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def global_masked_mean(x: torch.Tensor) -> float:
            if x.shape[1] == 1:  # sequence-level: one value per sequence
                return global_mean(x.sum(), torch.tensor(float(x.shape[0]), device=device))
            return global_mean((x * mask).sum(), mask.sum().float())

        def masked_seq_mean(x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        # Token means of the fused metrics, back to sums: mean * max(1, M) (0 when M = 0).
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(
                global_mean(metrics["kl"].to(device) * count.clamp(min=1.0), count)
            )
        self._metrics[mode]["entropy"].append(
            global_mean(metrics["entropy"].to(device) * count.clamp(min=1.0), count)
        )

        # The importance ratio as TRL forms it: exactly 1 without old log-probs.
        m = mask.to(torch.float32)
        if logp is None or inputs.get("old_per_token_logps") is None:
            log_ratio = torch.zeros(mask.shape, device=device)
        else:
            old = inputs["old_per_token_logps"].to(device)
            log_ratio = torch.where(mask != 0, logp - old, 0.0)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)

        if self.loss_type == "cispo":
            clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        if self.args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=self.args.delta)
        is_low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
        is_high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
        is_region = ((is_low + is_high) > 0).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(is_low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(is_high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(is_region))
        low_min = nanmin(self.accelerator.gather(masked_seq_mean(is_low)))
        self._metrics[mode]["clip_ratio/low_min"].append(low_min.item())
        high_max = nanmax(self.accelerator.gather(masked_seq_mean(is_high)))
        self._metrics[mode]["clip_ratio/high_max"].append(high_max.item())
