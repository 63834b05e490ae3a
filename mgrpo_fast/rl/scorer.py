"""Fault-tolerant scoring of completions with a weighted list of reward functions.

:class:`RewardScorer` runs the reward functions (see :mod:`mgrpo_fast.data.answers`) over a batch and
never lets one call kill the run: a call that raises, returns NaN/Inf or a non-number scores 0 and is
counted as an error; a call that runs past ``timeout_s`` scores 0 and is counted as a timeout. Both
are logged (rate-limited warnings with the exception type and message).

How the timeout works. Calls run in a small pool of worker processes that this module manages itself
(``concurrent.futures.ProcessPoolExecutor`` cannot kill one stuck worker: it breaks the whole pool).
Each worker holds the reward functions, takes chunks of items over a pipe, runs every call in its
*main thread* (so math-verify's ``signal.alarm`` timeouts work there), publishes the call it is running
and its start time in a small shared array, and sends one message per finished item. The parent waits
on all pipes with a deadline equal to the earliest running call's start + ``timeout_s``; a worker whose
call is past its deadline is killed (its whole process group, so subprocesses of a reward die too),
the call scores 0 and counts as a timeout, the unfinished rest of its chunk goes back on the queue, and
a fresh worker replaces it. Workers are started with ``forkserver`` (POSIX; the server preloads this
module, so a replacement starts in milliseconds) or ``spawn``; never plain ``fork``, which is unsafe
in a process with CUDA or threads. Results are placed by item index, so deterministic functions give
identical results whatever the scheduling. ``num_workers=0`` or ``timeout_s=None`` runs every call
in-process instead (same error accounting): for tests and tiny runs. In-process, ``timeout_s`` is
enforced with a ``SIGALRM`` interval timer around each call (main thread only: a scorer used from
another thread with ``num_workers=0`` and a timeout is refused); math-verify's own alarm-based
timeouts are switched off meanwhile, since both share the one process timer.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mgrpo_fast.data.answers import math_verify_available, math_verify_timeouts
from mgrpo_fast.rl.rewards import load_reward_function, reward_file_path

logger = logging.getLogger(__name__)

__all__ = ["RewardScorer", "RewardWorkerError", "ScoreResult"]


# ------------------------------------------------------------------------------------------------
# Scoring one call (shared by the in-process path and the workers)
# ------------------------------------------------------------------------------------------------
_OK, _ERROR, _NONFINITE, _TIMEOUT = 0, 1, 2, 3


class _CallTimedOut(BaseException):
    """Raised by the in-process alarm; a BaseException so that a reward's ``except Exception`` cannot
    swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _CallTimedOut


def _call_with_alarm(fn: Callable, completion: str, answer: str, meta: dict, timeout_s: float):
    """:func:`_call_one` bounded by a ``SIGALRM`` interval timer (main thread only)."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        with math_verify_timeouts(False):
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                return _call_one(fn, completion, answer, meta)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _CallTimedOut:
        return _TIMEOUT, 0.0, f"timed out after {timeout_s:g} s (in-process)"
    finally:
        signal.signal(signal.SIGALRM, previous)


def _call_one(fn: Callable, completion: str, answer: str, meta: dict) -> tuple[int, float, str]:
    """``(status, value, message)``; a failed call has value 0.0 and a one-line message."""
    try:
        out = fn(completion, answer, **meta)
    except (Exception, SystemExit) as e:
        return _ERROR, 0.0, f"{type(e).__name__}: {e}"[:500]
    try:
        value = float(out)
    except (TypeError, ValueError):
        return _ERROR, 0.0, f"returned {type(out).__name__}, expected a float"
    if not math.isfinite(value):
        return _NONFINITE, 0.0, f"returned non-finite value {value}"
    return _OK, value, ""


# ------------------------------------------------------------------------------------------------
# Worker process
# ------------------------------------------------------------------------------------------------
def _load_payload(payload: tuple[str, Any]) -> Callable:
    kind, data = payload
    return load_reward_function(data) if kind == "spec" else pickle.loads(data)


def _worker_main(conn, payloads, parent_sys_path, state) -> None:
    """Worker loop: load the functions, say ``ready``, then run chunks until ``None`` or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if hasattr(os, "setpgrp"):
        try:
            os.setpgrp()  # own process group: a kill on timeout also reaches a reward's subprocesses
        except OSError:
            pass
    for p in parent_sys_path:
        if p not in sys.path:
            sys.path.append(p)
    try:
        fns = [_load_payload(p) for p in payloads]
        if math_verify_available():
            import math_verify  # noqa: F401  (warm import, not on the clock of the first call)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which raises)
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for item, fn_ids, completion, answer, meta in chunk:
            out = []
            for k in fn_ids:
                with state.get_lock():
                    state[0], state[1], state[2] = item, k, time.monotonic()
                out.append(_call_one(fns[k], completion, answer, meta))
            with state.get_lock():
                state[0] = -1.0
            conn.send(("result", item, out))


