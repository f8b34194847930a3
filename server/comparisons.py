"""The server's answer comparisons: Math-Verify in worker processes, never on the event loop.

:class:`Comparisons` owns the Math-Verify process pool (a :class:`controller.verify.AnswerComparer` with a
wall-clock bound: latency is what the server bounds). Controllers get :attr:`Comparisons.equal`, which never
blocks: canonical keys and the verdicts recorded so far answer at once, and any other pair raises
:class:`controller.equality.ComparisonPending` (the controller's update names it). The runner then awaits
:meth:`Comparisons.compare`, which runs the comparison in a thread (that thread waits for the worker process) and
records the verdict, and resumes the controller; the stop decision applies where the comparison was asked, as
offline replay makes it. Meanwhile the event loop serves every other stream; only the choice that asked waits.

Invariants: after :meth:`Comparisons.compare` returns, :attr:`Comparisons.equal` answers that pair (a comparison
that failed or outlived its bound is recorded as "not equal"); comparisons and recorded verdicts are shared by
every request of the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from controller.equality import Equal
from controller.verify import WORKERS, AnswerComparer

log = logging.getLogger(__name__)

#: a comparison beyond canonical keys (Math-Verify) still running this long after a worker took it is stopped (its
#: worker killed) and counts as "not equal"; its choice waits for it (the event loop does not)
COMPARE_TIMEOUT_SECONDS = 0.25


class Comparisons:
    def __init__(
        self, timeout_seconds: float = COMPARE_TIMEOUT_SECONDS, verify: Callable[[str, str], bool] | None = None
    ) -> None:
        """``verify``: what the workers run (Math-Verify by default; see :class:`controller.verify.AnswerComparer`).
        The worker processes start on the first comparison or at :meth:`warm_up`."""
        self.comparer = AnswerComparer(timeout_seconds=timeout_seconds, verify=verify, clock="wall")
        self.equal: Equal = self.comparer.verdicts.equal_now
        # one thread per worker process: a thread only waits for its comparison's worker
        self._threads = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="answer-comparison")

    def warm_up(self) -> None:
        """Start the worker processes (they import Math-Verify) before the first comparison needs them."""
        self.comparer.warm_up()

    def close(self) -> None:
        """Stop the worker processes (at shutdown); later comparisons use the keys only."""
        self.comparer.close()
        self._threads.shutdown(wait=False)  # comparisons already queued end at once: no worker is left

    async def compare(self, first: str, second: str) -> bool:
        """Whether two answers are the same, compared off the event loop when the keys do not tell; the verdict is
        recorded for :attr:`equal`."""
        known = self.comparer.verdicts.known(first, second)
        if known is not None:
            return known
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, self.comparer.equal, first, second)
        except Exception as error:  # noqa: BLE001 - no worker to be had (the server stops): "not shown equal"
            log.warning("answer comparison not run (%s: %s); counted as not equal", type(error).__name__, error)
            return self.comparer.verdicts.record(first, second, False)
