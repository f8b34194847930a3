"""A comparison that is slow by construction, for testing the answer comparer's time bound on any machine.

:func:`spin_or_compare` runs in the comparer's worker processes (they import it by name): an answer that starts with
``SPIN`` makes it spin forever, so only the bound can stop it, however fast the CPU; any other pair is compared
as a multiset of characters (``x+1`` equals ``1+x``), which is instant.
"""

from __future__ import annotations

SPIN = "spin"


def spin_or_compare(first: str, second: str) -> bool:
    """Never returns when either answer starts with :data:`SPIN`; else whether both use the same characters."""
    if first.startswith(SPIN) or second.startswith(SPIN):
        while True:
            pass
    return sorted(first.replace(" ", "")) == sorted(second.replace(" ", ""))
