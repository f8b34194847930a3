"""How the calibration does on data it was not calibrated on: ``dev-probes``, tune half -> holdout half.

With the product's simulator (:mod:`controller.offline.simulate`, exact against replay) every candidate of
``controller.offline.calibrate.family()``, the default ``probe_fcs`` and the rules of ``probe_reference_rules.py`` run on
every trace once; then, from those outcomes:
1. ``table``: calibrate on the tune half per model at each risk (Learn-then-Test, delta 0.05, label model), the
   DEER family (``family("deer")``) calibrated the same way, and both evaluated on the holdout half per model and
   dataset group: answers changed %, accuracy change (points), harmful stops %, net saved % (probe tokens
   charged), beside ``probe_fcs`` and the reference rules on the same traces;
2. ``resplits``: 200 random problem-level tune/holdout splits; per risk, the share of (split, model) pairs
   whose holdout change rate exceeds the risk, and the mean holdout net saved of both families;
3. ``no-confidence``: the same with every wait probe's confidence taken away: holdout net saved per model.

Run: ``python benchmarks/calibration_acceptance.py ../shared/data/traces/dev-probes.jsonl.gz --cache
/tmp/cases.json.gz --outcomes /tmp/outcomes.npz --jobs 2`` (the first run records and simulates every trace:
tens of minutes on two cores; later runs read both caches and take seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_reference_rules  # noqa: E402

from controller.offline.calibrate import (  # noqa: E402
    Candidate,
    Evaluation,
    calibrate,
    evaluate,
    family,
    learn_then_test,
)
from controller.offline.replay import TUNE, default_tokenizer_root, load_traces, split_of  # noqa: E402
from controller.offline.simulate import load_or_build  # noqa: E402
from controller.policies import ProbeFcsConfig  # noqa: E402

RISKS = (0.01, 0.02, 0.03, 0.05)
DELTA = 0.05
DEFAULT = Candidate("probe_fcs (default)", "default", 1.0, ProbeFcsConfig())


def evaluations(args: argparse.Namespace, cases: list[dict[str, Any]]) -> tuple[Evaluation, Evaluation]:
    """The family plus the default rule on every case, with and without confidence (cached in ``--outcomes``)."""
    candidates = [*family(), DEFAULT]
    key = hashlib.sha256(json.dumps([[c["id"], c["total"]] for c in cases] + [repr(c) for c in candidates]).encode())
    path = Path(args.outcomes)
    if path.exists():
        stored = np.load(path, allow_pickle=False)
        if str(stored["key"]) == key.hexdigest():
            return _from_arrays(cases, candidates, stored, ""), _from_arrays(cases, candidates, stored, "nc_")
    with_conf = evaluate(cases, candidates, args.jobs)
    without = evaluate(cases, candidates, args.jobs, confidence=False)
    arrays = {"key": np.array(key.hexdigest())}
    for prefix, evaluation in (("", with_conf), ("nc_", without)):
        for name in ("stop_tokens", "probe_tokens", "changed", "correct"):
            arrays[prefix + name] = getattr(evaluation, name)
    np.savez_compressed(path, **arrays)
    return with_conf, without


def _from_arrays(cases: list[dict[str, Any]], candidates: list[Candidate], stored: Any, prefix: str) -> Evaluation:
    return Evaluation(
        candidates=candidates,
        ids=[c["id"] for c in cases],
        models=[c["model"] for c in cases],
        datasets=[c["dataset"] for c in cases],
        problems=[c["problem"] for c in cases],
        totals=np.array([c["total"] for c in cases], dtype=np.int64),
        full_ok=np.array([c["full_ok"] for c in cases], dtype=bool),
        stop_tokens=stored[prefix + "stop_tokens"],
        probe_tokens=stored[prefix + "probe_tokens"],
        changed=stored[prefix + "changed"].astype(bool),
        correct=stored[prefix + "correct"].astype(bool),
    )


def subset(evaluation: Evaluation, indices: list[int]) -> Evaluation:
    """The evaluation of some candidates only."""
    return Evaluation(
        candidates=[evaluation.candidates[i] for i in indices],
        ids=evaluation.ids,
        models=evaluation.models,
        datasets=evaluation.datasets,
        problems=evaluation.problems,
        totals=evaluation.totals,
        full_ok=evaluation.full_ok,
        stop_tokens=evaluation.stop_tokens[indices],
        probe_tokens=evaluation.probe_tokens[indices],
        changed=evaluation.changed[indices],
        correct=evaluation.correct[indices],
    )


Rows = dict[str, np.ndarray]  # per trace: stop_tokens, probe_tokens, changed, correct


def candidate_rows(evaluation: Evaluation, index: int) -> Rows:
    return {
        "stop": evaluation.stop_tokens[index],
        "probe": evaluation.probe_tokens[index],
        "changed": evaluation.changed[index],
        "correct": evaluation.correct[index],
    }


def calibrated_rows(evaluation: Evaluation, calibration: dict[str, Any], risk: float) -> Rows:
    """Per trace, the outcome of its model's level ``risk`` (off: the trace runs to its end, no probes)."""
    names = {c.name: i for i, c in enumerate(evaluation.candidates)}
    rows = {
        "stop": evaluation.totals.copy(),
        "probe": np.zeros_like(evaluation.totals),
        "changed": np.zeros(len(evaluation.ids), dtype=bool),
        "correct": evaluation.full_ok.copy(),
    }
    for model, entry in calibration["models"].items():
        level = next(level for level in entry["levels"] if level["risk"] == risk)
        if not level["certified"]:
            continue
        index = names[level["candidate"]]
        mine = np.array([m == model for m in evaluation.models])
        for key, source in candidate_rows(evaluation, index).items():
            rows[key] = np.where(mine, source, rows[key])
    return rows


