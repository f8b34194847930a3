"""Math-Verify in worker processes: the answer comparisons canonical keys do not decide.

Not part of the streaming core: no module the server runs per delta imports this one. Offline evaluation uses
:class:`AnswerComparer` as its (synchronous) equality; the server owns one (:mod:`server.comparisons`) and runs its
comparisons off the event loop, while its controllers compare through :meth:`controller.equality.Verdicts.equal_now`
on the comparer's :attr:`AnswerComparer.verdicts`.

Math-Verify runs under a time bound (its own ``signal.alarm`` timeout only works on the main thread, so it is
switched off). The bound is CPU time by default (the worker's own CPU seconds, so a verdict does not depend on how
loaded the machine is), or wall-clock time where latency is what matters (the server); a comparison that outlives
a wall-clock bound is stopped by killing its worker process, which a pebble process pool replaces.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import signal
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal

from controller.answers import as_latex
from controller.equality import Verdicts

log = logging.getLogger(__name__)
#: how long a caller waits, beyond the bound, for a worker process to come up (spawn + Math-Verify import)
WORKER_START_SECONDS = 60.0
#: with a CPU-time bound, the wall-clock time after which a comparison is stopped anyway (by killing its worker),
#: as a multiple of the bound: only a comparison stuck where no signal reaches it (inside one long C call) gets
#: there; a machine that gives the worker a thirtieth of a core still finishes a comparison within its bound
CPU_BOUND_WALL_FACTOR = 30.0
#: worker processes of a comparer: while a killed one is replaced (a second or more), the other takes the next pair
WORKERS = 2
Clock = Literal["cpu", "wall"]


class AnswerComparer:
    """Decides answer equivalence: canonical keys first, Math-Verify (time-bounded, in a worker process) second.
    A comparer is an equality (``comparer(first, second)`` is :meth:`equal`), synchronous: it waits for Math-Verify.

    One comparer may be shared by many controllers and threads; every Math-Verify verdict is recorded in
    :attr:`verdicts` by key pair, a pair whose comparison timed out or failed included (it counts as "not equal" and
    is never compared again). Math-Verify runs in :data:`WORKERS` worker processes (spawned on first use,
    Math-Verify imported there once).

    ``clock="cpu"`` (the default): a comparison that has used ``timeout_seconds`` of its worker's CPU time is
    interrupted there (``ITIMER_PROF``); the worker lives on. The verdicts are then the same on an idle and on a
    loaded machine, which offline evaluation needs (its figures must not depend on the load). A comparison still
    running ``CPU_BOUND_WALL_FACTOR`` times the bound in wall-clock time is stopped as below.
    ``clock="wall"``: a comparison still running ``timeout_seconds`` after a worker took it is stopped by killing
    that worker (its CPU is freed at once), and a fresh one replaces it: a bound on latency, for a server.
    :meth:`close` stops the workers; after it, comparisons use the keys only.
    """

    def __init__(
        self, timeout_seconds: float = 2.0, verify: Callable[[str, str], bool] | None = None, clock: Clock = "cpu"
    ) -> None:
        """``verify`` is the comparison the workers run (Math-Verify by default); it must be a module-level
        function, which the worker processes import by name."""
        if clock not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', not {clock!r}")
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self._verify = verify or _math_verify_equal
        self.verdicts = Verdicts()
        self._lock = threading.Lock()
        self._pool: Any = None
        self._closed = False
        self.timeouts = 0

    def warm_up(self) -> None:
        """Start the worker process now (it imports Math-Verify and sympy, a second or two), not at the first
        comparison."""
        pool = self._worker_pool()
        if pool is not None:
            pool.schedule(_math_verify_equal, args=("1", "1"))  # the pool starts its worker with its first task

    def close(self) -> None:
        """Stop the worker process (idempotent). Later comparisons fall back to "not equal" beyond the keys."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.stop()
            pool.join(timeout=5)

    def equal(self, first: str, second: str) -> bool:
        """Whether two answers are the same mathematical object (waits for Math-Verify when the keys do not tell
        and no verdict is recorded)."""
        known = self.verdicts.known(first, second)
        if known is not None:
            return known
        return self.verdicts.record(first, second, self._verify_bounded(first, second))

    def __call__(self, first: str, second: str) -> bool:
        return self.equal(first, second)

    def _worker_pool(self) -> Any:
        with self._lock:
            if self._pool is None and not self._closed:
                from pebble import ProcessPool

                # spawn, not fork: the server process runs threads (event loop, engine) that fork would copy mid-state
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPool(max_workers=WORKERS, initializer=_import_math_verify, context=context)
                # a process that exits without close() (a replay worker) stops the workers first: multiprocessing
                # joins a process's live children at its exit, and these would otherwise wait for tasks forever
                multiprocessing.util.Finalize(self, _stop_pool, args=(self._pool,), exitpriority=10)
            return self._pool

    def _verify_bounded(self, first: str, second: str) -> bool:
        pool = self._worker_pool()
        if pool is None:
            return False
        task: Callable[..., bool | None]
        args: tuple[Any, ...]
        if self.clock == "cpu":
            task, args = _cpu_bounded, (self._verify, first, second, self.timeout_seconds)
            wall = self.timeout_seconds * CPU_BOUND_WALL_FACTOR
        else:
            task, args, wall = self._verify, (first, second), self.timeout_seconds
        try:
            # a wall-clock bound runs from the moment a worker takes the task; waiting for a worker that is starting
            # up (after a kill) is not part of it, so the verdict does not depend on when the comparison is asked
            future = pool.schedule(task, args=args, timeout=wall)
            verdict = future.result(timeout=wall + WORKER_START_SECONDS)
        except FutureTimeout:
            future.cancel()  # the caller's own limit (no worker came up): stop the task wherever it is
            stopped = f"{wall:.1f} s"
        except Exception as error:  # noqa: BLE001 - a crashed or closed worker means "not shown equal"
            log.warning("answer comparison failed (%s: %s); counted as not equal", type(error).__name__, error)
            return False
        else:
            if verdict is not None:
                return bool(verdict)
            stopped = f"{self.timeout_seconds:.1f} CPU s"
        self.timeouts += 1
        log.warning("answer comparison stopped after %s: %.80r vs %.80r", stopped, first, second)
        return False


