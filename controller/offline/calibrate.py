"""Calibrating the stop rule to a risk the user sets: Learn-then-Test over a family of ``probe_fcs`` settings.

The loss of a request under a candidate rule is 1 when the rule changes its answer: with label ``model``, the
answer at the stop differs from the full trace's own final answer (no ground truth needed); with label
``reference``, the full trace's answer was right and the answer at the stop is wrong (a harmful stop).

The family (:func:`family`): DEER's lone confident probe and ``probe_fcs``'s confirmations (the previous probe,
the thinking's own answer, two of its solutions, a dense probe on the same prefix; a lone ten-times-surer probe)
with every threshold at ``tau``, with the probe schedule (back-off, spacing, a later start), over the fixed grid
``TAUS``. The walk is fixed before any calibration data is seen: threshold by threshold from the safest down,
and at each threshold the structures in ``STRUCTURES`` order (the confirmed ones, which stop later than a lone
probe of the same threshold, first; plain DEER last).

Procedure (Learn-then-Test, Angelopoulos et al., arXiv 2110.01052, with fixed-sequence testing), per model and
risk level A: walk the candidates in that order, testing H0: risk > A; accept while p <= delta and stop at the
first candidate that fails. Of the accepted candidates the one that saves the most thinking tokens net of probe
tokens is chosen; with none accepted (or none saving anything), the level holds ``off``.

The test's unit is the problem. When every trace answers its own problem (recorded traffic), the p-value is the
binomial tail ``scipy.stats.binom.cdf(k, n, A)`` (k changed answers among n traces). When a problem has several
traces (seeds), they are not independent (a problem one seed's stop gets wrong, others often do too): each
problem's loss is then the mean of its traces' losses, in [0, 1], and the p-value is Hoeffding-Bentkus's over the
n problems (the bound Learn-then-Test gives for bounded losses; binomial tails from scipy).

Invariant: with calibration problems exchangeable with future requests, every accepted candidate has risk <= A
with probability >= 1 - delta (the walk does not depend on the data); ``bound`` is the matching upper ``1 - delta``
bound of the chosen candidate's change rate (Clopper-Pearson, or the inverted Hoeffding-Bentkus test), <= A exactly
when p <= delta.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta, binom

from controller.calibration import FORMAT, VERSION
from controller.offline.parallel import map_with_progress
from controller.offline.simulate import Case, Equality, simulate
from controller.policies import ProbeFcsConfig

MODEL_LABEL = "model"
REFERENCE_LABEL = "reference"
METHOD = (
    "learn-then-test: fixed-sequence tests along a fixed walk, safest first; per problem (binomial tail, or "
    "Hoeffding-Bentkus over problems with several traces; scipy)"
)


@dataclass(frozen=True)
class Candidate:
    """One operating point: a ``probe_fcs`` config, the structure it belongs to and its threshold ``tau`` there
    (a structure's candidates, by ``tau`` from high to low, go from the safest to the boldest)."""

    name: str
    structure: str
    tau: float
    config: ProbeFcsConfig


#: the thresholds of every structure, from the safest down (a fixed grid: the order the tests walk)
TAUS = (0.99999, 0.99995, 0.9999, 0.9995, 0.999, 0.998, 0.997, 0.995, 0.99, 0.98, 0.95, 0.9)


def deer(tau: float, **schedule: int) -> ProbeFcsConfig:
    """The single confident wait probe: stop at the first wait probe of confidence >= ``tau`` (DEER), with the
    probe schedule ``schedule`` (``backoff``, ``probe_spacing``, ``min_probe_tokens``)."""
    return ProbeFcsConfig(
        confidence=tau, alone_confidence=tau, confirm_confidence=1.0, sure_confidence=1.0, agree_confidence=1.0,
        solution_agree=0, settle_agree=0, **schedule,
    )  # fmt: skip


def confirmed(tau: float, settle: bool, alone: bool, **schedule: int) -> ProbeFcsConfig:
    """``probe_fcs`` with every confidence threshold at ``tau``: a probe of at least ``tau`` stops when the
    previous probe, the thinking's own answer, two of its solutions or a dense probe confirms it; ``alone``: one
    ten times surer (``1 - (1 - tau) / 10``) stops on its own; ``settle``: settle probes in long thinking."""
    return ProbeFcsConfig(
        confidence=tau, confirm_confidence=tau, sure_confidence=tau, agree_confidence=tau,
        alone_confidence=1 - (1 - tau) / 10 if alone else 1.0, settle_agree=3 if settle else 0, **schedule,
    )  # fmt: skip


#: the structures, in the order the walk takes them at each threshold (the safest first)
STRUCTURES: dict[str, Callable[[float], ProbeFcsConfig]] = {
    "confirmed+backoff": lambda tau: confirmed(tau, settle=False, alone=False, backoff=3),
    "confirmed+alone+backoff": lambda tau: confirmed(tau, settle=False, alone=True, backoff=3),
    "deer+backoff+from 512": lambda tau: deer(tau, backoff=3, min_probe_tokens=512),
    "deer+backoff+spacing": lambda tau: deer(tau, backoff=3, probe_spacing=256),
    "deer+backoff": lambda tau: deer(tau, backoff=3),
    "deer": lambda tau: deer(tau),
}


def family(name: str = "all") -> list[Candidate]:
    """The candidates in the order of the walk (see the module docstring): ``all``, or ``deer`` (the
    single-threshold family alone, threshold by threshold)."""
    structures = ["deer"] if name == "deer" else list(STRUCTURES)
    return [
        Candidate(f"{structure} {tau}", structure, tau, STRUCTURES[structure](tau))
        for tau in TAUS
        for structure in structures
    ]


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class Evaluation:
    """Every candidate on every case: arrays of shape (candidates, cases), and per-case facts."""

    candidates: list[Candidate]
    ids: list[str]
    models: list[str]
    datasets: list[str]
    problems: list[str]
    totals: np.ndarray  # thinking tokens of the full trace
    full_ok: np.ndarray
    stop_tokens: np.ndarray  # thinking tokens at the stop (the total without a stop)
    probe_tokens: np.ndarray
    changed: np.ndarray  # the answer differs from the full trace's own
    correct: np.ndarray  # the answer at the stop is right

    def losses(self, label: str) -> np.ndarray:
        """Per candidate and case, 1 when the rule changed the answer (``model``) or made it wrong (``reference``)."""
        if label == REFERENCE_LABEL:
            return np.asarray(self.full_ok[None, :] & ~self.correct, dtype=np.int64)
        return np.asarray(self.changed, dtype=np.int64)

    def net_saved(self) -> np.ndarray:
        """Thinking tokens not decoded minus probe tokens, per candidate and case."""
        return np.asarray(self.totals[None, :] - self.stop_tokens - self.probe_tokens)


class _Sim:
    candidates: list[Candidate]
    equal: Equality
    confidence: bool


_sim = _Sim()


def _init_sim(candidates: list[Candidate], confidence: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _sim.candidates = candidates
    _sim.equal = Equality()
    _sim.confidence = confidence


def _run_case(raw: dict[str, Any]) -> list[tuple[int, int, bool, bool]]:
    case = Case.of(raw)
    rows = []
    for candidate in _sim.candidates:
        outcome = simulate(case, candidate.config, _sim.equal, _sim.confidence)
        rows.append((outcome.tokens, outcome.probe_tokens, outcome.changed, outcome.correct))
    return rows


def evaluate(
    cases: Sequence[dict[str, Any]],
    candidates: list[Candidate],
    jobs: int = 1,
    confidence: bool = True,
    progress: bool = True,
) -> Evaluation:
    """Simulate every candidate on every case (``jobs`` processes, a progress bar on stderr).
    ``confidence`` False: every wait probe's confidence is taken away (a backend without log-probabilities)."""
    per_case = map_with_progress(
        _run_case, cases, jobs, _init_sim, (candidates, confidence), "simulating candidates", progress, chunksize=8
    )
    table = np.array(per_case, dtype=np.int64).transpose(1, 0, 2) if per_case else np.zeros((len(candidates), 0, 4))
    return Evaluation(
        candidates=candidates,
        ids=[str(raw["id"]) for raw in cases],
        models=[str(raw["model"]) for raw in cases],
        datasets=[str(raw["dataset"]) for raw in cases],
        problems=[str(raw["problem"]) for raw in cases],
        totals=np.array([int(raw["total"]) for raw in cases], dtype=np.int64),
        full_ok=np.array([bool(raw["full_ok"]) for raw in cases], dtype=bool),
        stop_tokens=table[:, :, 0],
        probe_tokens=table[:, :, 1],
        changed=table[:, :, 2].astype(bool),
        correct=table[:, :, 3].astype(bool),
    )


# ------------------------------------------------------------------------------------------ learn then test


def p_value(losses: int, n: int, risk: float) -> float:
    """Binomial tail p-value of H0 "risk > ``risk``" after ``losses`` losses in ``n`` requests."""
    return float(binom.cdf(losses, n, risk))


def upper_bound(losses: int, n: int, delta: float) -> float:
    """Clopper-Pearson upper ``1 - delta`` confidence bound of a rate seen as ``losses`` in ``n``."""
    if n == 0:
        return 1.0
    if losses >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, losses + 1, n - losses))


