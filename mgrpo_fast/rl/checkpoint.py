"""Atomic, resumable checkpoints of a training run (one process, or every rank of a ``torchrun`` job
writing into the same directory, rank 0 renaming it).

Layout of ``checkpoint.dir``::

    step-00000010/            one finished checkpoint per saved step
        model.safetensors     the policy's state dict (fp32 or the training dtype)
        optimizer.pt          AdamW state (tensors and numbers only: loaded with weights_only=True)
        trainer_state.json    step, counters, the config's fingerprint
        config.yaml           the resolved config of the run that wrote it
        rng_rank0.safetensors torch / numpy / python RNG states (CPU and CUDA), one file per rank
        dcp/                  (FSDP2) the sharded model and optimizer, torch.distributed.checkpoint
        manifest.json         every other file's size (and SHA-256 up to 64 MiB), written last
    .tmp-step-00000020/       a checkpoint being written (never read; removed on the next save)

Atomicity: everything is written into a ``.tmp-*`` directory in the same folder, every file is
fsynced, then the directory is renamed to ``step-*`` (``os.rename`` is atomic on POSIX) and the parent
is fsynced. A run killed at any moment leaves either the previous checkpoints, or those plus a complete
new one; ``latest_checkpoint`` only ever returns a renamed, complete directory. Old checkpoints beyond
``keep_last`` are deleted only after the new one is in place.

Verification: ``manifest.json`` lists the size of every file (and the SHA-256 of each file up to
:data:`HASHED_UP_TO` bytes: the state, RNG and config files, and the whole checkpoint of small models).
:func:`latest_checkpoint` returns the newest checkpoint that matches its manifest; a damaged one (a
truncated or missing file, e.g. after an interrupted copy) is reported with a warning and the previous
one is used. Nothing is unpickled: model weights are safetensors, RNG states safetensors + JSON
metadata, the optimizer state is read with ``torch.load(weights_only=True)``.

A failed save (a full disk, a file-size limit) raises :class:`CheckpointError` naming the path, the
bytes the checkpoint needs and the bytes free; the temporary directory is removed and the previous
checkpoints are untouched.
"""

from __future__ import annotations

import hashlib
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
    "CheckpointWriteError",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_rng_state",
    "load_run_checkpoint",
    "restore_rng_state",
    "save_rng_state",
    "save_run_checkpoint",
    "verify_checkpoint",
    "write_atomically",
]

_STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
HASHED_UP_TO = 64 * 2**20
"""Files up to this size get a SHA-256 in the manifest; larger ones (model shards) only their size."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing files, wrong format); names the path."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (a full disk, a file-size limit, a read-only directory):
    names the path, the bytes needed and the bytes free. Also an ``OSError``, as the failure was."""


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


def latest_checkpoint(directory: str | os.PathLike, *, verify: bool = True) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None. With ``verify`` (default), the newest
    one that matches its manifest: a damaged newer one is skipped with a warning naming the problem."""
    for _, path in reversed(list_checkpoints(directory)):
        problems = verify_checkpoint(path) if verify else []
        if not problems:
            return path
        logger.warning(
            "resume: checkpoint %s is damaged (%s); using the previous one", path, "; ".join(problems[:3])
        )
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(path: Path) -> None:
    """Record every file of checkpoint ``path`` (relative name, size, SHA-256 of the small ones)."""
    files = {}
    for f in _files_of(path):
        size = f.stat().st_size
        entry: dict[str, Any] = {"bytes": size}
        if size <= HASHED_UP_TO:
            entry["sha256"] = _sha256(f)
        files[f.relative_to(path).as_posix()] = entry
    write_json(path / MANIFEST_FILE, {"files": files})


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with checkpoint ``path`` against its manifest (empty: it is intact). A checkpoint
    written before manifests existed is accepted as it is."""
    p = Path(path)
    manifest = p / MANIFEST_FILE
    if not manifest.is_file():
        return []
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{manifest}: unreadable ({e})"]
    problems = []
    for name, entry in files.items():
        f = p / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif "sha256" in entry and _sha256(f) != entry["sha256"]:
            problems.append(f"{name} does not match its SHA-256")
    return problems


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
    return f"rng_rank{rank}.safetensors"


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
    write_manifest(tmp)
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
        try:
            write(tmp)
            return commit_checkpoint(directory, step, tmp, keep_last=keep_last)
        except OSError as e:
            raise _save_failed(directory, tmp, e) from e
    except BaseException:
        abort_checkpoint(tmp)
        raise


def _bytes_needed(directory: Path, tmp: Path) -> int:
    """The size of the newest finished checkpoint (what the next one will take), else what the failed
    save had written."""
    found = list_checkpoints(directory)
    where = found[-1][1] if found else tmp
    return sum(f.stat().st_size for f in where.rglob("*") if f.is_file()) if where.is_dir() else 0


def _save_failed(directory: str | os.PathLike, tmp: Path, error: BaseException) -> CheckpointWriteError:
    """A save that failed with ``error`` (a full disk, a file-size limit, a read-only directory) as an
    error naming the path, the bytes needed and the bytes free."""
    d = Path(directory)
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        free = -1
    needed = _bytes_needed(d, tmp)
    return CheckpointWriteError(
        f"checkpoint: writing {tmp} failed ({type(error).__name__}: {error}); a checkpoint of this run needs "
        f"about {needed:,} bytes and {d} has {free:,} bytes free. The previous checkpoints are intact; free "
        "space (or lower checkpoint.keep_last, or point checkpoint.dir elsewhere) and resume with --resume"
    )


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
        try:
            engine.save(tmp)
            save_rng_state(tmp / rng_file(engine.rank))
            engine.barrier()
            if engine.is_main:
                (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
                write_json(tmp / STATE_FILE, {**meta, "world_size": engine.world_size})
                commit_checkpoint(directory, step, tmp, keep_last=keep_last)
        except Exception as e:
            # safetensors reports a full disk / file-size limit as its own error type, not OSError
            if isinstance(e, OSError) or "too large" in str(e).lower() or "no space" in str(e).lower():
                raise _save_failed(directory, tmp, e) from e
            raise
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
        restore_rng_state(load_rng_state(rng))
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


def save_rng_state(path: Path, state: dict[str, Any] | None = None) -> None:
    """Write ``state`` (default: :func:`capture_rng_state`) as data only: the torch states and numpy's
    key array as safetensors tensors, python's state and numpy's counters as JSON metadata."""
    from safetensors.torch import save_file

    state = capture_rng_state() if state is None else state
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    tensors = {"torch": state["torch"], "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s.cpu()
    version, internal, gauss_next = state["python"]
    meta = {
        "python": json.dumps([version, list(internal), gauss_next]),
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]),
        "num_cuda": str(len(state.get("cuda", []))),
    }
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> dict[str, Any]:
    """Read what :func:`save_rng_state` wrote (no pickle: a crafted file cannot run code)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            version, internal, gauss_next = json.loads(meta["python"])
            kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
            keys = f.get_tensor("numpy_keys").numpy().astype(np.uint32)
            state = {
                "python": (int(version), tuple(int(x) for x in internal), gauss_next),
                "numpy": (str(kind), keys, int(pos), int(has_gauss), float(gauss)),
                "torch": f.get_tensor("torch"),
            }
            n = int(meta.get("num_cuda", "0"))
            if n:
                state["cuda"] = [f.get_tensor(f"cuda.{i}") for i in range(n)]
    except Exception as e:  # a damaged or foreign file: say which
        what = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"resume: {path}: not a readable RNG state file ({what})") from e
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
