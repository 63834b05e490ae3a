"""Shared helpers for the CPU test suite: seeding, layout converters, tolerances, hypothesis profile.

Layouts (see ``mgrpo_fast/loss.py``):

* padded: ``(B, T, ...)`` token tensors plus a ``(B, T)`` mask;
* packed: ``(N, ...)`` token rows plus ``cu_seqlens (S+1,)``; sequences may have length 0.

``padded_from_packed`` / ``packed_from_padded`` convert between the two so packed results of the
public API can be compared with the padded-only reference (``mgrpo_fast.reference``).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run under the interpreter on CPU tensors. Triton decides that
# when a kernel is decorated, so it is set here, before any test module imports mgrpo_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mgrpo_fast.ops.layout import cu_seqlens_from_lengths

# --------------------------------------------------------------------------------------------
# hypothesis: few examples and no deadline, so the whole suite stays fast and never flakes on a
# slow CI machine. `MGRPO_HYPOTHESIS_PROFILE=thorough pytest tests` explores more.
# --------------------------------------------------------------------------------------------
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("MGRPO_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state (torch and python), so failures reproduce."""
    torch.manual_seed(0)
    random.seed(0)


# --------------------------------------------------------------------------------------------
# Layout converters
# --------------------------------------------------------------------------------------------
def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    """``[0, 3, 3, 5]`` -> ``[3, 0, 2]``."""
    cu = cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def padded_from_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(N, ...)`` packed rows -> ``(S, T, ...)`` padded, ``T`` = the longest sequence.

    Positions past a sequence's end hold ``fill``. Differentiable (gradients of padded positions
    are dropped), so gradients of a padded computation map back onto the packed rows.
    """
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    width = max(lengths, default=0)
    rows = []
    for i, n in enumerate(lengths):
        start = int(cu_seqlens[i])
        seq = x[start : start + n]
        pad = x.new_full((width - n, *x.shape[1:]), fill)
        rows.append(torch.cat([seq, pad], dim=0))
    if not rows:
        return x.new_zeros((0, width, *x.shape[1:]))
    return torch.stack(rows, dim=0)


def packed_from_padded(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, ...)`` padded -> ``((N, ...) packed rows, cu_seqlens (B+1,) int32)``.

    Sequence ``b`` keeps its first ``lengths[b]`` positions (0 allowed); the rest is padding.
    """
    assert len(lengths) == x.shape[0] and max(lengths, default=0) <= x.shape[1]
    rows = [x[b, :n] for b, n in enumerate(lengths)]
    packed = torch.cat(rows, dim=0) if rows else x.new_zeros((0, *x.shape[2:]))
    return packed, cu_seqlens_from_lengths(lengths)


def valid_mask(lengths: list[int], width: int | None = None) -> torch.Tensor:
    """``(B, T)`` bool: True on the first ``lengths[b]`` positions of each row."""
    width = max(lengths, default=0) if width is None else width
    return torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]


# --------------------------------------------------------------------------------------------
# Random GRPO batches
# --------------------------------------------------------------------------------------------
def random_packed_batch(
    lengths: list[int],
    *,
    dtype: torch.dtype = torch.float64,
    per_token_adv: bool = False,
    empty_mask_seq: int | None = None,
    log_ratio_scale: float = 0.3,
) -> dict[str, torch.Tensor]:
    """Packed GRPO inputs: ``logp, old_logp, ref_logp, entropy, mask (N,)``, ``advantages``,
    ``cu_seqlens``. Each sequence masks out a random prompt-like prefix; ``empty_mask_seq`` gets
    an all-zero mask. Log-ratios are ~``log_ratio_scale`` so both clip sides are hit."""
    n = sum(lengths)
    logp = -torch.rand(n, dtype=torch.float64) * 3.0
    mask = torch.zeros(n)
    start = 0
    for i, length in enumerate(lengths):
        prefix = random.randint(0, max(length - 1, 0)) if length else 0
        if i != empty_mask_seq:
            mask[start + prefix : start + length] = 1.0
        start += length
    seqs = len(lengths)
    adv = torch.randn(n if per_token_adv else seqs, dtype=torch.float64)
    return {
        "logp": logp.to(dtype),
        "old_logp": (logp + log_ratio_scale * torch.randn(n, dtype=torch.float64)).to(dtype),
        "ref_logp": (logp + 0.5 * torch.randn(n, dtype=torch.float64)).to(dtype),
        "entropy": torch.rand(n, dtype=torch.float64).to(dtype),
        "advantages": adv.to(dtype),
        "mask": mask,
        "cu_seqlens": cu_seqlens_from_lengths(lengths),
    }


def to_padded_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded twin of a ``random_packed_batch`` (same numbers; padding has mask 0)."""
    cu = batch["cu_seqlens"]
    out = {k: padded_from_packed(batch[k], cu) for k in ("logp", "old_logp", "ref_logp", "entropy", "mask")}
    adv = batch["advantages"]
    out["advantages"] = padded_from_packed(adv, cu) if adv.shape == batch["logp"].shape else adv
    return out


# --------------------------------------------------------------------------------------------
# Tolerances
# --------------------------------------------------------------------------------------------
# Same-dtype comparisons of two exact-math implementations (e.g. chunked path vs reference).
TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}

# The small absolute slack of docs/kernels.md's low-precision rule, per input dtype.
RULE_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``actual`` equals ``expected`` within the table tolerance of ``dtype`` (compared in fp64)."""
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), **TOL[dtype], msg=lambda m: f"{what}: {m}"
    )


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref.detach().double()).abs().max()) if x.numel() else 0.0


def assert_within_rule(
    candidate: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str = ""
) -> None:
    """docs/kernels.md: ``|candidate - ref64| <= 2 |plain - ref64| + atol(dtype)`` (max norm).

    ``candidate`` is our implementation at ``dtype``, ``plain`` what plain torch computes at the
    same dtype, ``ref64`` the fp64 reference on the same (already rounded) inputs.
    """
    err, plain_err = max_abs_err(candidate, ref64), max_abs_err(plain, ref64)
    bound = 2.0 * plain_err + RULE_ATOL[dtype]
    assert err <= bound, f"{what}: error {err:.3e} vs fp64 > 2 x plain torch {plain_err:.3e} + atol"
    assert math.isfinite(err)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny model shapes gain nothing from intra-op threads, and on a shared CI box OpenMP threads
    that spin while waiting for a core make those tests many times slower; restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A ChatML template and a byte-level tokenizer (every byte one token, no merges): tiny, built in
# the test, exact round trips; for the data, prompt and MGRPO tests.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=chat_template,
    )


# A byte-level BPE with real merges (trained here on a few lines, no download): numbers, words and
# LaTeX split into multi-character tokens, and a multi-byte character spans several byte tokens.
# Specials: <|endoftext|> (0, pad/bos), <|im_start|> (1), <|im_end|> (2, EOS), <|eot|> (3).
BPE_CORPUS = [
    "The answer is 19. So 7 + 12 = 19 and 30 - 12 = 18, then 3 * 8 = 24 and 100 / 4 = 25.",
    "Natürlich: the final answer is \\boxed{19}. Wait, let me double-check that. Yes, \\boxed{18}.",
    "Mia has 7 apples. She buys 12 more. How many apples does she have now? 7 + 12 = 19 apples.",
]


def bpe_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(BPE_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|eot|>"], chat_template=chat_template,
    )  # fmt: skip