def hb_p_value(mean: float, n: int, risk: float) -> float:
    """Hoeffding-Bentkus p-value of H0 "risk > ``risk``" for ``n`` independent losses in [0, 1] of mean ``mean``
    (Bates et al., arXiv 2101.02703, the p-value Learn-then-Test uses for bounded losses): the smaller of
    Hoeffding's ``exp(-n h(mean, risk))`` and Bentkus's ``e * P(Binomial(n, risk) <= ceil(n * mean))``."""
    if n == 0 or mean >= risk:
        return 1.0
    kl = (mean * math.log(mean / risk) if mean > 0 else 0.0) + (1 - mean) * math.log((1 - mean) / (1 - risk))
    bentkus = math.e * float(binom.cdf(math.ceil(n * mean - 1e-9), n, risk))
    return min(1.0, math.exp(-n * kl), bentkus)


def hb_upper_bound(mean: float, n: int, delta: float) -> float:
    """The smallest risk the Hoeffding-Bentkus test rejects at ``delta`` (bisection; the p-value falls as the risk
    grows): an upper ``1 - delta`` confidence bound of the mean loss."""
    if n == 0:
        return 1.0
    low, high = mean, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if hb_p_value(mean, n, middle) <= delta:
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class Step:
    """One tested candidate on the path: its losses (changed traces) among ``n`` traces of ``problems`` problems,
    p-value, bound, net saved."""

    candidate: int
    losses: int
    n: int
    p_value: float
    bound: float
    net_saved: float
    accepted: bool
    problems: int = 0