def reference_rows(cases: list[dict[str, Any]], name: str) -> Rows:
    """A rule of ``probe_reference_rules.py`` on the cases (its stop and probe tokens; graded as replay grades)."""
    rule = probe_reference_rules.RULES[name]
    stop, probe, changed, correct = [], [], [], []
    for case in cases:
        at, answer, spent, _probes = rule({"wait_probes": case["wait_probes"], "probes": case["dense"]})
        probe.append(spent)
        if at is None or at >= case["total"]:
            stop.append(case["total"])
            changed.append(False)
            correct.append(case["full_ok"])
        else:
            stop.append(at)
            changed.append(not case["agrees"].get(answer, False))
            correct.append(bool(case["graded"].get(answer, False)))
    return {
        "stop": np.array(stop),
        "probe": np.array(probe),
        "changed": np.array(changed),
        "correct": np.array(correct),
    }


def figures(rows: Rows, evaluation: Evaluation, mask: np.ndarray) -> dict[str, float]:
    n = int(mask.sum())
    total = int(evaluation.totals[mask].sum())
    full_ok, correct = evaluation.full_ok[mask], rows["correct"][mask]
    return {
        "n": n,
        "changed": 100 * float(rows["changed"][mask].mean()),
        "delta": 100 * (int(correct.sum()) - int(full_ok.sum())) / n,
        "harmful": 100 * float((full_ok & ~correct).mean()),
        "net": 100 * (total - int(rows["stop"][mask].sum()) - int(rows["probe"][mask].sum())) / total,
    }


def groups(evaluation: Evaluation, holdout: np.ndarray) -> dict[str, np.ndarray]:
    """Holdout traces per model: math500, amc23+aime24, all."""
    result = {}
    datasets = np.array(evaluation.datasets)
    for model in sorted(set(evaluation.models)):
        mine = holdout & np.array([m == model for m in evaluation.models])
        result[f"{model} math500"] = mine & (datasets == "math500")
        result[f"{model} amc23+aime24"] = mine & (datasets != "math500")
        result[f"{model} all"] = mine
    return result


