"""The prompts of both MGRPO layers.

:func:`build_prompt` renders the layer-1 prompt: the question (plus an instruction) as a user turn
through the tokenizer's chat template when it has one, else the plain format::

    {system_prompt}\\n\\n            <- only when a system prompt is given
    Question: {question}\\n\\n
    {instruction}\\n\\n              <- only when the instruction is not empty
    Answer:

:func:`build_correction_prompt` renders the layer-2 input: the layer-1 prompt, the first answer o_i as
the model's own assistant turn, then the guiding phrase in one of two places (``guiding_turn``):

* ``"assistant"`` (default): a separator and the phrase continue o_i's assistant turn, left open, so the
  model continues right after the phrase (``...<assistant> o_i\n\nWait, let me double-check that.``);
* ``"user"``: o_i's turn is closed as the chat template closes an assistant turn, the phrase is the next
  user turn, and a new assistant turn is opened (the template's generation prompt) for the model to
  answer in. Needs a chat template; without one the phrase is a continuation as above.

Its token ids are the concatenation ``prompt ids + o_i ids + phrase ids`` (pass the sampled ids of o_i to
keep them token-exact; "phrase ids" include the turn markers in ``"user"`` mode), and
``num_prompt_tokens`` marks where the trained continuation starts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mgrpo_fast.data.problems import Problem

__all__ = [
    "DEFAULT_GUIDING_PHRASES",
    "GUIDING_TURNS",
    "DEFAULT_INSTRUCTION",
    "CorrectionPrompt",
    "build_correction_prompt",
    "build_messages",
    "build_prompt",
    "build_prompt_ids",
    "choose_guiding_phrase",
    "guiding_tail",
    "has_chat_template",
]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to the question (after a blank line) in the user turn."""

DEFAULT_GUIDING_PHRASES: tuple[str, ...] = (
    "Wait, let me double-check that.",
    "Where might I have gone wrong this time? Let me double-check carefully.",
    "Wait a minute, let me make sure I didn't make a mistake.",
    "Hmm, let me think if there's another way to approach this problem.",
    "But wait, let me make sure I didn't miss anything in the original problem.",
)
"""The layer-2 guiding phrases of docs/algorithm.md (the paper's public re-implementations)."""

GUIDING_TURNS = ("assistant", "user")
"""Where the layer-2 guiding phrase goes (module docstring): continuing o_i's turn, or a new user turn."""

_ANSWER_SENTINEL = "MGRPOFASTANSWER"  # plain letters: survives a template's trim/strip filters


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (``tokenizer.chat_template`` set)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _question(problem: Problem | str) -> str:
    return problem if isinstance(problem, str) else problem.question


def _user_content(problem: Problem | str, instruction: str | None) -> str:
    q = _question(problem).strip()
    return f"{q}\n\n{instruction}" if instruction else q


def build_messages(
    problem: Problem | str, *, system_prompt: str | None = None, instruction: str | None = DEFAULT_INSTRUCTION
) -> list[dict[str, str]]:
    """The chat messages of the layer-1 prompt: an optional system turn and the user turn
    ``"{question}\\n\\n{instruction}"``."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": _user_content(problem, instruction)})
    return msgs


def _render(problem, tokenizer, system_prompt, template, instruction) -> tuple[str, bool]:
    """``(text, used_chat_template)`` of the layer-1 prompt."""
    if template not in ("chat", "plain"):
        raise ValueError(f"template must be 'chat' or 'plain', got {template!r}")
    if template == "chat" and has_chat_template(tokenizer):
        msgs = build_messages(problem, system_prompt=system_prompt, instruction=instruction)
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text, True
    head = f"{system_prompt}\n\n" if system_prompt else ""
    body = f"Question: {_question(problem).strip()}\n\n"
    if instruction:
        body += f"{instruction}\n\n"
    return f"{head}{body}Answer:", False


def build_prompt(
    problem: Problem | str,
    tokenizer: Any = None,
    *,
    system_prompt: str | None = None,
    template: str = "chat",
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> str:
    """The layer-1 prompt text of ``problem`` (a :class:`Problem` or a question string).

    ``template="chat"``: the tokenizer's chat template with the generation prompt (the assistant turn
    opened) when ``tokenizer.chat_template`` is set, otherwise the plain format of the module
    docstring; ``template="plain"`` always uses the plain format (``tokenizer`` may be ``None``)."""
    return _render(problem, tokenizer, system_prompt, template, instruction)[0]


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def build_prompt_ids(
    problem: Problem | str,
    tokenizer: Any,
    *,
    system_prompt: str | None = None,
    template: str = "chat",
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> list[int]:
    """Token ids of :func:`build_prompt`. A chat-templated text is encoded without adding special
    tokens (the template has them, as ``apply_chat_template(tokenize=True)`` does); the plain format
    gets the tokenizer's usual special tokens (e.g. BOS)."""
    text, chat = _render(problem, tokenizer, system_prompt, template, instruction)
    return _encode(tokenizer, text, add_special_tokens=not chat)


