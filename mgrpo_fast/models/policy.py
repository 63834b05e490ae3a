"""The policy model: any transformers causal LM, run on packed micro-batches.

``load_policy`` loads a causal LM from a local checkpoint (a ``save_pretrained`` directory, sharded or
not, or a GGUF file dequantized to the training dtype: ``mgrpo_fast.models.checkpoints``) with
``attn_implementation="mgrpo_packed"``
(``mgrpo_fast.models.attention``). ``packed_hidden_states`` runs the decoder (``model.model``, without
``lm_head``) on the flat token rows of a ``PackedMicroBatch`` and returns the final (normed) hidden
states ``(T, H)``; ``packed_logprobs`` turns the rows that predict a loss token into log-probs with
``linear_logprobs`` on ``lm_head.weight``, so the ``(T, V)`` logits never exist.

The packing reaches every attention layer as the keyword arguments ``cu_seq_lens_q``,
``cu_seq_lens_k``, ``max_length_q``, ``max_length_k`` (transformers' FlashAttention names) plus
``position_ids`` restarting at 0 per sequence (RoPE), always with ``use_cache=False``. The same
call is exact with ``"sdpa"``/``"eager"`` (transformers then builds a block-diagonal mask from
``position_ids``) and with ``"flash_attention_2"``.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import TYPE_CHECKING

import torch

from mgrpo_fast.models import attention as _attention  # registers "mgrpo_packed" in transformers
from mgrpo_fast.models.checkpoints import resolve_checkpoint
from mgrpo_fast.ops.logprobs import linear_logprobs
from mgrpo_fast.ops.validation import check_index_range
from mgrpo_fast.packing.microbatch import PackedMicroBatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = _attention.ATTN_IMPLEMENTATION

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip

# Config attributes of architectures whose logits are not ``hidden @ lm_head.weight.T (+ bias)``;
# computing their log-probs from lm_head.weight alone would be silently wrong.
_LOGIT_MODIFIERS = {
    "final_logit_softcapping": None,  # gemma2/3: tanh softcap of the logits
    "logit_scale": 1.0,  # cohere: logits * logit_scale
    "logits_scaling": 1.0,  # granite: logits / logits_scaling
}


LIGER_MISSING = (
    "liger_kernels=True (model.liger_kernels) needs the liger-kernel package: pip install liger-kernel; "
    "or set liger_kernels=False"
)


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "mgrpo_fast.models.policy needs transformers: pip install 'mgrpo-fast[hf]' (or transformers>=5)"
        ) from exc
    return transformers


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype: expected a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _check_logits_are_linear(config) -> None:
    for name, neutral in _LOGIT_MODIFIERS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            raise NotImplementedError(
                f"{type(config).__name__} sets {name}={value!r}: its logits are not "
                "hidden @ lm_head.weight.T, so mgrpo_fast's fused log-probs would be wrong for it"
            )


def apply_liger_kernels(model: PreTrainedModel) -> bool:
    """Patch ``model`` with liger-kernel's fused RMSNorm, SwiGLU and RoPE (never its lm_head / loss).

    Returns whether the architecture was patched (``False``, with a warning, for model types
    liger-kernel does not cover). Raises ``ImportError`` when liger-kernel is not installed.
    Note: liger patches RoPE at module level, i.e. for every model of that type in the process.
    """
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise ImportError(LIGER_MISSING) from exc
    model_type = getattr(model.config, "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply_fn is None:
        logger.warning("liger_kernels: liger-kernel has no kernels for model type %r; unpatched", model_type)
        return False
    wanted = {
        "rope": True, "rms_norm": True, "swiglu": True,
        # our fused log-prob / GRPO loss replaces liger's lm_head + cross-entropy paths
        "cross_entropy": False, "fused_linear_cross_entropy": False,
    }  # fmt: skip
    params = inspect.signature(apply_fn).parameters
    apply_fn(model=model, **{k: v for k, v in wanted.items() if k in params})
    return True


def load_policy(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str,
    device: torch.device | str,
    attn_implementation: str = ATTN_IMPLEMENTATION,
    gradient_checkpointing: bool = False,
    liger_kernels: bool = False,
    attention_dropout: float | None = 0.0,
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM (Qwen2/2.5/3, Llama 3, Mistral, Gemma, ...; tied or untied lm_head) from a local
    checkpoint.

    Args:
        path: a directory written by ``save_pretrained`` (``config.json`` + weights, one file or
            sharded), a directory holding ``gguf_file``, or a ``.gguf`` file. Nothing is downloaded.
        dtype: parameter dtype (``torch.bfloat16``, ``"bf16"``, ``"float32"``, ...).
        device: where the model lives.
        attn_implementation: ``"mgrpo_packed"`` (default, packed varlen attention), or any
            transformers implementation (``"sdpa"``, ``"flash_attention_2"``, ``"eager"``).
        gradient_checkpointing: recompute each decoder layer in the backward (non-reentrant).
        liger_kernels: apply liger-kernel's fused RMSNorm/SwiGLU/RoPE (needs ``liger-kernel``).
        attention_dropout: overrides the config's attention dropout. 0 by default: GRPO's
            importance ratios compare log-probs of the same function, so training forwards must be
            deterministic. ``None`` keeps the checkpoint's value.
        gguf_file: the GGUF file in ``path`` (a name, or an absolute path); its weights are
            dequantized to ``dtype`` (needs the ``gguf`` package).

    Returns:
        The model, in training mode (gradient checkpointing only acts in training mode; with zero
        dropout, training and eval forwards are the same function).

    Raises:
        FileNotFoundError: ``path`` is not a directory with a ``config.json``, nor a GGUF checkpoint.
        ValueError: the config is not a causal-LM architecture.
        NotImplementedError: the architecture's logits are not ``hidden @ lm_head.weight.T``.
        ImportError: ``liger_kernels=True`` without liger-kernel installed, a GGUF file without gguf.
    """
    transformers = _import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path, gguf_file = resolve_checkpoint(path, gguf_file)
    dtype = _resolve_dtype(dtype)
    if liger_kernels:  # fail before the (possibly long) load
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            raise ImportError(LIGER_MISSING) from exc

    # A GGUF file is dequantized into dense weights of `dtype` (GgufConfig(dequantize=True)): without it
    # transformers keeps the model flagged as quantized, which it will neither train nor save.
    gguf = {} if gguf_file is None else {"gguf_file": gguf_file}
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **gguf)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"load_policy: {path!r} holds a {type(config).__name__} (model_type={config.model_type!r}), "
            "which is not a causal language model architecture (AutoModelForCausalLM cannot load it)"
        )
    _check_logits_are_linear(config)
    if attention_dropout is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = float(attention_dropout)
    config.use_cache = False

    if gguf_file is not None:
        gguf["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True,
        **gguf,
    )  # fmt: skip
    model.to(device)
    if model.get_output_embeddings() is None:
        raise ValueError(f"load_policy: {type(model).__name__} has no output embedding (lm_head)")
    if liger_kernels:
        apply_liger_kernels(model)
    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ValueError(f"load_policy: {type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def decoder_of(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack (embeddings -> layers -> final norm) of a causal LM, without ``lm_head``."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder (model.model / get_decoder())")
    return decoder


def tied_parameter_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names under which an already named parameter appears again: the ``lm_head.weight``
    of a model with tied embeddings (Gemma, Qwen2.5-0.5B, Llama 3.2 1B, SmolLM2, ...).

    ``save_pretrained`` drops them by itself, except when it is handed an explicit ``state_dict`` of
    gathered copies (the sharded engines' exports), where the tie is no longer visible; those drop
    these names so the export holds each weight once, as a one-process export does."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def packed_hidden_states(model: PreTrainedModel, batch: PackedMicroBatch) -> torch.Tensor:
    """Final hidden states ``(T, H)`` (after the final norm) of every packed token; no ``lm_head``.

    The micro-batch is moved to the model's device if needed. Raises ``ValueError`` for an empty
    batch, out-of-vocabulary token ids, or a sequence longer than ``config.max_position_embeddings``.
    """
    if not isinstance(batch, PackedMicroBatch):
        raise TypeError(f"batch: expected a PackedMicroBatch, got {type(batch).__name__}")
    if batch.num_tokens == 0:
        raise ValueError("batch: the micro-batch holds no tokens")
    config = model.config
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and batch.max_seqlen > max_pos:
        raise ValueError(
            f"batch: a packed sequence has {batch.max_seqlen} tokens, longer than the model's "
            f"max_position_embeddings={max_pos}; truncate or drop it before packing"
        )
    device = _model_device(model)
    if batch.input_ids.device != device:
        batch = batch.to(device)
    embeddings = model.get_input_embeddings()
    vocab = embeddings.num_embeddings if hasattr(embeddings, "num_embeddings") else config.vocab_size
    # An out-of-range id would be a device-side assert on CUDA (a crash that loses the run).
    check_index_range("batch.input_ids", batch.input_ids, vocab, "vocab size")
    decoder = decoder_of(model)
    out = decoder(
        input_ids=batch.input_ids[None],
        position_ids=batch.position_ids[None],
        use_cache=False,
        cu_seq_lens_q=batch.cu_seqlens,
        cu_seq_lens_k=batch.cu_seqlens,
        max_length_q=batch.max_seqlen,
        max_length_k=batch.max_seqlen,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0]


def lm_head_of(model: PreTrainedModel) -> torch.nn.Module:
    """The output projection (``lm_head``); checks the logits are ``hidden @ weight.T (+ bias)``."""
    _check_logits_are_linear(model.config)
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.ndim != 2:
        raise ValueError(f"{type(model).__name__}: expected an output embedding (lm_head), weight (V, H)")
    return head


def packed_logprobs(
    model: PreTrainedModel,
    batch: PackedMicroBatch,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``(L,)`` of the loss tokens of a packed micro-batch (``batch.loss_rows`` order).

    ``logp[i] = log softmax((h[r] @ W.T + b) / temperature)[input_ids[r + 1]]`` for
    ``r = batch.loss_rows[i]``, with ``h = packed_hidden_states(model, batch)`` and ``W, b`` the
    lm_head's weight and bias; computed by ``linear_logprobs`` (fp32 logits, never materialized).
    Returns ``(logp, entropy)`` with ``return_entropy``. Differentiable w.r.t. all parameters.
    """
    head = lm_head_of(model)
    hidden = packed_hidden_states(model, batch)
    ids = batch.input_ids.to(hidden.device)
    targets = torch.roll(ids, -1)  # row p predicts token p + 1 (the last row is never a loss row)
    rows = batch.loss_rows.to(hidden.device)
    return linear_logprobs(
        hidden, head.weight, targets, bias=getattr(head, "bias", None), temperature=temperature,
        return_entropy=return_entropy, row_index=rows, impl=impl,
    )  # fmt: skip
