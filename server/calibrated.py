"""Serving a calibration (``thinkbrake serve --calibration FILE``): which calibrated level a request runs.

A request gets a level of the served model's entry in the file (:func:`controller.calibration.level_for`):

- ``"thinkbrake": {"risk": A}``: the largest level at or below ``A`` (below every level: ``off``);
- ``reasoning_effort`` ``low`` / ``medium`` (and no ``thinkbrake`` policy or risk): the loosest / the tightest
  level the file holds for the model (``high`` stays ``off``: no early stop);
- otherwise the server's ``--risk``, else the file's ``default_risk``.

Invariant: a level is chosen only for a model the file has an entry for; for any other model
:meth:`ServedCalibration.choose` returns None and the server's own default policy applies. Pure lookups: no I/O
after the file is read at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.calibration import default_calibration, level_for, load_calibration, risk_levels

#: ``--calibration default``: the calibration shipped with thinkbrake (``controller/calibrations/default.json``)
SHIPPED = "default"


@dataclass(frozen=True)
class Level:
    """The level a request runs: its risk and the policy config dict (as the file holds it)."""

    risk: float
    policy: dict[str, Any]


class ServedCalibration:
    def __init__(self, calibration: dict[str, Any], source: str, risk: float | None = None) -> None:
        self.calibration = calibration
        self.source = source
        self.risk = risk  # the server's default level (None: the file's default_risk)

    @classmethod
    def load(cls, source: str, risk: float | None = None) -> ServedCalibration:
        """Read ``source`` (a path, or ``default`` for the shipped file); CalibrationError if it is not usable."""
        calibration = default_calibration() if source == SHIPPED else load_calibration(source)
        return cls(calibration, source, risk)

    def levels(self, model: str) -> list[float]:
        """The risk levels the file holds for ``model``, ascending (empty: no entry)."""
        return risk_levels(self.calibration, model)

    def choose(self, model: str, risk: float | None = None, effort: str | None = None) -> Level | None:
        """The level for a request to ``model`` asking ``risk`` (or ``effort``; see the module docstring)."""
        levels = self.levels(model)
        if not levels:
            return None
        if risk is None and effort in ("low", "medium"):
            risk = levels[-1] if effort == "low" else levels[0]
        level = level_for(self.calibration, model, self.risk if risk is None else risk)
        return None if level is None else Level(float(level["risk"]), dict(level["policy"]))