def choose_guiding_phrase(rng: random.Random, phrases: Sequence[str] = DEFAULT_GUIDING_PHRASES) -> str:
    """One phrase drawn uniformly with ``rng`` (exactly one ``rng.randrange`` call: deterministic for a
    seeded ``random.Random``)."""
    if not phrases:
        raise ValueError("guiding phrases: the list is empty")
    return phrases[rng.randrange(len(phrases))]


@dataclass(frozen=True)
class CorrectionPrompt:
    """The layer-2 input of one (q, o_i) pair.

    ``prompt_ids`` = ``question ids | first-answer ids | separator+phrase ids``; the continuation the
    model samples is appended after it and is the only part trained. ``text`` is the same input as a
    string. Token boundaries: ``[0, question_end)`` is the layer-1 prompt, ``[question_end, answer_end)``
    the first answer o_i, ``[answer_end, num_prompt_tokens)`` the separator and guiding phrase."""

    text: str
    prompt_ids: list[int]
    phrase: str
    question_end: int
    answer_end: int

    @property
    def num_prompt_tokens(self) -> int:
        """Index of the first continuation token (everything before it is context, not trained)."""
        return len(self.prompt_ids)

    def loss_mask(self, num_continuation_tokens: int) -> list[int]:
        """``(num_prompt_tokens + num_continuation_tokens,)`` 0/1 mask: 1 on the continuation only."""
        return [0] * len(self.prompt_ids) + [1] * num_continuation_tokens


def _strip_trailing_special(tokenizer: Any, ids: list[int], text: str) -> tuple[list[int], str]:
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    while ids and ids[-1] in special_ids:
        ids = ids[:-1]
    specials = [t for t in (getattr(tokenizer, "all_special_tokens", []) or []) if t]
    changed = True
    while changed:
        changed = False
        text = text.rstrip()
        for tok in specials:
            if text.endswith(tok):
                text, changed = text[: -len(tok)], True
    return ids, text


