"""The bundled tiny model, made for the bundled task: train MGRPO on CPU in minutes with nothing downloaded.

* :mod:`mgrpo_fast.data.arithmetic`: procedural multi-step arithmetic word problems with worked
  solutions ending in ``\\boxed{N}``, difficulty levels and a seeded, disjoint train/test split
  (:func:`mgrpo_fast.data.arithmetic.bundled_problems`).
* :func:`bundled_model_path`: a character-level Llama model (about 1M parameters) trained supervised on
  the train split by ``python -m mgrpo_fast.tools.make_tiny_model``; it solves a fair share of the
  test split greedily, and makes mistakes that RL and self-correction can fix.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["bundled_model_path"]

_TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny_model"


def bundled_model_path() -> str:
    """The directory of the bundled tiny model (``config.json``, ``model.safetensors``, tokenizer
    files, ``generation_config.json``), loadable with ``mgrpo_fast.models.policy.load_policy`` or
    ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained``.

    Raises:
        FileNotFoundError: the package was installed without its assets (e.g. a wheel built
            without package data); rebuild them with ``python -m mgrpo_fast.tools.make_tiny_model``.
    """
    if not (_TINY_MODEL / "config.json").is_file() or not (_TINY_MODEL / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled tiny model not found at {_TINY_MODEL} (installed without package data?); rebuild it "
            f"with: python -m mgrpo_fast.tools.make_tiny_model --out {_TINY_MODEL}"
        )
    return str(_TINY_MODEL)
