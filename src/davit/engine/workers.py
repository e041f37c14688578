"""DataLoader worker processes of a training run: survive stop signals, stop explicitly, die with one clear line.

A scheduler's stop (Slurm, Kubernetes, systemd, ``kill -TERM -PGID``) signals every process of the job, loader
workers included. Workers therefore ignore SIGINT and SIGTERM (:func:`worker_init`): the main process finishes its
step, saves and then stops them itself (:func:`shutdown_workers`). That must happen before the interpreter exits:
once python is exiting, torch's own shutdown returns early and multiprocessing's atexit hook sends the leftover
(persistent) workers SIGTERM and joins them without a timeout, which would wait forever on workers that ignore it.
:func:`kill_leftover_workers` is the launcher's last line of defence (the CLI calls it on its way out).

A worker that dies (``kill -9``, the OOM killer) makes torch's SIGCHLD handler raise a RuntimeError wherever the
main process happens to be: inside the optimizer step, a checkpoint write or a ``finally``. :class:`WorkerWatch`
defers that error to the points where the loop asks for it, between steps, where the state is whole.

Every private DataLoader API davit touches is here, each guarded so that a torch release that renames it degrades
to torch's own behaviour instead of breaking.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "WorkerWatch",
    "dead_workers",
    "death_error",
    "death_reason",
    "is_worker_death",
    "kill_leftover_workers",
    "shutdown_workers",
    "worker_init",
]

log = logging.getLogger(__name__)


def worker_init(_: int) -> None:
    """``worker_init_fn`` of the training loaders: the main process decides when its workers stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def is_worker_death(e: BaseException) -> bool:
    """A DataLoader worker killed by a signal or the OOM killer (torch raises a RuntimeError naming its pid).

    torch 2.x words it "DataLoader worker (pid 123) is killed by signal: Killed." (SIGCHLD handler) or "DataLoader
    worker (pid(s) 123) exited unexpectedly" (the loader's own liveness check).
    """
    text = str(e)
    return isinstance(e, RuntimeError) and "DataLoader worker" in text and ("killed" in text or "exited" in text)


def _stop_processes(procs: list[Any]) -> None:
    """SIGKILL and reap ``multiprocessing.Process`` objects still alive (they ignore SIGTERM)."""
    for w in procs:
        with contextlib.suppress(Exception):
            if w.is_alive():
                w.kill()
    for w in procs:
        with contextlib.suppress(Exception):
            w.join(timeout=5)


def shutdown_workers(*loaders: Any) -> None:
    """Stop the worker processes of ``loaders`` (persistent ones included) now, while python still runs normally.

    Workers are asked to finish (torch's shutdown: a few ms for idle workers) and killed if they do not.
    """
    for loader in loaders:
        it = getattr(loader, "_iterator", None)  # the persistent iterator (private DataLoader attribute)
        if it is None:
            continue
        with contextlib.suppress(Exception):
            it._shutdown_workers()
        _stop_processes(list(getattr(it, "_workers", [])))
        loader._iterator = None


def dead_workers(loader: Any, wait: float = 0.0) -> dict[int, int | None]:
    """``{pid: exit code}`` of ``loader``'s current workers that are no longer alive (waiting up to ``wait`` s for
    one); the code is negative for a signal, as in :attr:`multiprocessing.Process.exitcode`."""
    it = getattr(loader, "_iterator", None)
    workers = list(getattr(it, "_workers", []))
    deadline = time.monotonic() + wait
    while True:
        dead = {w.pid: w.exitcode for w in workers if not w.is_alive()}
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def death_error(dead: dict[int, int | None]) -> RuntimeError:
    """The error torch raises for a dead worker, in its words (:func:`is_worker_death` knows them)."""
    pid, code = next(iter(dead.items()))
    if code is not None and code < 0:
        return RuntimeError(f"DataLoader worker (pid {pid}) is killed by signal: {signal.strsignal(-code)}.")
    return RuntimeError(f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited unexpectedly")


def death_reason(e: BaseException) -> str:
    """torch's "DataLoader worker (pid 12) is killed by signal: Killed." -> "pid 12 killed by signal 9, SIGKILL"."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    pid = re.search(r"pid(?:\(s\))? ([\d, ]+)", text)
    who = f"pid {pid.group(1).strip()}" if pid else "a worker"
    sig = re.search(r"killed by signal: (.+?)\.?\s*$", text)
    if sig:
        names = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}
        num = names.get(sig.group(1).strip())
        return f"{who} killed by signal {int(num)}, {num.name}" if num else f"{who} killed by signal: {sig.group(1)}"
    return f"{who} exited unexpectedly"


def kill_leftover_workers() -> int:
    """SIGKILL the daemonic multiprocessing children still alive (DataLoader workers); returns how many.

    For launchers, just before the interpreter exits: multiprocessing's atexit hook would SIGTERM and join them
    without a timeout, and training workers ignore SIGTERM.
    """
    if threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report each worker killed here as a dead worker.
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    left = [p for p in multiprocessing.active_children() if p.daemon]
    _stop_processes(left)
    if left:
        log.debug("killed %d leftover loader worker(s): %s", len(left), [p.pid for p in left])
    return len(left)


class WorkerWatch:
    """Defers torch's dead-worker error (raised from its SIGCHLD handler) to :meth:`check`.

    Use as a context manager around the training loop; call :meth:`check` where the state is whole. The loader's
    own liveness check (at most ~5 s later, inside ``next(iterator)``) still raises on its own, also between steps.
    """

    def __init__(self) -> None:
        self.error: RuntimeError | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> WorkerWatch:
        if os.name == "nt" or threading.current_thread() is not threading.main_thread():
            return self
        try:
            from torch.utils.data._utils import signal_handling
        except ImportError:
            return self
        setter = getattr(signal_handling, "_set_SIGCHLD_handler", None)
        self._poll = getattr(signal_handling, "_error_if_any_worker_fails", None)
        if setter is None or self._poll is None:
            return self
        # Let torch install its handler now (it does so once per process, at the first worker iterator) so that it
        # cannot wrap ours later; ours replaces it for the loop and puts it back afterwards.
        setter()
        self._previous = signal.signal(signal.SIGCHLD, self._handle)
        self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        try:
            self._poll()
        except RuntimeError as e:
            if self.error is None:
                self.error = e

    def check(self) -> None:
        """Raise the first dead-worker error seen since entering, if any."""
        if self.error is not None:
            raise self.error

    def batches(self, batches: Iterable[Any], loader: Any) -> Iterator[Any]:
        """``batches`` (an iterator over ``loader``), with every error a worker's death causes as torch's
        dead-worker RuntimeError: a worker killed while it hands a batch over (shared memory is passed through a
        socket) makes the main process fail first with ``ConnectionResetError``, ``EOFError`` and the like."""
        it = iter(batches)
        while True:
            self.check()
            try:
                batch = next(it)
            except StopIteration:
                return
            except (EOFError, OSError) as e:
                self.check()
                dead = dead_workers(loader, wait=2.0)
                if not dead:  # workers this watch cannot list (a non-persistent iterator): SIGCHLD may lag
                    time.sleep(0.2)
                    self.check()
                if dead:
                    raise death_error(dead) from e
                raise
            yield batch

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGCHLD, self._previous)
            self._installed = False