class RewardWorkerError(RuntimeError):
    """The worker pool cannot run the reward functions at all (e.g. one cannot be loaded in a worker)."""


class _Worker:
    def __init__(self, ctx, payloads, slot: int) -> None:
        self.slot = slot
        self.conn, child = ctx.Pipe(duplex=True)
        self.state = ctx.Array("d", [-1.0, -1.0, 0.0], lock=True)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child, payloads, list(sys.path), self.state),
            name=f"mgrpo-reward-{slot}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.ready = False
        self.tasks: deque[tuple[int, tuple[int, ...]]] = deque()

    def running(self) -> tuple[int, int, float] | None:
        """``(item, fn, start)`` of the call in progress, ``None`` if idle or unreadable."""
        lock = self.state.get_lock()
        if not lock.acquire(timeout=0.05):
            return None
        try:
            item, k, t0 = self.state[0], self.state[1], self.state[2]
        finally:
            lock.release()
        return None if item < 0 else (int(item), int(k), t0)

    def kill(self) -> None:
        if self.proc.pid is not None and hasattr(os, "killpg"):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)


# ------------------------------------------------------------------------------------------------
# Scorer
# ------------------------------------------------------------------------------------------------
@dataclass
class ScoreResult:
    """What :meth:`RewardScorer.score` returns for a batch of ``N`` completions and ``F`` functions.

    ``rewards``: ``(N,)`` float32, ``sum_f weight_f * value_f``, a failed call contributing 0.
    ``components``: name -> ``(N,)`` float32 unweighted values (0 where the call failed).
    ``failed``: ``(N,)`` bool, some call of the item timed out or errored.
    ``num_errors`` counts raised exceptions, non-numbers, worker crashes *and* NaN/Inf returns;
    ``num_nonfinite`` is the NaN/Inf part of it. Per-function counts are in ``*_per_fn``."""

    rewards: torch.Tensor
    components: dict[str, torch.Tensor]
    failed: torch.Tensor
    num_timeouts: int = 0
    num_errors: int = 0
    num_nonfinite: int = 0
    timeouts_per_fn: dict[str, int] = field(default_factory=dict)
    errors_per_fn: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat scalars for logging: mean reward, mean of each component, failure counts, time."""
        out = {f"{prefix}mean": float(self.rewards.mean()) if self.rewards.numel() else 0.0}
        for name, v in self.components.items():
            out[f"{prefix}{name}"] = float(v.mean()) if v.numel() else 0.0
        out[f"{prefix}timeouts"] = float(self.num_timeouts)
        out[f"{prefix}errors"] = float(self.num_errors)
        out[f"{prefix}nonfinite"] = float(self.num_nonfinite)
        out[f"{prefix}time_s"] = self.elapsed_s
        return out


class _RateLimitedWarnings:
    """At most one warning per key every ``interval_s``; the next one says how many were suppressed."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[Any, tuple[float, int]] = {}

    def warn(self, key: Any, msg: str) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last >= self.interval_s:
            extra = (
                f" ({suppressed} similar suppressed in the last {self.interval_s:g} s)" if suppressed else ""
            )
            logger.warning("%s%s", msg, extra)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, suppressed + 1)


def _require_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "RewardScorer: num_workers=0 with a timeout_s bounds each reward call with SIGALRM, which "
            "only the main thread can use; set reward.num_workers >= 1 (worker processes) or "
            "reward.timeout_s: null"
        )


def _fn_name(fn: Any) -> str:
    if isinstance(fn, str):
        return fn.rpartition(":")[2].split(".")[-1]
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _default_start_method(fns: Sequence[Any]) -> str:
    methods = multiprocessing.get_all_start_methods()

    # forkserver children cannot unpickle functions defined in a script's __main__; spawn re-imports it.
    def module(f: Any) -> str | None:
        while isinstance(f, functools.partial):
            f = f.func
        return getattr(f, "__module__", None)

    in_main = any(module(f) == "__main__" for f in fns if not isinstance(f, str))
    return "forkserver" if "forkserver" in methods and not in_main else "spawn"


