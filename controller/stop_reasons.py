"""The stop reasons (``StopDecision.reason``): one definition for the policies that give them, the metrics' ``reason``
label and the docs.

Text policies: ``first_answer`` (the first answer), ``confirmed`` (``fcs_reflection``: a reflection confirmed the
answer), ``consistent`` (``consistency``: ``k`` solutions agree), ``loop`` (the model repeats itself), ``budget``
(the budget policy's token budget), ``max_thinking_tokens`` (any other policy's token cap). ``probe_fcs``: see
:mod:`controller.probe_policy` for ``probe_confident``, ``probe_confirmed``, ``probe_sure``, ``probe_solutions``,
``probe_agreed`` and ``probe_settled``.
"""

from __future__ import annotations

from typing import Final

FIRST_ANSWER: Final = "first_answer"
CONFIRMED: Final = "confirmed"
CONSISTENT: Final = "consistent"
LOOP: Final = "loop"
BUDGET: Final = "budget"
MAX_THINKING_TOKENS: Final = "max_thinking_tokens"
PROBE_CONFIDENT: Final = "probe_confident"
PROBE_CONFIRMED: Final = "probe_confirmed"
PROBE_SURE: Final = "probe_sure"
PROBE_SOLUTIONS: Final = "probe_solutions"
PROBE_AGREED: Final = "probe_agreed"
PROBE_SETTLED: Final = "probe_settled"

#: every reason a policy can give
STOP_REASONS: Final = (
    FIRST_ANSWER, CONFIRMED, CONSISTENT, LOOP, BUDGET, MAX_THINKING_TOKENS, PROBE_CONFIRMED, PROBE_SURE, PROBE_AGREED,
    PROBE_SOLUTIONS, PROBE_SETTLED, PROBE_CONFIDENT,
)  # fmt: skip
