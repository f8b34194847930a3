"""Reference stop rules replayed on recorded answer probes, next to a ``thinkbrake replay`` report.

Computes, on the traces of ``dev-probes`` (optionally one half of the problems, ``--split``), per dataset and
pooled, net of the probes' decode tokens:
- ``deer>0.999`` / ``deer>0.995``: stop at the first wait probe whose confidence exceeds 0.999 (0.995)
  (DEER-style);
- ``2wait>0.95``: stop when two consecutive wait probes agree and the second's confidence exceeds 0.95;
- ``dynasor-3`` / ``dynasor-8``: stop when 3 (8) consecutive dense probes agree and are certain;
- ``oracle``: stop at the first dense probe whose answer is correct (the limit; no probe cost).
A probe whose answer is empty (its ``\\boxed{`` not closed within its token limit: a long answer such as a
matrix) gives no answer to submit: no rule stops on it, and it breaks an agreement.
A probe's result arrives ``out_tokens + 1`` tokens after it was asked; the stop is there. Grading is the one
``thinkbrake replay`` uses (the last ``\\boxed{}`` of the full trace, math-verify equivalence).
With ``--replay report.json`` (``thinkbrake replay --json`` on the same traces) the replayed policies are
added to the same table.

Run: ``python benchmarks/probe_reference_rules.py ../shared/data/traces/dev-probes.jsonl.gz --split holdout
--replay holdout.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.answers import last_boxed  # noqa: E402
from controller.offline.replay import Tokenizers, default_tokenizer_root, load_traces, split_of  # noqa: E402
from controller.verify import AnswerComparer  # noqa: E402

CACHE_VERSION = 2  # raise when a rule changes: ``--cache`` files of another version are not used
Stop = tuple[int | None, str | None, int, int]  # (stop position or None, answer, probe tokens, probes)


def given(answer: str | None) -> bool:
    """Whether a probe gave an answer to submit (not none, not empty)."""
    return answer is not None and answer.strip() != ""


def first_over(trace: dict[str, Any], threshold: float = 0.995) -> Stop:
    spent = 0
    for index, (tokens, _offset, answer, confidence, out) in enumerate(trace["wait_probes"], 1):
        spent += out
        if confidence > threshold and given(answer):
            return tokens + out + 1, answer, spent, index
    return None, None, spent, len(trace["wait_probes"])


def two_agree(trace: dict[str, Any], threshold: float = 0.95) -> Stop:
    spent, previous = 0, None
    for index, (tokens, _offset, answer, confidence, out) in enumerate(trace["wait_probes"], 1):
        spent += out
        if given(answer) and answer == previous and confidence > threshold:
            return tokens + out + 1, answer, spent, index
        previous = answer
    return None, None, spent, len(trace["wait_probes"])


def dynasor(trace: dict[str, Any], k: int) -> Stop:
    spent, run, previous = 0, 0, None
    for index, (tokens, _offset, answer, certain, out) in enumerate(trace["probes"], 1):
        spent += out
        certain = certain and given(answer)
        run = run + 1 if certain and answer == previous else (1 if certain else 0)
        previous = answer if certain else None
        if run >= k:
            return tokens + out + 1, answer, spent, index
    return None, None, spent, len(trace["probes"])


RULES: dict[str, Callable[[dict[str, Any]], Stop]] = {
    "deer>0.999": lambda trace: first_over(trace, 0.999),
    "deer>0.995": first_over,
    "2wait>0.95": two_agree,
    "dynasor-3": lambda trace: dynasor(trace, 3),
    "dynasor-8": lambda trace: dynasor(trace, 8),
}


def group_names(dataset: str) -> list[str]:
    names = [dataset, "ALL"]
    if dataset in ("amc23", "aime24"):
        names.append("amc23+aime24")
    return names


def reference_results(
    trace: dict[str, Any], tokenizers: Tokenizers, correct: Callable[[str | None, str], bool]
) -> tuple[int, bool, dict[str, tuple[int, bool, int, int]]]:
    """Thinking tokens, full-trace correctness, and (stop, correct, probe tokens, probes) per reference rule."""
    reference = str(trace["reference"])
    full = last_boxed(trace.get("final") or "") or last_boxed(trace["thinking"])
    full_ok = correct(full, reference)
    total = len(tokenizers.get(trace["tokenizer"]).encode(trace["thinking"], add_special_tokens=False).ids)
    results: dict[str, tuple[int, bool, int, int]] = {}
    for name, rule in RULES.items():
        stop, answer, spent, probes = rule(trace)
        if stop is None or stop >= total:
            results[name] = (total, full_ok, spent, probes)
        else:
            results[name] = (stop, correct(answer, reference), spent, probes)
    oracle = next((p for p in trace["probes"] if correct(p[2], reference)), None)
    results["oracle"] = (min(total, oracle[0]), True, 0, 0) if oracle else (total, full_ok, 0, 0)
    return total, full_ok, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", help="dev-probes.jsonl.gz")
    parser.add_argument("--split", choices=["all", "tune", "holdout"], default="all")
    parser.add_argument("--replay", help="a `thinkbrake replay --json` report on the same traces")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--cache", help="JSON file keeping the reference rules' per-trace results between runs")
    args = parser.parse_args()
    comparer = AnswerComparer()
    tokenizers = Tokenizers(default_tokenizer_root(args.traces))
    replayed: dict[str, dict[str, Any]] = {}
    policies: list[str] = []
    if args.replay:
        report = json.loads(Path(args.replay).read_text())
        policies = report["policies"]
        replayed = {trace["id"]: trace for trace in report["traces"]}
    cache: dict[tuple[str, str], bool] = {}

    def correct(answer: str | None, reference: str) -> bool:
        if answer is None:
            return False
        if (answer, reference) not in cache:
            cache[answer, reference] = comparer.equal(answer, reference)
        return cache[answer, reference]

    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0] * 7))
    stored = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).exists() else {}
    # results cached by another version of the rules are computed again
    cached: dict[str, Any] = stored.get("traces", {}) if stored.get("version") == CACHE_VERSION else {}
    computed: dict[str, Any] = {}
    count = 0
    for trace in load_traces([args.traces]):
        if args.split != "all" and split_of(trace) != args.split:
            continue
        if args.limit and count >= args.limit:
            break
        count += 1
        if trace["id"] in cached:
            total, full_ok, results = cached[trace["id"]]
        else:
            total, full_ok, results = reference_results(trace, tokenizers, correct)
        computed[trace["id"]] = (total, full_ok, results)
        outcome_by_policy = {o["policy"]: o for o in replayed.get(trace["id"], {}).get("outcomes", [])}
        for policy in policies:
            if policy in outcome_by_policy:
                o = outcome_by_policy[policy]
                results[policy] = (o["tokens"], o["correct"], o["probe_tokens"], o["probes"])
        for group in group_names(trace["dataset"]):
            for name, (stop, ok, spent, probes) in results.items():
                row = rows[group][name]
                for index, value in enumerate((1, total, stop, spent, full_ok, ok, full_ok and not ok)):
                    row[index] += value
                rows[group].setdefault(name + "#probes", [0.0] * 7)[0] += probes
    if args.cache:
        Path(args.cache).write_text(json.dumps({"version": CACHE_VERSION, "traces": computed}))
    print(f"{count} traces (split {args.split}); net saved % charges every probe's decode tokens")
    print("| group | rule | n | acc full % | Δ pts | harmful % | net saved % | probe tok/trace | probes/trace |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = ["math500", "amc23", "aime24", "amc23+aime24", "ALL"]
    for group in order:
        if group not in rows:
            continue
        for name in [*policies, *RULES, "oracle"]:
            if name not in rows[group]:
                continue
            n, total, stop, spent, full_ok, ok, harmful = rows[group][name]
            probes = rows[group].get(name + "#probes", [0.0])[0]
            print(
                f"| {group} | {name} | {int(n)} | {100 * full_ok / n:.1f} | {100 * (ok - full_ok) / n:+.2f} | "
                f"{100 * harmful / n:.2f} | {100 * (total - stop - spent) / total:.1f} | {spent / n:.0f} | "
                f"{probes / n:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
