"""Calibrating the stop rule to a risk the user sets: Learn-then-Test over a family of ``probe_fcs`` settings.

The loss of a request under a candidate rule is 1 when the rule changes its answer: with label ``model``, the
answer at the stop differs from the full trace's own final answer (no ground truth needed); with label
``reference``, the full trace's answer was right and the answer at the stop is wrong (a harmful stop).

Procedure (Learn-then-Test, Angelopoulos et al., arXiv 2110.01052), per model, for each risk level A:
1. The calibration traces are split by problem (:func:`order_part`): the *ordering* part (``ORDER_FRACTION`` of
   the problems) and the *testing* part.
2. On the ordering part the candidates are ranked: the path is the Pareto front of (change rate, net saved),
   from the safest to the boldest; candidates that save nothing net of their probes are left out.
3. On the testing part each candidate on the path is tested in that order (fixed-sequence testing) for
   H0: risk > A with the binomial tail p-value ``scipy.stats.binom.cdf(k, n, A)`` (k changed answers of n);
   it is accepted while p <= delta, and the walk stops at the first candidate that fails.
4. Of the accepted candidates the one that saves the most thinking tokens net of probe tokens on all the
   calibration traces is chosen; with none accepted, the level holds ``off``.

Invariant: every accepted candidate has risk <= A with probability >= 1 - delta over the draw of the testing
part (the path never looks at the testing part's losses); ``bound`` is the Clopper-Pearson upper
``1 - delta`` bound of the chosen candidate's change rate on the testing part (<= A exactly when p <= delta).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta, binom

from controller.calibration import FORMAT, VERSION
from controller.policies import ProbeFcsConfig
from controller.simulate import Case, Equality, simulate

ORDER_FRACTION = 0.3
MODEL_LABEL = "model"
REFERENCE_LABEL = "reference"
METHOD = "learn-then-test: path ordered on a problem split, fixed-sequence binomial tests (scipy) on the rest"


@dataclass(frozen=True)
class Candidate:
    """One operating point of the family: a ``probe_fcs`` config, its family (``deer`` or ``probe_fcs``)."""

    name: str
    family: str
    config: ProbeFcsConfig


def deer(tau: float, backoff: int = 0) -> Candidate:
    """The single confident wait probe: stop at the first wait probe of confidence >= ``tau`` (DEER)."""
    config = ProbeFcsConfig(
        confidence=tau, alone_confidence=tau, confirm_confidence=1.0, sure_confidence=1.0, agree_confidence=1.0,
        solution_agree=0, settle_agree=0, backoff=backoff,
    )  # fmt: skip
    return Candidate(f"deer {tau}" + (f" backoff{backoff}" if backoff else ""), "deer", config)


DEER_TAUS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9999, 0.99995, 0.99999)


def family(name: str = "all") -> list[Candidate]:
    """The candidates: ``deer`` (the single-threshold family) or ``all`` (``deer`` with and without back-off,
    and ``probe_fcs`` over its confirmation thresholds, the lone confident probe, the dense-probe checks, and
    the probe schedule: start, spacing, back-off)."""
    candidates = [deer(tau) for tau in DEER_TAUS]
    if name == "deer":
        return candidates
    candidates += [deer(tau, 3) for tau in DEER_TAUS]
    grid = itertools.product((0.5, 0.9, 0.99), (0.99, 0.999, 0.9999), (0.99, 0.999, 1.0), (1.0, 0.9999, 0.999), (0, 3))
    for conf, confirm, sure, alone, backoff in grid:
        if alone < 1.0 and alone < conf:
            continue
        config = ProbeFcsConfig(
            confidence=conf, confirm_confidence=confirm, sure_confidence=sure, alone_confidence=alone, backoff=backoff
        )
        name_ = f"fcs conf{conf} confirm{confirm} sure{sure} alone{alone}" + (f" backoff{backoff}" if backoff else "")
        candidates.append(Candidate(name_, "probe_fcs", config))
    base = {"backoff": 3}
    variants: dict[str, dict[str, Any]] = {
        "no dense check": {"agree_confidence": 1.0},
        "no settle": {"settle_agree": 0},
        "early settle": {"settle_tokens": 4096, "settle_spacing": 256},
        "solutions 3": {"solution_agree": 3},
        "no solutions": {"solution_agree": 0},
        "from 512 tokens": {"min_probe_tokens": 512},
        "from 1024 tokens": {"min_probe_tokens": 1024},
        "spacing 256": {"probe_spacing": 256},
        "spacing 512": {"probe_spacing": 512},
        "backoff 1": {"backoff": 1},
        "backoff 6": {"backoff": 6},
        "backoff 3 from 1024": {"backoff_tokens": 1024},
        "20 probes": {"max_probes": 20},
    }
    for label, changes in variants.items():
        for conf in (0.9, 0.99):
            config = ProbeFcsConfig(**{"confidence": conf, **base, **changes})
            candidates.append(Candidate(f"fcs conf{conf} {label}", "probe_fcs", config))
    return candidates


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
    from tqdm import tqdm

    bar = tqdm(total=len(cases), desc="simulating candidates", unit="trace", file=sys.stderr, disable=not progress)
    per_case: list[list[tuple[int, int, bool, bool]]] = []
    if jobs <= 1:
        _init_sim(candidates, confidence)
        for raw in cases:
            per_case.append(_run_case(raw))
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, initializer=_init_sim, initargs=(candidates, confidence)) as pool:
            for rows in pool.map(_run_case, cases, chunksize=8):
                per_case.append(rows)
                bar.update()
    bar.close()
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


def order_part(problems: Sequence[str], fraction: float = ORDER_FRACTION, salt: str = "order") -> np.ndarray:
    """True for the traces of the ordering part: a stable hash of ``salt/problem`` below ``fraction``."""
    cut = int(round(fraction * 2**32))
    return np.array(
        [int.from_bytes(hashlib.sha256(f"{salt}/{p}".encode()).digest()[:4], "big") < cut for p in problems],
        dtype=bool,
    )


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


def path_order(loss_rate: np.ndarray, net: np.ndarray) -> list[int]:
    """The fixed-sequence path: the Pareto front of (lower change rate, higher net saved), safest first; only
    candidates with a positive net saving. Ties in rate keep the higher saving."""
    order = sorted(range(len(net)), key=lambda i: (loss_rate[i], -net[i], i))
    path: list[int] = []
    best = 0.0
    for index in order:
        if net[index] > best:
            path.append(index)
            best = float(net[index])
    return path


@dataclass(frozen=True)
class Step:
    """One tested candidate on the path: its losses on the testing part, p-value, bound, net saved (all data)."""

    candidate: int
    losses: int
    n: int
    p_value: float
    bound: float
    net_saved: float
    accepted: bool


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
    ordering: np.ndarray,
    risks: Sequence[float],
    delta: float,
) -> list[Choice]:
    """Learn-then-Test on one model's traces (columns): ``losses`` and ``net`` are (candidates, traces),
    ``ordering`` marks the ordering part. See the module docstring."""
    testing = ~ordering
    n_order, n_test = int(ordering.sum()), int(testing.sum())
    if n_order == 0 or n_test == 0:
        return [Choice(risk, [], None) for risk in risks]
    rate = losses[:, ordering].mean(axis=1)
    saved_order = net[:, ordering].sum(axis=1) / max(1, int(totals[ordering].sum()))
    path = path_order(rate, saved_order)
    test_losses = losses[:, testing].sum(axis=1)
    saved_all = net.sum(axis=1) / max(1, int(totals.sum()))
    choices = []
    for risk in risks:
        steps = []
        for index in path:
            k = int(test_losses[index])
            p = p_value(k, n_test, risk)
            accepted = p <= delta
            steps.append(Step(index, k, n_test, p, upper_bound(k, n_test, delta), float(saved_all[index]), accepted))
            if not accepted:
                break
        accepted_steps = [step for step in steps if step.accepted and step.net_saved > 0]
        chosen = max(accepted_steps, key=lambda step: step.net_saved).candidate if accepted_steps else None
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
        ordering = order_part([evaluation.problems[i] for i in mine])
        choices = learn_then_test(
            losses_all[:, mine], net_all[:, mine], evaluation.totals[mine], ordering, risks, delta
        )
        say(f"\n{model}: {len(mine)} traces ({int(ordering.sum())} order the path, {int((~ordering).sum())} test it)")
        levels = []
        for choice in choices:
            say(f"  risk {choice.risk:g}: {len(choice.steps)} candidates tested")
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
        return {"risk": choice.risk, "policy": {"policy": "off"}, "candidate": "off (nothing certified)",
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
        "net_saved": round(step.net_saved, 6),
    }
