"""Where a checkpoint's weights and tokenizer come from, and the tokens that end a model's turn.

Three kinds of local checkpoints load (nothing is downloaded):

* a ``save_pretrained`` directory: ``config.json`` plus ``model.safetensors``, or sharded
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``;
* a GGUF file (llama.cpp's format, e.g. a ``Q4_1``/``Q8_0``/``F16`` quantization): ``path`` is the
  ``.gguf`` file itself, or a directory with ``gguf_file`` naming the file in it. transformers reads it
  with the ``gguf`` package (``pip install 'mgrpo-fast[gguf]'``) and **dequantizes every weight to the
  training dtype** at load time: the policy is an ordinary dense model (trainable, and exported with
  ``save_pretrained`` as safetensors), not a quantized one. The tokenizer and its chat template come
  from the same file;
* the tokenizer of either, by :func:`load_tokenizer`.

:func:`stop_token_ids` collects every id that ends a completion: the tokenizer's EOS, the model's
``generation_config``/``config`` EOS ids (Llama 3 lists several), and the token the chat template closes
an assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), which the tokenizer's own EOS
often is not.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["GGUF_MISSING", "end_of_turn_token", "load_tokenizer", "resolve_checkpoint", "stop_token_ids"]

GGUF_MISSING = (
    "model.gguf_file: loading a GGUF checkpoint needs the gguf package: pip install 'mgrpo-fast[gguf]' "
    "(or pip install gguf)"
)
_SENTINEL = "MGRPOFASTSENTINEL"  # plain letters: survives a template's trim/strip filters


def resolve_checkpoint(path: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory, gguf file or None)`` of a local checkpoint (module docstring).

    ``path`` is a ``save_pretrained`` directory, a directory holding ``gguf_file`` (a name in it or an
    absolute path), or a ``.gguf`` file. Raises ``FileNotFoundError`` naming what is missing, and
    ``ImportError`` for a GGUF checkpoint without the ``gguf`` package."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        if gguf_file is not None and os.path.basename(gguf_file) != os.path.basename(path):
            raise ValueError(f"model.gguf_file: {gguf_file!r} given, but model.path is the file {path!r}")
        path, gguf_file = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_policy: model directory {path!r} does not exist (or is not a folder)")
    if gguf_file is not None:
        file = gguf_file if os.path.isabs(gguf_file) else os.path.join(path, gguf_file)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"model.gguf_file: {file!r} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(GGUF_MISSING)
        return path, gguf_file
    if not os.path.isfile(os.path.join(path, "config.json")):
        found = sorted(p.name for p in Path(path).glob("*.gguf"))
        hint = f"; it holds GGUF files {found}: set model.gguf_file to one of them" if found else ""
        raise FileNotFoundError(
            f"load_policy: {path!r} has no config.json (not a save_pretrained directory){hint}"
        )
    return path, None


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None) -> Any:
    """The tokenizer of a local checkpoint (``path`` and ``gguf_file`` as in :func:`resolve_checkpoint`)."""
    from transformers import AutoTokenizer

    directory, gguf = resolve_checkpoint(path, gguf_file)
    if gguf is None:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf, local_files_only=True)


def end_of_turn_token(tokenizer: Any) -> int | None:
    """The id of the special token the chat template ends an assistant turn with, or ``None`` (no
    template, or the turn ends in plain text): the longest special token that the rendering of an
    assistant message ``X`` continues with right after ``X``."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # templates that refuse this conversation (e.g. require a system turn)
        return None
    at = text.rfind(_SENTINEL)
    if at < 0:
        return None
    rest = text[at + len(_SENTINEL) :]
    # the named special tokens, and every added token marked special (a tokenizer read from a GGUF file
    # names only BOS/EOS/UNK/PAD, yet marks <|im_end|> and the like special)
    named = getattr(tokenizer, "all_special_tokens", None) or []
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in named}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            specials[getattr(added, "content", str(added))] = token_id
    found = [t for t in specials if t and rest.startswith(t)]
    if not found:
        return None
    token_id = specials[max(found, key=len)]
    return None if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None) else int(token_id)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def stop_token_ids(model: Any, tokenizer: Any, extra: Iterable[int] = ()) -> list[int]:
    """Every id that ends a completion of ``model``, in this order, without repeats: the tokenizer's EOS,
    ``model.generation_config.eos_token_id``, ``model.config.eos_token_id`` (ints or lists), the chat
    template's end-of-turn token (:func:`end_of_turn_token`), then ``extra``."""
    found = _ids(getattr(tokenizer, "eos_token_id", None))
    found += _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    found += _ids(getattr(getattr(model, "config", None), "eos_token_id", None))
    found += _ids(end_of_turn_token(tokenizer)) + _ids(list(extra))
    return list(dict.fromkeys(found))