@dataclass(frozen=True)
class Choice:
    """The outcome of Learn-then-Test at one risk level: the steps walked and the chosen candidate (None: off)."""

    risk: float
    steps: list[Step]
    chosen: int | None


def learn_then_test(
    losses: np.ndarray,
    net: np.ndarray,
    totals: np.ndarray,
    risks: Sequence[float],
    delta: float,
    groups: Sequence[str] | None = None,
) -> list[Choice]:
    """Learn-then-Test on one model's traces (columns): ``losses`` and ``net`` are (candidates, traces), the
    candidates in the order of the walk. ``groups`` names each trace's problem: traces of one problem (several
    seeds) are not independent, so the test's unit is then the problem (see the module docstring)."""
    n_traces = losses.shape[1]
    if n_traces == 0:
        return [Choice(risk, [], None) for risk in risks]
    saved = net.sum(axis=1) / max(1, int(totals.sum()))
    labels = np.asarray(list(groups) if groups is not None else range(n_traces))
    names, index = np.unique(labels, return_inverse=True)
    grouped = len(names) < n_traces
    if grouped:  # per problem, the mean loss of its traces: independent losses in [0, 1]
        sums = np.zeros((losses.shape[0], len(names)))
        np.add.at(sums.T, index, losses.T)
        means = (sums / np.bincount(index, minlength=len(names))).mean(axis=1)
    counts = losses.sum(axis=1)
    n = len(names) if grouped else n_traces
    choices = []
    for risk in risks:
        steps = []
        for candidate in range(losses.shape[0]):
            k = int(counts[candidate])
            if grouped:
                p, bound = (
                    hb_p_value(float(means[candidate]), n, risk),
                    hb_upper_bound(float(means[candidate]), n, delta),
                )
            else:
                p, bound = p_value(k, n, risk), upper_bound(k, n, delta)
            steps.append(Step(candidate, k, n_traces, p, bound, float(saved[candidate]), p <= delta, n))
            if p > delta:
                break
        accepted = [step for step in steps if step.accepted and step.net_saved > 0]
        chosen = max(accepted, key=lambda step: step.net_saved).candidate if accepted else None
        choices.append(Choice(risk, steps, chosen))
    return choices