def table(args: argparse.Namespace, cases: list[dict[str, Any]], evaluation: Evaluation) -> None:
    tune = np.array([split_of({"id": i}) == TUNE for i in evaluation.ids])
    select = list(np.flatnonzero(tune))
    full = calibrate(evaluation_of_family(evaluation, "all"), RISKS, DELTA, select=select)
    deer = calibrate(evaluation_of_family(evaluation, "deer"), RISKS, DELTA, select=select)
    rules: dict[str, Rows] = {}
    for risk in RISKS:
        rules[f"calibrated@{100 * risk:g}%"] = calibrated_rows(evaluation, full, risk)
    for risk in RISKS:
        rules[f"deer-calibrated@{100 * risk:g}%"] = calibrated_rows(evaluation, deer, risk)
    rules["probe_fcs (default)"] = candidate_rows(evaluation, len(evaluation.candidates) - 1)
    for name in probe_reference_rules.RULES:
        rules[name] = reference_rows(cases, name)
    print(
        f"holdout half ({int((~tune).sum())} traces); calibrated on the tune half ({len(select)} traces), delta {DELTA}"
    )
    print("| group | rule | n | changed % | Δ pts | harmful % | net saved % |")
    print("|---|---|---|---|---|---|---|")
    for group, mask in groups(evaluation, ~tune).items():
        for name, rows in rules.items():
            f = figures(rows, evaluation, mask)
            print(
                f"| {group} | {name} | {f['n']} | {f['changed']:.2f} | {f['delta']:+.2f} | {f['harmful']:.2f} | {f['net']:.1f} |"
            )
    print("\nchosen on the tune half (calibrated family | DEER family):")
    for model in full["models"]:
        for level, other in zip(full["models"][model]["levels"], deer["models"][model]["levels"], strict=True):
            print(f"  {model} @ {level['risk']:g}: {level['candidate']} (bound {100 * level['bound']:.2f}%) | "
                  f"{other['candidate']} (bound {100 * other['bound']:.2f}%)")  # fmt: skip


def evaluation_of_family(evaluation: Evaluation, name: str) -> Evaluation:
    """The candidates of ``family(name)`` only (never the default rule appended last)."""
    names = {c.name for c in family(name)}
    return subset(evaluation, [i for i, c in enumerate(evaluation.candidates) if c.name in names])


