"""A comparison that is slow by construction, for testing the answer comparer's time bound on any machine.

:func:`spin_or_compare` runs in the comparer's worker processes (they import it by name): an answer that starts with
``SPIN`` makes it spin forever, so only the bound can stop it, however fast the CPU; one that contains ``NAP``
sleeps :data:`NAP_SECONDS` first (wall-clock time that uses no CPU, as on a machine too loaded to run it); any
pair is then compared as a multiset of characters (``x+1`` equals ``1+x``), which is instant.
"""

from __future__ import annotations

import time

SPIN = "spin"
NAP = "nap"
#: three times the bound the tests give an endless comparison (tests/test_answer_bound.py ``SPIN_BOUND``)
NAP_SECONDS = 3.0


def spin_or_compare(first: str, second: str) -> bool:
    """Never returns when either answer starts with :data:`SPIN`; sleeps first when either contains :data:`NAP`;
    then whether both use the same characters."""
    if first.startswith(SPIN) or second.startswith(SPIN):
        while True:
            pass
    if NAP in first or NAP in second:
        time.sleep(NAP_SECONDS)
    return sorted(first.replace(" ", "")) == sorted(second.replace(" ", ""))
