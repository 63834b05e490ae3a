"""Building a run's parts from its config: the policy and reference models, the tokenizer, the rollout
backend and its sampling parameters, and the prompt budget that decides which problems fit the
model's context. :class:`mgrpo_fast.rl.trainer.MGRPOTrainer` calls these once, at start-up.
"""

from __future__ import annotations

from typing import Any

import torch

from mgrpo_fast.config.run import TrainConfig
from mgrpo_fast.data.prompts import guiding_tail
from mgrpo_fast.data.train_data import default_model_path
from mgrpo_fast.rl.rollout.base import RolloutBackend, SamplingParams
from mgrpo_fast.rl.rollout.hf import HFGenerateBackend

__all__ = [
    "autocast_dtype",
    "load_model",
    "load_run_tokenizer",
    "make_rollout_backend",
    "prompt_token_limit",
    "sampling_params",
]

# ``model.dtype`` -> the dtype of the weights the optimizer updates (``auto``: fp32 master weights;
# bf16/fp16 compute then comes from ``parallel.mixed_precision`` on CUDA).
MASTER_DTYPES = {
    "auto": torch.float32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def load_model(
    cfg: TrainConfig, path: str | None, device: torch.device, frozen: bool = False
) -> torch.nn.Module:
    """The causal LM at ``path`` (default: the bundled model) with the run's dtype, attention and
    gradient checkpointing; ``frozen`` (the reference model): eval mode, no gradients, no checkpointing.
    ``model.gguf_file`` applies only when ``path`` is ``model.path``."""
    from mgrpo_fast.models.policy import load_policy

    m = cfg.model
    model = load_policy(
        path or default_model_path(),
        gguf_file=m.gguf_file if path == m.path else None,
        dtype=MASTER_DTYPES[m.dtype],
        device=device,
        attn_implementation=m.attn_implementation,
        liger_kernels=m.liger_kernels,
        gradient_checkpointing=m.gradient_checkpointing and not frozen,
    )
    if frozen:
        model.eval().requires_grad_(False)
    return model


def load_run_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer of ``model.tokenizer_path`` (default: the model's own, GGUF included)."""
    from mgrpo_fast.models.checkpoints import load_tokenizer

    m = cfg.model
    gguf_file = m.gguf_file if m.tokenizer_path == m.path else None
    return load_tokenizer(m.tokenizer_path or default_model_path(), gguf_file)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The compute dtype of ``parallel.mixed_precision`` on CUDA; None (no autocast) elsewhere."""
    mp = cfg.parallel.mixed_precision
    if device.type != "cuda" or mp == "no":
        return None
    return torch.float16 if mp == "fp16" else torch.bfloat16


def make_rollout_backend(
    cfg: TrainConfig, policy: torch.nn.Module, tokenizer: Any, device: torch.device, distributed: bool
) -> RolloutBackend:
    """The backend of ``rollout.backend`` (resolved by the config to ``vllm`` or ``hf``)."""
    r = cfg.rollout
    if r.backend == "hf":
        return HFGenerateBackend(policy, tokenizer)
    from mgrpo_fast.rl.rollout.vllm import VLLMBackend

    return VLLMBackend(
        policy,
        tokenizer,
        device=device,
        kv_cache_gib=r.vllm_kv_cache_gib,
        gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        block_size=r.vllm_block_size,
        max_num_seqs=r.vllm_max_num_seqs,
        seed=r.seed,
        sleep_mode=r.vllm_sleep_mode,
        distributed=distributed,
    )


def sampling_params(cfg: TrainConfig, max_new_tokens: int) -> SamplingParams:
    """The sampling parameters of one layer's rollout (``max_new_tokens``: T1 or T2)."""
    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=max_new_tokens,
        stop=r.stop,
        batch_size=r.batch_size,
        # the sampler's log-probs: the mismatch metrics (vllm) and the TIS correction need them
        return_logprobs=r.return_logprobs or r.backend == "vllm" or r.is_correction != "none",
    )


def prompt_token_limit(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any) -> int | None:
    """The longest layer-1 prompt (tokens) that fits: ``data.max_prompt_tokens`` and, when the model
    states its context, the room left by T1 and, for MGRPO, by the first answer, the longest guiding
    phrase (with the chat template's turn markers when it is a user turn) and T2. None: no limit."""
    limit = cfg.data.max_prompt_tokens
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not context:
        return limit
    room = context - cfg.rollout.max_new_tokens
    if cfg.algo == "mgrpo":
        d, l2 = cfg.data, cfg.layer2
        turn = dict(
            system_prompt=d.system_prompt,
            template=d.template,
            instruction=d.instruction,
            separator=l2.separator,
            guiding_turn=l2.guiding_turn,
        )
        tails = (guiding_tail("q", p, tokenizer, **turn) for p in l2.guiding_phrases)
        phrase = max(len(tokenizer.encode(t, add_special_tokens=False)) for t in tails)
        room -= cfg.rollout.max_new_tokens + phrase + l2.max_new_tokens
    return room if limit is None else min(limit, room)
