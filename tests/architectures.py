"""The architecture matrix: tiny random-initialized configs of the model families users bring.

Every entry is small (2-3 layers, hidden 64) and built locally with ``from_config``, so CI downloads
nothing. Each one exercises something the packed path must get right:

* ``llama``: grouped-query attention (4 query heads, 2 KV heads), untied lm_head, several EOS ids
  (Llama 3 ends a turn with ``<|eot_id|>`` or ``<|end_of_text|>``);
* ``qwen2``: q/k/v projection biases, tied embeddings, a sliding window on the upper layers
  (``max_window_layers``);
* ``qwen3``: per-head q/k RMSNorm, an explicit ``head_dim`` different from ``hidden / heads``;
* ``mistral``: a sliding window shorter than the packed sequences;
* ``gemma``: tied embeddings scaled by ``sqrt(hidden)``, GeLU MLP, ``(1 + w)`` RMSNorm, multi-query
  attention (1 KV head);
* ``gemma3``: Gemma 3 text: interleaved sliding/full layers (``layer_types``), q/k norms,
  ``query_pre_attn_scalar`` attention scale, tied embeddings.

Used by ``tests/models/test_architectures.py``, ``tests/models/test_model_packed.py`` and
``tests/arch_update_worker.py`` (2 ranks), with the unpacked reference below.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mgrpo_fast.packing.microbatch import SequenceSpec

VOCAB = 97
_COMMON = dict(
    hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6,
)  # fmt: skip


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**kw, tie_word_embeddings=False)


def _qwen2(**kw):
    from transformers import Qwen2Config

    # layer 1 of 2 slides (Qwen2: layers >= max_window_layers use the window)
    return Qwen2Config(
        **{"sliding_window": 24, **kw}, tie_word_embeddings=True, use_sliding_window=True, max_window_layers=1
    )


def _qwen3(**kw):
    from transformers import Qwen3Config

    return Qwen3Config(**kw, head_dim=24, tie_word_embeddings=False)


def _mistral(**kw):
    from transformers import MistralConfig

    return MistralConfig(**{"sliding_window": 40, **kw}, tie_word_embeddings=False)


def _gemma(**kw):
    from transformers import GemmaConfig

    return GemmaConfig(**{**kw, "num_key_value_heads": 1}, head_dim=16, tie_word_embeddings=True)


def _gemma3(**kw):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **{"sliding_window": 24, **kw, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=16,
        tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip


ARCHITECTURES = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma": _gemma,
    "gemma3": _gemma3,
}


def make_config(name: str, vocab_size: int = VOCAB, **overrides):
    """The transformers config of architecture ``name`` (a key of :data:`ARCHITECTURES`)."""
    return ARCHITECTURES[name](**{**_COMMON, "vocab_size": vocab_size, **overrides})


SLIDING = ("qwen2", "mistral", "gemma3")
"""The architectures with a sliding window (``make_config(name, sliding_window=W)`` sets it)."""


def save_random_model(
    config, path: str | Path, *, tokenizer=None, seed: int = 1234, scale: float = 3.0
) -> str:
    """A random model of ``config`` written with ``save_pretrained`` to ``path`` (with ``tokenizer``).

    The weight matrices are scaled by ``scale`` and the norms perturbed, so the tiny init's
    near-uniform logits become peaked enough for a mistake in the attention to show."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale) if p.ndim == 2 else p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def save_architecture(name: str, path: str | Path, *, tokenizer=None, **overrides) -> str:
    """:func:`save_random_model` of architecture ``name``, sized to ``tokenizer`` when given;
    ``overrides`` go to the config."""
    vocab = VOCAB if tokenizer is None else len(tokenizer)
    return save_random_model(make_config(name, vocab, **overrides), path, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------
# The unpacked reference: each sequence alone through the stock transformers model
# --------------------------------------------------------------------------------------------
# 13 sequences, total lengths 1..300: (prompt length, completion length, loss mask kind)
SHAPES = [
    (1, 0, "all"), (1, 1, "all"), (3, 4, "random"), (16, 1, "none"), (5, 28, "prefix"), (40, 24, "all"),
    (7, 83, "random"), (60, 68, "all"), (33, 117, "prefix"), (12, 187, "random"), (90, 150, "all"),
    (100, 171, "random"), (44, 256, "all"),
]  # fmt: skip


def make_sequences(seed: int = 0) -> list[SequenceSpec]:
    """The 13 sequences of :data:`SHAPES` with random ids below :data:`VOCAB` and their loss masks."""
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


def load_reference(path):
    """The stock transformers model (sdpa), fp32, same weights."""
    from transformers import AutoModelForCausalLM

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
