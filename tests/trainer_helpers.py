"""Reward functions and a tiny model/tokenizer for the trainer tests (loaded by path as
``tests/trainer_helpers.py:NAME``, so the reward workers can import them too)."""

from __future__ import annotations

import time


def parity_reward(completion: str, answer: str, **_: object) -> float:
    """1 when the completion has an even number of characters: a reward with variance for a random model."""
    return float(len(completion) % 2 == 0)


def hanging_reward(completion: str, answer: str, **_: object) -> float:
    """Hangs on every third completion length (a stuck verifier)."""
    if len(completion) % 3 == 0:
        time.sleep(3600)
    return 0.5


def raising_reward(completion: str, answer: str, **_: object) -> float:
    """Raises on odd lengths (a buggy user reward)."""
    if len(completion) % 2:
        raise RuntimeError("a buggy reward")
    return 1.0


def save_tiny_model(path, tokenizer, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    """A random Qwen2 sized for ``tokenizer``, saved with it to ``path`` (save_pretrained)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def digit_share_reward(completion: str, answer: str, **_: object) -> float:
    """The share of the completion's characters that are digits: about 0.1 for a random model over a
    character vocabulary, 1.0 for a completion of digits only (a trivially learnable reward)."""
    return sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0


def digit_share_of_long_reward(completion: str, answer: str, **_: object) -> float:
    """:func:`digit_share_reward` for completions longer than one character, 0 for the others: with
    one-token first answers every layer-1 group scores 0 (zero variance, dropped), so only layer 2 trains."""
    return digit_share_reward(completion, answer) if len(completion) > 1 else 0.0