def _user_turn_tail(problem, phrase: str, tokenizer: Any, system_prompt, instruction) -> str:
    """What the chat template renders after an assistant turn's content when the next turn is the user's
    ``phrase``: the assistant turn's end, the user turn, and the generation prompt."""
    msgs = build_messages(problem, system_prompt=system_prompt, instruction=instruction)
    msgs += [{"role": "assistant", "content": _ANSWER_SENTINEL}, {"role": "user", "content": phrase}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    at = text.rfind(_ANSWER_SENTINEL)
    if at < 0:
        raise ValueError(
            "guiding_turn='user': the chat template does not render an earlier assistant answer, so o_i "
            "cannot stay in the context; use layer2.guiding_turn: assistant"
        )
    return text[at + len(_ANSWER_SENTINEL) :]


def guiding_tail(
    problem: Problem | str,
    guiding_phrase: str,
    tokenizer: Any,
    *,
    separator: str = "\n\n",
    system_prompt: str | None = None,
    template: str = "chat",
    instruction: str | None = DEFAULT_INSTRUCTION,
    guiding_turn: str = "assistant",
) -> str:
    """The text of the layer-2 input after o_i: ``separator + phrase`` (``guiding_turn="assistant"``, or
    no chat template), or the chat template's end of the assistant turn, the phrase as a user turn and
    the next assistant header (``"user"``). Its token count is part of the context a question needs."""
    if guiding_turn == "user" and template == "chat" and has_chat_template(tokenizer):
        return _user_turn_tail(problem, guiding_phrase, tokenizer, system_prompt, instruction)
    return separator + guiding_phrase


def build_correction_prompt(
    problem: Problem | str,
    first_answer: str | None,
    guiding_phrase: str | None,
    tokenizer: Any,
    *,
    rng: random.Random | None = None,
    phrases: Sequence[str] = DEFAULT_GUIDING_PHRASES,
    first_answer_ids: Sequence[int] | None = None,
    separator: str = "\n\n",
    system_prompt: str | None = None,
    template: str = "chat",
    instruction: str | None = DEFAULT_INSTRUCTION,
    guiding_turn: str = "assistant",
) -> CorrectionPrompt:
    """The layer-2 correction input (docs/algorithm.md): chat-formatted q, o_i as the model's own previous
    answer, then the guiding phrase, so the model continues after the phrase.

    The layer-1 prompt is exactly :func:`build_prompt` (chat template with the assistant turn opened,
    or the plain format), so o_i sits in the assistant turn it was sampled in; the phrase continues that
    same turn, which for a template that renders assistant content verbatim equals
    ``apply_chat_template([..., {"role": "assistant", "content": o_i + separator + phrase}],
    continue_final_message=True)``.

    Args:
        first_answer: o_i as text (trailing whitespace and special-token strings such as the EOS are
            dropped, then ``separator`` is added). May be ``None`` when ``first_answer_ids`` is given.
        guiding_phrase: the phrase, or ``None`` to draw one from ``phrases`` with ``rng``
            (:func:`choose_guiding_phrase`).
        first_answer_ids: the sampled token ids of o_i; used as they are (trailing special ids such as
            EOS dropped) so the context is token-exact; the text is then their decoding.
        separator: between o_i and the phrase (``guiding_turn="assistant"``; the chat template's turn
            markers separate them in ``"user"`` mode).
        guiding_turn: ``"assistant"`` (the phrase continues o_i's turn) or ``"user"`` (the phrase is the
            next user turn and the model answers in a new assistant turn); module docstring.
    """
    if guiding_turn not in GUIDING_TURNS:
        raise ValueError(f"guiding_turn: expected one of {GUIDING_TURNS}, got {guiding_turn!r}")
    if guiding_phrase is None:
        if rng is None:
            raise ValueError(
                "build_correction_prompt: pass a guiding_phrase or an rng to draw one from phrases"
            )
        guiding_phrase = choose_guiding_phrase(rng, phrases)
    if not isinstance(guiding_phrase, str) or not guiding_phrase.strip():
        raise ValueError(
            f"build_correction_prompt: guiding_phrase must be a non-empty string, got {guiding_phrase!r}"
        )
    if first_answer is None and first_answer_ids is None:
        raise ValueError("build_correction_prompt: pass first_answer (text) or first_answer_ids")
    prefix, chat = _render(problem, tokenizer, system_prompt, template, instruction)
    q_ids = _encode(tokenizer, prefix, add_special_tokens=not chat)
    if first_answer_ids is not None:
        a_ids = [int(t) for t in first_answer_ids]
        a_ids, _ = _strip_trailing_special(tokenizer, a_ids, "")
        a_text = tokenizer.decode(a_ids, skip_special_tokens=False) if first_answer is None else first_answer
        _, a_text = _strip_trailing_special(tokenizer, [], a_text)
    else:
        _, a_text = _strip_trailing_special(tokenizer, [], first_answer)
        a_ids = _encode(tokenizer, a_text, add_special_tokens=False)
    tail = guiding_tail(
        problem,
        guiding_phrase,
        tokenizer,
        separator=separator,
        system_prompt=system_prompt,
        template=template,
        instruction=instruction,
        guiding_turn=guiding_turn,
    )
    p_ids = _encode(tokenizer, tail, add_special_tokens=False)
    return CorrectionPrompt(
        text=prefix + a_text + tail,
        prompt_ids=q_ids + a_ids + p_ids,
        phrase=guiding_phrase,
        question_end=len(q_ids),
        answer_end=len(q_ids) + len(a_ids),
    )
