"""Holding a stop decision until the model visibly goes on thinking (see :mod:`controller.session`).

A decision whose stop point is followed by non-whitespace thinking text is committed at once. One that is not
(the whitespace after it may begin the model's own end of thinking) is held *pending*: the next thinking text
that is not whitespace commits it, past the stop point; the end of thinking drops it.

Invariant: at most one decision is pending; a committed pending decision's ``tokens`` count the thinking
tokens up to the delta before the one that committed it.
"""

from __future__ import annotations

import dataclasses

from controller.policies import StopDecision


class HeldStop:
    def __init__(self) -> None:
        self.pending: StopDecision | None = None
        self._pending_at = 0

    def offer(self, decision: StopDecision, visible_end: int, thinking_tokens: int) -> bool:
        """True: commit ``decision`` now (text after its stop point shows the model goes on: the thinking's last
        non-whitespace character ends at ``visible_end``); False: it is held."""
        if visible_end > decision.offset:
            return True
        self.pending = decision  # the whitespace may begin the end of thinking: wait for the next text
        self._pending_at = thinking_tokens
        return False

    def resolve(self, thinking: str, thinking_done: bool, thinking_tokens: int) -> StopDecision | None:
        """With a decision pending and the next delta's thinking: the decision to commit now (the delta lies past
        its stop point), or None (still held, or dropped because the model closed its thinking)."""
        pending = self.pending
        if pending is None or thinking_done:
            self.pending = None
            return None
        if not thinking.strip():
            return None
        self.pending = None
        return dataclasses.replace(pending, tokens=pending.tokens + thinking_tokens - self._pending_at)