def calibrate(
    evaluation: Evaluation,
    risks: Sequence[float],
    delta: float = 0.05,
    label: str = MODEL_LABEL,
    hashes: dict[str, str] | None = None,
    select: Sequence[int] | None = None,
    report: Callable[[str], None] | None = None,
    default_risk: float | None = None,
) -> dict[str, Any]:
    """The calibration (see :mod:`controller.calibration`) of every model in ``evaluation`` (only the cases in
    ``select``, when given); ``report`` receives the printed lines (candidates on the path, the choices).
    ``default_risk`` (the level a request gets when it names none) defaults to the first of ``risks``."""
    say = report or (lambda line: None)
    columns = np.arange(len(evaluation.ids)) if select is None else np.asarray(select, dtype=np.int64)
    losses_all, net_all = evaluation.losses(label), evaluation.net_saved()
    models: dict[str, Any] = {}
    for model in sorted({evaluation.models[i] for i in columns}):
        mine = np.array([i for i in columns if evaluation.models[i] == model], dtype=np.int64)
        groups = [evaluation.problems[i] for i in mine]
        choices = learn_then_test(losses_all[:, mine], net_all[:, mine], evaluation.totals[mine], risks, delta, groups)
        say(f"\n{model}: {len(mine)} traces")
        levels = []
        for choice in choices:
            say(f"  risk {choice.risk:g}: {len(choice.steps)} candidates tested, in the order of the walk")
            say("    changed %  bound %  net saved %  p-value  candidate")
            for step in choice.steps:
                mark = "" if step.accepted else "   <- fails: the walk stops"
                say(
                    f"    {100 * step.losses / step.n:8.2f}  {100 * step.bound:7.2f}  {100 * step.net_saved:11.2f}  "
                    f"{step.p_value:7.4f}  {evaluation.candidates[step.candidate].name}{mark}"
                )
            levels.append(_level(evaluation, choice, label))
            chosen = levels[-1]
            say(
                f"  chosen at risk {choice.risk:g}: {chosen['candidate']} (changed {100 * chosen['changed']:.2f}%, "
                f"bound {100 * chosen['bound']:.2f}%, net saved {100 * chosen['net_saved']:.2f}%)"
            )
        models[model] = {
            "traces": len(mine),
            "data_sha256": (hashes or {}).get(model, ""),
            "levels": levels,
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": METHOD,
        "delta": delta,
        "label": label,
        "default_risk": risks[0] if default_risk is None else default_risk,
        "models": models,
    }


def _level(evaluation: Evaluation, choice: Choice, label: str) -> dict[str, Any]:
    """One level of a model's entry (the chosen candidate's step, or off)."""
    step = next((s for s in choice.steps if s.candidate == choice.chosen), None)
    if choice.chosen is None or step is None:
        n = choice.steps[0].n if choice.steps else 0
        why = "no certified rule saves tokens" if any(s.accepted for s in choice.steps) else "nothing certified"
        return {"risk": choice.risk, "policy": {"policy": "off"}, "candidate": f"off ({why})",
                "certified": False, "changed": 0.0, "bound": 0.0, "n": n, "net_saved": 0.0}  # fmt: skip
    candidate = evaluation.candidates[choice.chosen]
    return {
        "risk": choice.risk,
        "policy": candidate.config.as_dict(),
        "candidate": candidate.name,
        "certified": True,
        "changed": round(step.losses / step.n, 6),
        "bound": round(step.bound, 6),
        "n": step.n,
        "problems": step.problems,
        "net_saved": round(step.net_saved, 6),
    }