def resplits(evaluation: Evaluation, count: int, seed: int, one_seed: bool = False) -> None:
    """Random problem-level half splits: the holdout change rate against the risk, and mean holdout savings.
    ``one_seed``: of each problem and model only one trace (a random seed) is used, on both sides, so that no two
    traces share a problem (independent requests, as the binomial test assumes)."""
    rng = np.random.default_rng(seed)
    problems = sorted(set(evaluation.problems))
    problem_index = np.array([problems.index(p) for p in evaluation.problems])
    models = sorted(set(evaluation.models))
    families = {name: evaluation_of_family(evaluation, name) for name in ("all", "deer")}
    exceed = {(name, risk): 0 for name in families for risk in RISKS}
    saved: dict[tuple[str, float, str], list[float]] = {
        (name, risk, model): [] for name in families for risk in RISKS for model in models
    }
    pairs = 0
    for _ in range(count):
        tune_problems = rng.permutation(len(problems))[: len(problems) // 2]
        tune = np.isin(problem_index, tune_problems)
        kept = np.ones(len(evaluation.ids), dtype=bool)
        if one_seed:
            order = rng.permutation(len(evaluation.ids))
            seen: set[tuple[int, str]] = set()
            kept[:] = False
            for index in order:
                key = (int(problem_index[index]), evaluation.models[index])
                if key not in seen:
                    seen.add(key)
                    kept[index] = True
        for model in models:
            mine = np.array([m == model for m in evaluation.models]) & kept
            fit, held = np.flatnonzero(tune & mine), np.flatnonzero(~tune & mine)
            pairs += 1
            for name, sub in families.items():
                losses, net = sub.losses("model"), sub.net_saved()
                groups = [sub.problems[i] for i in fit]
                choices = learn_then_test(losses[:, fit], net[:, fit], sub.totals[fit], RISKS, DELTA, groups)
                for choice in choices:
                    if choice.chosen is None:
                        rate, gain = 0.0, 0.0
                    else:
                        rate = float(losses[choice.chosen, held].mean())
                        gain = float(net[choice.chosen, held].sum() / sub.totals[held].sum())
                    saved[name, choice.risk, model].append(100 * gain)
                    if rate > choice.risk:
                        exceed[name, choice.risk] += 1
    what = "one random seed per problem and model" if one_seed else "every seed"
    print(
        f"\n{count} random problem-level tune/holdout splits x {len(models)} models = {pairs} calibrations per risk ({what})"
    )
    print("| risk A | holdout change rate > A: calibrated family | DEER family | mean holdout net saved %: "
          "calibrated family | DEER family |")  # fmt: skip
    print("|---|---|---|---|---|")
    for risk in RISKS:
        mine, deer = (np.mean([saved[name, risk, model] for model in models]) for name in ("all", "deer"))
        print(f"| {100 * risk:g}% | {exceed['all', risk]}/{pairs} = {exceed['all', risk] / pairs:.3f} | "
              f"{exceed['deer', risk] / pairs:.3f} | {mine:.1f} | {deer:.1f} |")  # fmt: skip
    print("\nper model, mean holdout net saved % (calibrated family / DEER family):")
    print("| model | " + " | ".join(f"A={100 * risk:g}%" for risk in RISKS) + " |")
    print("|---|" + "---|" * len(RISKS))
    for model in models:
        cells = [
            f"{np.mean(saved['all', risk, model]):.1f} / {np.mean(saved['deer', risk, model]):.1f}" for risk in RISKS
        ]
        print(f"| {model} | " + " | ".join(cells) + " |")


def no_confidence(evaluation: Evaluation, plain: Evaluation) -> None:
    tune = np.array([split_of({"id": i}) == TUNE for i in evaluation.ids])
    select = list(np.flatnonzero(tune))
    calibration = calibrate(evaluation_of_family(evaluation, "all"), RISKS, DELTA, select=select)
    print("\nwith every wait probe's confidence taken away: calibrated on the tune half, holdout net saved %")
    print("| model | " + " | ".join(f"A={100 * r:g}%" for r in RISKS) + " | probe_fcs (default) |")
    print("|---|" + "---|" * (len(RISKS) + 1))
    for model in sorted(set(evaluation.models)):
        mask = ~tune & np.array([m == model for m in evaluation.models])
        cells = []
        for risk in RISKS:
            f = figures(calibrated_rows(evaluation, calibration, risk), evaluation, mask)
            cells.append(f"{f['net']:.1f} (changed {f['changed']:.2f})")
        default = figures(candidate_rows(evaluation, len(evaluation.candidates) - 1), evaluation, mask)
        print(f"| {model} | " + " | ".join(cells) + f" | {default['net']:.1f} |")
    for model, entry in calibration["models"].items():
        print(f"  {model}: " + "; ".join(f"{level['risk']:g} -> {level['candidate']}" for level in entry["levels"]))
    names = {c.name: i for i, c in enumerate(evaluation.candidates)}
    print("what probing costs without confidence (holdout; probe tokens per trace, net saved %):")
    for model in sorted(set(evaluation.models)):
        mask = ~tune & np.array([m == model for m in evaluation.models])
        cells = []
        for name in ("deer 0.999", "deer+backoff 0.999", "probe_fcs (default)"):
            index = names[name]
            rows = candidate_rows(evaluation, index)
            cells.append(f"{name}: {rows['probe'][mask].mean():.0f} tok, {figures(rows, evaluation, mask)['net']:.1f}%")
        print(f"  {model}: " + "; ".join(cells))
    del plain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", help="dev-probes.jsonl.gz")
    parser.add_argument("--cache", required=True, help="case cache (controller.offline.simulate.load_or_build)")
    parser.add_argument("--outcomes", required=True, help="npz file keeping every candidate's outcomes")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--resplits", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    traces = list(load_traces([args.traces]))
    cases = load_or_build(traces, str(default_tokenizer_root(args.traces)), None, args.jobs, args.cache)
    evaluation, without = evaluations(args, cases)
    table(args, cases, evaluation)
    resplits(evaluation, args.resplits, args.seed)
    resplits(evaluation, args.resplits, args.seed, one_seed=True)
    no_confidence(without, evaluation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
