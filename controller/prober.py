"""The probe side of a probing controller: "Wait"s in the thinking become probe requests, probe results go to the
``probe_fcs`` runtime.

Invariant: a result with an unknown or repeated id changes nothing.
"""

from __future__ import annotations

from controller.probe_policy import ProbeRuntime
from controller.probes import WAIT, ProbeRequest, ProbeResult, WaitScanner


class Prober:
    def __init__(self, runtime: ProbeRuntime) -> None:
        self.runtime = runtime
        self._waits = WaitScanner()

    def requests(self, thinking: str, before: int) -> list[ProbeRequest]:
        """The probes to send after ``thinking`` (fed from thinking token ``before`` on)."""
        for trigger_tokens, offset in self._waits.feed(thinking, before):
            self.runtime.trigger(WAIT, trigger_tokens, offset)
        return self.runtime.take_requests()

    def take(self, result: ProbeResult, tokens: int, offset: int) -> bool:
        """Give the runtime one result, arriving at ``tokens``/``offset``; False for an unknown or repeated id."""
        return self.runtime.result(result, tokens, offset)