class RewardScorer:
    """Scores batches with a weighted list of reward functions, each call isolated and time-limited.

    Args:
        fns: entries ``fn``, ``"module:function"``, or ``(fn_or_spec, weight)`` (weight 1 if absent).
            Functions must be picklable by reference (module level) to run in the workers; specs are
            loaded in the parent too, so a bad spec fails here with :class:`RewardFunctionError`.
        timeout_s: per-call limit in seconds; ``None`` runs in-process without a timeout.
        num_workers: worker processes; 0 runs in-process (``timeout_s`` cannot be enforced then and
            is ignored with a warning).
        start_method: ``"forkserver"`` (default on POSIX) or ``"spawn"``; ``"fork"`` is refused.
        warn_interval_s: rate limit of the failure warnings, per (function, kind).
        chunk_size: items per message to a worker (default: about 4 chunks per worker, at most 64).

    Use as a context manager or call :meth:`close` to stop the workers (they are daemons, so they also
    die with the process). The pool starts lazily, at the first :meth:`score` with work to do.
    """

    def __init__(
        self,
        fns: Sequence[Any],
        timeout_s: float | None = 10.0,
        num_workers: int = 2,
        *,
        start_method: str | None = None,
        warn_interval_s: float = 30.0,
        chunk_size: int | None = None,
    ) -> None:
        if isinstance(fns, (str, tuple)) or callable(fns) or not isinstance(fns, Sequence) or not fns:
            raise ValueError(
                "RewardScorer: fns must be a non-empty list of fn, 'module:function' or (fn, weight)"
            )
        self._fns: list[Callable] = []
        self._payloads: list[tuple[str, Any]] = []
        self.weights: list[float] = []
        self.names: list[str] = []
        raw_fns = []
        for entry in fns:
            fn, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(
                    f"RewardScorer: weight of {_fn_name(fn)!r} must be a finite number, got {weight!r}"
                )
            if isinstance(fn, str):
                self._fns.append(load_reward_function(fn))
                self._payloads.append(("spec", fn))
            elif callable(fn):
                self._fns.append(fn)
                # A function loaded from "file.py:fn" lives in a module that only this process knows:
                # the workers load it from the file again.
                file_path = reward_file_path(getattr(fn, "__module__", None))
                qualname = getattr(fn, "__qualname__", "")
                if file_path and "<" not in qualname:
                    self._payloads.append(("spec", f"{file_path}:{qualname}"))
                else:
                    self._payloads.append(("pickle", None))
            else:
                raise ValueError(f"RewardScorer: expected a callable or 'module:function', got {fn!r}")
            raw_fns.append(fn)
            name, n = _fn_name(fn), 2
            while name in self.names:
                name = f"{_fn_name(fn)}_{n}"
                n += 1
            self.names.append(name)
            self.weights.append(float(weight))
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"RewardScorer: timeout_s must be a positive number or None, got {timeout_s!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"RewardScorer: num_workers must be an integer >= 0, got {num_workers!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"RewardScorer: chunk_size must be a positive integer, got {chunk_size!r}")
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.num_workers = num_workers
        self.chunk_size = chunk_size
        self.in_process = num_workers == 0 or timeout_s is None
        if num_workers == 0 and timeout_s is not None:
            _require_main_thread()
        self._warn = _RateLimitedWarnings(warn_interval_s)
        self._workers: list[_Worker] = []
        self._closed = False
        self._ctx = None
        if not self.in_process:
            for i, fn in enumerate(raw_fns):
                if self._payloads[i][0] == "pickle":
                    try:
                        self._payloads[i] = ("pickle", pickle.dumps(fn))
                    except Exception as e:
                        raise ValueError(
                            f"RewardScorer: reward function {self.names[i]!r} cannot be sent to a worker "
                            f"process ({type(e).__name__}: {e}); define it at module level, pass it as "
                            "'module:function', or use num_workers=0"
                        ) from e
            method = start_method or _default_start_method(raw_fns)
            if method not in ("forkserver", "spawn"):
                raise ValueError(
                    f"RewardScorer: start_method must be 'forkserver' or 'spawn', got {method!r}"
                )
            self._ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                preload = ["__main__", __name__, "mgrpo_fast.data.answers"]
                preload += ["math_verify"] if math_verify_available() else []
                self._ctx.set_forkserver_preload(preload)
        self._finalizer = weakref.finalize(self, RewardScorer._shutdown, self._workers)

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. The scorer cannot be used afterwards."""
        self._closed = True
        self._finalizer()

    @staticmethod
    def _shutdown(workers: list[_Worker]) -> None:
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
            w.conn.close()
        workers.clear()

    def _start(self, slot: int) -> _Worker:
        w = _Worker(self._ctx, self._payloads, slot)
        if slot < len(self._workers):
            self._workers[slot] = w
        else:
            self._workers.append(w)
        return w

    # -- scoring ---------------------------------------------------------------------------------
    def score(
        self, completions: Sequence[str], answers: Sequence[str], metas: Sequence[dict] | None = None
    ) -> ScoreResult:
        """Score ``completions[i]`` against ``answers[i]`` with ``metas[i]`` as keyword arguments."""
        if self._closed:
            raise RuntimeError("RewardScorer: score() after close()")
        n = len(completions)
        if len(answers) != n:
            raise ValueError(f"RewardScorer.score: {n} completions but {len(answers)} answers")
        if metas is None:
            metas = [{} for _ in range(n)]
        elif len(metas) != n:
            raise ValueError(f"RewardScorer.score: {n} completions but {len(metas)} metas")
        for i, m in enumerate(metas):
            if not isinstance(m, dict):
                raise TypeError(f"RewardScorer.score: metas[{i}] must be a dict, got {type(m).__name__}")
        start = time.monotonic()
        nf = len(self._fns)
        status = [[_OK] * nf for _ in range(n)]
        values = [[0.0] * nf for _ in range(n)]
        if n:
            if self.in_process:
                bounded = self.timeout_s is not None
                if bounded:
                    _require_main_thread()
                for i in range(n):
                    for k, fn in enumerate(self._fns):
                        args = (fn, completions[i], answers[i], metas[i])
                        st, v, msg = _call_with_alarm(*args, self.timeout_s) if bounded else _call_one(*args)
                        self._record(status, values, i, k, st, v, msg)
            else:
                self._score_pool(completions, answers, metas, status, values)
        return self._result(status, values, time.monotonic() - start)

    def _record(self, status, values, i: int, k: int, st: int, v: float, msg: str) -> None:
        status[i][k], values[i][k] = st, v
        if st != _OK:
            kind = {_ERROR: "error", _NONFINITE: "non-finite", _TIMEOUT: "timeout"}[st]
            self._warn.warn(
                (self.names[k], kind), f"reward function {self.names[k]!r} scored 0 on item {i}: {msg}"
            )

    def _result(self, status, values, elapsed: float) -> ScoreResult:
        n, nf = len(status), len(self._fns)
        vals = torch.tensor(values, dtype=torch.float64).reshape(n, nf)
        st = torch.tensor(status, dtype=torch.int64).reshape(n, nf)
        w = torch.tensor(self.weights, dtype=torch.float64)
        rewards = (vals * w).sum(dim=1).to(torch.float32)
        comps = {name: vals[:, k].to(torch.float32) for k, name in enumerate(self.names)}
        bad = st != _OK
        timeouts = (st == _TIMEOUT).sum(dim=0)
        errors = ((st == _ERROR) | (st == _NONFINITE)).sum(dim=0)
        return ScoreResult(
            rewards=rewards,
            components=comps,
            failed=bad.any(dim=1),
            num_timeouts=int(timeouts.sum()),
            num_errors=int(errors.sum()),
            num_nonfinite=int((st == _NONFINITE).sum()),
            timeouts_per_fn={name: int(timeouts[k]) for k, name in enumerate(self.names)},
            errors_per_fn={name: int(errors[k]) for k, name in enumerate(self.names)},
            elapsed_s=elapsed,
        )

    def _score_pool(self, completions, answers, metas, status, values) -> None:
        n, nf = len(completions), len(self._fns)
        timeout = self.timeout_s
        for w in list(self._workers):
            if w.tasks:  # left busy by an interrupted score() (e.g. KeyboardInterrupt): start afresh
                w.kill()
                w.conn.close()
                self._start(w.slot)
        while len(self._workers) < self.num_workers:
            self._start(len(self._workers))
        chunk = self.chunk_size or max(1, min(64, math.ceil(n / (4 * self.num_workers))))
        queue: deque[tuple[int, tuple[int, ...]]] = deque((i, tuple(range(nf))) for i in range(n))
        remaining = n
        startup_deadline = time.monotonic() + max(120.0, 4 * timeout)
        crashes_without_progress = 0

        def lost(w: _Worker, charged: tuple[int, int] | None, st: int, msg: str) -> None:
            # Requeue the unfinished work of a dead worker; ``charged`` (item, fn) gets ``st``.
            nonlocal remaining
            for item, fn_ids in w.tasks:
                if charged is not None and item == charged[0]:
                    self._record(status, values, item, charged[1], st, 0.0, msg)
                    fn_ids = tuple(k for k in fn_ids if k != charged[1])
                    if not fn_ids:
                        remaining -= 1
                        continue
                queue.appendleft((item, fn_ids))
            w.tasks.clear()

        def drain(w: _Worker) -> bool:
            """Handle every message waiting on ``w``; False when its pipe is closed."""
            nonlocal remaining, crashes_without_progress
            try:
                while w.conn.poll():
                    msg = w.conn.recv()
                    if msg[0] == "result":
                        item, fn_ids = w.tasks.popleft()
                        assert item == msg[1], "reward worker answered out of order"
                        for k, (st, v, text) in zip(fn_ids, msg[2]):
                            self._record(status, values, item, k, st, v, text)
                        remaining -= 1
                        crashes_without_progress = 0
                    elif msg[0] == "ready":
                        w.ready = True
                    else:  # init_error: deterministic, so a restart would fail the same way
                        self.close()
                        raise RewardWorkerError(
                            f"RewardScorer: a worker could not load the reward functions: {msg[1]}. Define "
                            "them in an importable module (pass 'module:function') or use num_workers=0"
                        )
            except (EOFError, OSError):
                return False
            return True

        def replace(w: _Worker, charged, st: int, msg: str) -> None:
            w.kill()
            drain(w)  # results sent before the kill are still in the pipe
            lost(w, charged, st, msg)
            w.conn.close()
            self._start(w.slot)

        while remaining > 0:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and not w.tasks and queue:
                    batch = [queue.popleft() for _ in range(min(chunk, len(queue)))]
                    w.tasks.extend(batch)
                    try:
                        w.conn.send([(i, ks, completions[i], answers[i], metas[i]) for i, ks in batch])
                    except OSError:
                        pass  # the worker just died: its pipe reports EOF below and the batch is requeued
                    except (pickle.PicklingError, TypeError, AttributeError) as e:
                        w.tasks.clear()
                        raise TypeError(
                            f"RewardScorer.score: completions, answers and metas must be picklable to reach "
                            f"the reward workers ({type(e).__name__}: {e})"
                        ) from e
            if not any(w.ready for w in self._workers) and now > startup_deadline:
                self.close()
                raise RewardWorkerError("RewardScorer: no reward worker started within the startup limit")
            running = {id(w): w.running() for w in self._workers if w.tasks}
            deadlines = [r[2] + timeout for r in running.values() if r is not None]
            # Calls that start during the wait are seen at the next turn: the cap bounds that lag.
            wait_s = min([min(0.5, timeout / 4)] + [max(0.0, d - now) for d in deadlines]) + 0.001
            ready = multiprocessing.connection.wait([w.conn for w in self._workers], timeout=wait_s)
            by_conn = {w.conn: w for w in self._workers}
            for conn in ready:
                w = by_conn[conn]
                if drain(w):
                    continue
                # The pipe closed: the worker died by itself (crash, os._exit, OOM kill).
                w.proc.join(timeout=5)
                code = w.proc.exitcode
                cur = w.running()
                charged = (cur[0], cur[1]) if cur is not None and w.tasks else None
                # A death inside a reward call charges that call (progress); one outside any call
                # (e.g. while loading) does not, and too many of those in a row is fatal.
                crashes_without_progress = 0 if charged is not None else crashes_without_progress + 1
                if crashes_without_progress > 3 * max(1, self.num_workers):
                    self.close()
                    raise RewardWorkerError(
                        f"RewardScorer: reward workers keep dying outside any reward call (last exit code "
                        f"{code}); see the worker's error output above"
                    )
                replace(w, charged, _ERROR, f"worker process died (exit code {code})")
            now = time.monotonic()
            for w in list(self._workers):
                if not w.tasks:
                    continue
                cur = w.running()
                if cur is None or now - cur[2] <= timeout:
                    continue
                w.kill()
                drain(w)
                final = w.running()
                # Charge the call only if it is still the one we judged (it may have just finished).
                charged = (cur[0], cur[1]) if final == cur else None
                lost(w, charged, _TIMEOUT, f"timed out after {timeout:g} s (worker killed and replaced)")
                w.conn.close()
                self._start(w.slot)
