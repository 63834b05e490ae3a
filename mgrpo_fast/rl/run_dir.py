"""A run directory belongs to one run: a lock while the run lives, no silent mixing of two runs, and a
resume that refuses a changed configuration unless the user allows the change.

* :class:`RunDirectoryLock`: ``{run_dir}/.lock`` holds an exclusive ``flock`` for the life of the
  process (rank 0 under ``torchrun``) and names its owner (pid, host, start time). A second run on the
  same directory fails at once with :class:`RunDirectoryError` naming the directory and the owner's
  pid. The kernel drops a ``flock`` when its process dies, however it dies, so a lock file left by a
  killed run is stale by construction: the next run takes it over (and says so).
* :func:`check_run_directory`: a fresh run (no ``--resume``) in a directory that holds another run's
  checkpoints or metrics is refused unless ``--overwrite`` is given, which removes them first; a fresh
  run therefore never deletes (``keep_last``) or appends to (``metrics.jsonl``) another run's files,
  and a later ``--resume`` never loads a checkpoint of a different run.
* :func:`config_changes` / :func:`check_resume_config`: on resume the checkpoint's resolved config is
  compared with the current one; the changed fields are listed and the run refuses unless each is in
  :data:`SAFE_TO_CHANGE` or allowed with ``checkpoint.allow_changes``.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mgrpo_fast.config.loading import move_renamed_keys
from mgrpo_fast.config.run import TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "SAFE_TO_CHANGE",
    "RunDirectoryError",
    "RunDirectoryLock",
    "check_checkpoint_config",
    "check_resume_config",
    "check_run_directory",
    "config_changes",
    "flatten",
    "own_run_directory",
]

LOCK_FILE = ".lock"

SAFE_TO_CHANGE = (
    "train.total_steps",
    "checkpoint.every",
    "checkpoint.keep_last",
    "checkpoint.resume",
    "checkpoint.export_final",
    "checkpoint.allow_changes",
    "logging.*",
    "eval.*",
    "reward.num_workers",
    "reward.timeout_s",
    "rollout.batch_size",
    "parallel.backend",
)
"""Fields a resumed run may change without asking: how long to train, how often to save, log and
evaluate, and how the work is scheduled; none of them changes what the update computes."""


class RunDirectoryError(RuntimeError):
    """A run directory that this run may not use (locked by another run, or holding another run)."""


class RunDirectoryLock:
    """Exclusive ownership of ``run_dir`` for this process (see the module docstring).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Only the process that writes the
    run directory (rank 0) takes it.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirectoryLock:
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirectoryError(
                f"run directory {self.run_dir} is in use by another run (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, started {owner.get('started', '?')}); wait for it to finish, "
                "stop it, or choose another logging.run_dir"
            ) from None
        previous = _read_owner(fd)
        if previous.get("pid"):
            logger.warning(
                "run directory %s: taking over the stale lock of pid %s on %s (that run is gone)",
                self.run_dir,
                previous.get("pid"),
                previous.get("host", "?"),
            )
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: nobody owns the directory
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _previous_run_files(run_dir: Path, checkpoint_dir: Path) -> list[Path]:
    """What another run left in the run directory: checkpoints, metrics, TensorBoard files, the final
    export and the resolved config."""
    found = []
    if checkpoint_dir.is_dir() and any(
        p.name.startswith(("step-", ".tmp-step-")) for p in checkpoint_dir.iterdir()
    ):
        found.append(checkpoint_dir)
    for name in ("metrics.jsonl", "tensorboard", "final", "config.yaml"):
        if (run_dir / name).exists():
            found.append(run_dir / name)
    return found


def check_run_directory(
    run_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, *, resume: bool, overwrite: bool
) -> None:
    """Refuse a fresh run in a directory holding another run, unless ``overwrite`` (then remove those
    files). A resumed run continues the run that is there. Call it while holding the lock."""
    run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
    if resume:
        return
    found = _previous_run_files(run_dir, checkpoint_dir)
    if not found:
        return
    names = ", ".join(str(p) for p in found)
    if not overwrite:
        raise RunDirectoryError(
            f"run directory {run_dir} holds a previous run ({names}); pass --resume to continue it, "
            "--overwrite to delete it and start again, or choose another logging.run_dir"
        )
    logger.warning("--overwrite: removing the previous run's files: %s", names)
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """A config as nested dicts (``TrainConfig.to_dict()``) -> ``{"section.field": value}``; top-level
    fields keep their name, and mapping-valued fields (``reward.functions``) stay one value."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update({f"{k}.{field}": value for field, value in v.items()})
        else:
            out[k] = v
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, saved value, current value)]`` for every field that differs (nested dicts of
    two resolved configs)."""
    a, b = flatten(saved), flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _allowed(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], allow: Sequence[str], checkpoint: str | os.PathLike
) -> list[tuple[str, Any, Any]]:
    """Raise :class:`RunDirectoryError` listing the fields changed since ``checkpoint`` was written,
    unless every one is safe (:data:`SAFE_TO_CHANGE`) or allowed (``allow``: dotted keys or
    ``fnmatch`` patterns, ``"*"`` = anything). Returns the changes (logged by the caller)."""
    changes = config_changes(saved, current)
    refused = [c for c in changes if not _allowed(c[0], (*SAFE_TO_CHANGE, *allow))]
    if refused:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise RunDirectoryError(
            f"resume: the config differs from the one checkpoint {checkpoint} was written with: {lines}. "
            f"Resume with the same config, or allow the change explicitly with "
            f"--checkpoint.allow_changes='[{keys}]'"
        )
    return changes


def check_checkpoint_config(checkpoint: Path, config: TrainConfig) -> None:
    """Refuse to resume ``checkpoint`` with a ``config`` that changed an unsafe field (it logs the
    allowed changes). A checkpoint without ``config.yaml`` (written by hand) is only warned about."""
    saved_file = checkpoint / "config.yaml"
    if not saved_file.is_file():
        logger.warning("resume: %s has no config.yaml; the config cannot be compared", checkpoint)
        return
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    try:  # through the loader, so keys renamed since the checkpoint was written compare as the new ones
        move_renamed_keys(saved, {}, str(saved_file))
        saved = TrainConfig.from_dict(saved).resolved().to_dict()
    except ValueError:
        pass
    changes = check_resume_config(saved, config.to_dict(), config.checkpoint.allow_changes, checkpoint)
    for key, old, new in changes:
        logger.info("resume: %s changed from %r to %r (allowed)", key, old, new)


@contextlib.contextmanager
def own_run_directory(
    engine: Any, run_dir: Path, checkpoint_dir: str | os.PathLike, *, resume: bool, overwrite: bool
):
    """Hold ``run_dir``'s lock on the main rank and refuse to mix two runs in it
    (:func:`check_run_directory`); under ``torchrun`` every rank raises the same error."""
    lock, error = None, None
    if engine.is_main:
        try:
            lock = RunDirectoryLock(run_dir).acquire()
            check_run_directory(run_dir, checkpoint_dir, resume=resume, overwrite=overwrite)
        except RunDirectoryError as e:
            error = str(e)
            if lock is not None:
                lock.release()
    error = engine.all_gather_object(error)[0]
    if error:
        raise RunDirectoryError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
