"""Atomic, resumable checkpoints of a training run (one process, or every rank of a ``torchrun`` job
writing into the same directory, rank 0 renaming it).

Layout of ``checkpoint.dir``::

    step-00000010/            one finished checkpoint per saved step
        model.safetensors     the policy's state dict (fp32 or the training dtype)
        optimizer.pt          AdamW state (the LR is a function of the update count)
        trainer_state.json    step, counters, metric history length, the config's fingerprint
        rng_rank0.pt          torch / numpy / python RNG states (CPU and CUDA), one file per rank
        dcp/                  (FSDP2) the sharded model and optimizer, torch.distributed.checkpoint
    .tmp-step-00000020-<pid>/ a checkpoint being written (never read; removed on the next save)

Atomicity: everything is written into a ``.tmp-*`` directory in the same folder, every file is
fsynced, then the directory is renamed to ``step-*`` (``os.rename`` is atomic on POSIX) and the parent
is fsynced. A run killed at any moment leaves either the previous checkpoints, or those plus a complete
new one; ``latest_checkpoint`` only ever returns a renamed, complete directory. Old checkpoints beyond
``keep_last`` are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "load_run_checkpoint",
    "save_run_checkpoint",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "restore_rng_state",
    "write_atomically",
]

_STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing files, wrong format); names the path."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``[(step, path)]``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m[1]), p))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def temp_checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` is written before the rename (shared by all ranks)."""
    return Path(directory) / f".tmp-{checkpoint_name(step)}"


def rng_file(rank: int) -> str:
    """The RNG state file of ``rank`` inside a checkpoint."""
    return f"rng_rank{rank}.pt"


def begin_checkpoint(directory: str | os.PathLike, step: int) -> Path:
    """(Writer rank.) Remove leftovers of killed saves and create the empty temporary directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_checkpoint_path(d, step)
    tmp.mkdir()
    return tmp


def abort_checkpoint(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def commit_checkpoint(
    directory: str | os.PathLike, step: int, tmp: Path, *, keep_last: int | None = None
) -> Path:
    """(Writer rank.) fsync ``tmp``, rename it to ``step-XXXXXXXX`` (replacing an older one of the same
    step), fsync the parent, then delete all but the newest ``keep_last`` checkpoints."""
    d = Path(directory)
    final = d / checkpoint_name(step)
    if not (tmp / STATE_FILE).is_file():
        raise CheckpointError(f"{tmp}: the writer did not write {STATE_FILE}")
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = d / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(d)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        for _, p in list_checkpoints(d)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def write_atomically(
    directory: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    *,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``step`` into ``directory`` atomically (one process) and return its path.

    ``write(tmp_dir)`` fills a fresh temporary directory (it must write ``trainer_state.json``), then
    :func:`commit_checkpoint` renames it. A failing ``write`` leaves nothing behind.
    """
    tmp = begin_checkpoint(directory, step)
    try:
        write(tmp)
        return commit_checkpoint(directory, step, tmp, keep_last=keep_last)
    except BaseException:
        abort_checkpoint(tmp)
        raise


def save_run_checkpoint(
    directory: str | os.PathLike,
    step: int,
    engine: Any,
    meta: dict[str, Any],
    config_yaml: str,
    keep_last: int | None,
) -> Path:
    """Checkpoint ``step`` of a run: the engine's model and optimizer files, every rank's RNG state,
    ``config.yaml`` and ``trainer_state.json`` (``meta``). Collective under torchrun: rank 0 prepares
    the temporary directory and renames it, every rank writes its part in between."""
    tmp = begin_checkpoint(directory, step) if engine.is_main else temp_checkpoint_path(directory, step)
    engine.barrier()
    try:
        engine.save(tmp)
        torch.save(capture_rng_state(), tmp / rng_file(engine.rank))
        engine.barrier()
        if engine.is_main:
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            write_json(tmp / STATE_FILE, {**meta, "world_size": engine.world_size})
            commit_checkpoint(directory, step, tmp, keep_last=keep_last)
    except BaseException:
        if engine.is_main:
            abort_checkpoint(tmp)
        raise
    engine.barrier()
    return Path(directory) / checkpoint_name(step)


def load_run_checkpoint(path: str | os.PathLike, engine: Any) -> dict[str, Any]:
    """Restore the engine's model and optimizer and this rank's RNG from checkpoint ``path``; returns
    its ``trainer_state.json``."""
    meta = read_state(path)
    engine.load(Path(path))
    rng = Path(path) / rng_file(engine.rank)
    if rng.is_file():
        restore_rng_state(torch.load(rng, weights_only=False))
    else:  # e.g. resumed on more ranks than saved: the data order and sampling seeds still match
        logger.warning("resume: %s has no RNG state for rank %d", path, engine.rank)
    return meta


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``; a clear error if it is not a checkpoint."""
    p = Path(path)
    f = p / STATE_FILE
    if not p.is_dir():
        raise CheckpointError(f"resume: checkpoint {str(p)!r} does not exist (or is not a directory)")
    if not f.is_file():
        raise CheckpointError(f"resume: {str(p)!r} is not a checkpoint directory (no {STATE_FILE})")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume: {f}: unreadable ({e})") from None


def capture_rng_state() -> dict[str, Any]:
    """Every RNG stream the run draws from: python ``random``, numpy, torch CPU and CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