class _OutOfCpuTime(Exception):
    """Raised in a worker whose comparison used up its CPU-time bound."""


def _out_of_cpu_time(signum: int, frame: Any) -> None:
    raise _OutOfCpuTime


def _cpu_bounded(verify: Callable[[str, str], bool], first: str, second: str, seconds: float) -> bool | None:
    """``verify(first, second)`` in a worker, interrupted once it has used ``seconds`` of this process's CPU time
    (``ITIMER_PROF`` counts CPU time, not the time other processes take); None when it was. Runs on the worker's
    main thread, where signal handlers run."""
    previous = signal.signal(signal.SIGPROF, _out_of_cpu_time)
    try:
        signal.setitimer(signal.ITIMER_PROF, seconds)
        try:
            return verify(first, second)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    except _OutOfCpuTime:
        return None
    finally:
        signal.signal(signal.SIGPROF, previous)


def _stop_pool(pool: Any) -> None:
    pool.stop()
    pool.join(timeout=5)


def _import_math_verify() -> None:
    """Worker initializer: import Math-Verify (and sympy) and run one comparison (its parser builds lazily), so
    that the first real comparison's clock starts on a warm worker."""
    _math_verify_equal("\\frac{1}{2}", "0.5")


def _math_verify_equal(first: str, second: str) -> bool:
    """Math-Verify equivalence with its signal-based timeouts disabled (we bound time ourselves)."""
    import logging

    from math_verify import parse, verify  # heavy import (sympy), only when needed

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its signal timeout

    gold = parse(as_latex(first), parsing_timeout=None)
    target = parse(as_latex(second), parsing_timeout=None)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=None))
