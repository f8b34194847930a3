"""The calibration file: per model, the stop policy to run at each risk level the file holds.

A calibration (``thinkbrake calibrate``, :mod:`controller.offline.calibrate`) is a JSON object::

    {"format": "thinkbrake-calibration", "version": 1,
     "delta": 0.05, "label": "model", "method": "...", "default_risk": 0.02,
     "models": {"<model>": {"traces": 1368, "data_sha256": "...",
                            "levels": [{"risk": 0.02, "policy": {"policy": "probe_fcs", ...},
                                        "candidate": "...", "certified": true, "changed": 0.006,
                                        "bound": 0.017, "n": 912, "net_saved": 0.31}, ...]}}}

Each level's ``policy`` is a policy config dict (:func:`controller.policies.parse_policy`) whose rate of changed
answers is at most ``risk`` with probability at least ``1 - delta`` (over the calibration draw), on traffic like
the calibration traces of that model; ``bound`` is the upper ``1 - delta`` confidence bound of that rate measured
on ``n`` traces. A level with nothing certified holds the ``off`` policy (never stops early: it changes no answer).

:func:`policy_for` is what a server calls per request: pure, no I/O.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from controller.policies import OffConfig, PolicyConfig, parse_policy

FORMAT = "thinkbrake-calibration"
VERSION = 1


class CalibrationError(ValueError):
    """A calibration file that cannot be used (the message says what is wrong)."""


def validate(calibration: dict[str, Any]) -> dict[str, Any]:
    """``calibration`` itself when it is a usable calibration of this format, else CalibrationError: every level
    has a risk in (0, 1) and a policy that parses."""
    if not isinstance(calibration, dict) or calibration.get("format") != FORMAT:
        raise CalibrationError(f"not a {FORMAT} file")
    if calibration.get("version") != VERSION:
        raise CalibrationError(f"version {calibration.get('version')!r}: this thinkbrake reads version {VERSION}")
    models = calibration.get("models")
    if not isinstance(models, dict):
        raise CalibrationError("no 'models' object")
    for model, entry in models.items():
        levels = entry.get("levels") if isinstance(entry, dict) else None
        if not isinstance(levels, list):
            raise CalibrationError(f"model {model!r}: no 'levels' list")
        for level in levels:
            risk = level.get("risk")
            if not isinstance(risk, (int, float)) or not 0.0 < float(risk) < 1.0:
                raise CalibrationError(f"model {model!r}: risk {risk!r} is not in (0, 1)")
            try:
                parse_policy(dict(level.get("policy") or {}))
            except ValueError as error:
                raise CalibrationError(f"model {model!r}, risk {risk}: bad policy: {error}") from None
    return calibration


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read and validate a calibration file (CalibrationError if it is not one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CalibrationError(f"{path}: {error}") from None
    return validate(data)


def default_calibration() -> dict[str, Any]:
    """The calibration shipped with thinkbrake (``controller/calibrations/default.json``)."""
    text = resources.files("controller").joinpath("calibrations/default.json").read_text(encoding="utf-8")
    return validate(json.loads(text))


def model_entry(calibration: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The entry of ``model``: its exact name, else the same name ignoring case, else the entry whose last
    path component matches the model's (``/models/Qwen3-8B`` finds ``Qwen/Qwen3-8B``); None if none."""
    models: dict[str, Any] = calibration.get("models", {})
    if model in models:
        return dict(models[model])
    lowered = {name.lower(): entry for name, entry in models.items()}
    if model.lower() in lowered:
        return dict(lowered[model.lower()])
    tail = model.rstrip("/").rsplit("/", 1)[-1].lower()
    matches = [entry for name, entry in models.items() if name.rstrip("/").rsplit("/", 1)[-1].lower() == tail]
    return dict(matches[0]) if len(matches) == 1 else None


def risk_levels(calibration: dict[str, Any], model: str) -> list[float]:
    """The risk levels the file holds for ``model``, ascending (empty when the model is unknown)."""
    entry = model_entry(calibration, model)
    return sorted(float(level["risk"]) for level in entry["levels"]) if entry else []


def level_for(calibration: dict[str, Any], model: str, risk: float | None = None) -> dict[str, Any] | None:
    """The level of ``model``'s entry to run at ``risk`` (None: the file's ``default_risk``): the largest level the
    file holds at or below ``risk``; below every level, an uncertified ``off`` level at ``risk`` (no level that safe
    was certified, so no early stop). None when the file has no entry for the model. Pure: no I/O."""
    entry = model_entry(calibration, model)
    if entry is None:
        return None
    wanted = float(calibration.get("default_risk", 0.0) if risk is None else risk)
    held = [level for level in entry["levels"] if float(level["risk"]) <= wanted + 1e-12]
    if not held:
        return {"risk": wanted, "policy": {"policy": "off"}, "candidate": "off (below every level)", "certified": False}
    return dict(max(held, key=lambda item: float(item["risk"])))


def policy_for(calibration: dict[str, Any], model: str, risk: float | None = None) -> PolicyConfig | None:
    """The policy config to run for ``model`` at ``risk`` (see :func:`level_for`; None when the file has no entry
    for the model: the caller keeps its own default). Pure: the same answer for the same arguments."""
    level = level_for(calibration, model, risk)
    if level is None:
        return None
    policy = dict(level["policy"])
    return OffConfig() if policy.get("policy") == "off" else parse_policy(policy)
