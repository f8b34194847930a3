"""Aggregate replay results into per-(dataset, model) and total figures, a markdown table, JSON and a plot.

Figures per policy and group:
- ``acc_full`` / ``acc_stop``: accuracy (%) of the full trace's answer and of the answer at the stop;
  ``acc_delta``: their difference in points (stop - full).
- ``agreement``: % of traces whose answer at the stop equals the full trace's answer; ``changed``: the rest
  (answers the stop changed, shown beside the accuracy), ``changed_count`` their number.
- ``harmful``: % of traces where the full trace is right and the answer at the stop is wrong.
- ``tokens_full`` / ``tokens_stop``: reasoning tokens summed over traces; ``saved``: % of the full tokens
  not generated; ``probe_tokens``: tokens the policy's answer probes decoded; ``saved_net``: ``saved`` with
  those probe tokens charged; ``probes``: probes per trace; ``fallback``: traces without probe data that
  ran the text-only fallback; ``vs_oracle``: tokens at stop / tokens up to the first correct solution, over the traces
  where a correct solution was found.
- ``solutions``: mean solutions per trace; ``outcome_eff`` / ``process_eff``: mean efficiencies (see
  :mod:`controller.offline.efficiency`); ``reasons``: stops by reason.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from controller.offline.replay import TraceResult

TOTAL = "ALL"


def summarize(results: Sequence[TraceResult], policy: str) -> dict[str, Any]:
    """Figures of one policy over a group of traces."""
    count = len(results)
    outcomes = [next(o for o in result.outcomes if o.policy == policy) for result in results]
    tokens_full = sum(result.tokens for result in results)
    tokens_stop = sum(outcome.tokens for outcome in outcomes)
    with_oracle = [(r, o) for r, o in zip(results, outcomes, strict=True) if r.first_correct_tokens is not None]
    oracle_tokens = sum(r.first_correct_tokens or 0 for r, _ in with_oracle)
    outcome_effs = [r.outcome_efficiency for r in results if r.outcome_efficiency is not None]
    harmful = sum(r.correct and not o.correct for r, o in zip(results, outcomes, strict=True))
    return {
        "policy": policy,
        "traces": count,
        "acc_full": _pct(sum(r.correct for r in results), count),
        "acc_stop": _pct(sum(o.correct for o in outcomes), count),
        "acc_delta": _pct(sum(o.correct for o in outcomes) - sum(r.correct for r in results), count),
        "agreement": _pct(sum(o.agrees for o in outcomes), count),
        "changed": _pct(sum(not o.agrees for o in outcomes), count),
        "changed_count": sum(not o.agrees for o in outcomes),
        "harmful": _pct(harmful, count),
        "harmful_count": harmful,
        "tokens_full": tokens_full,
        "tokens_stop": tokens_stop,
        "saved": _pct(tokens_full - tokens_stop, tokens_full),
        "probe_tokens": sum(outcome.probe_tokens for outcome in outcomes),
        "saved_net": _pct(tokens_full - tokens_stop - sum(o.probe_tokens for o in outcomes), tokens_full),
        "probes": round(sum(o.probes for o in outcomes) / count, 2) if count else 0.0,
        "fallback": sum(o.fallback for o in outcomes),
        "oracle_tokens": oracle_tokens,
        "vs_oracle": round(sum(o.tokens for _, o in with_oracle) / oracle_tokens, 3) if oracle_tokens else None,
        "solutions": round(sum(r.solutions for r in results) / count, 2) if count else 0.0,
        "outcome_eff": round(sum(outcome_effs) / len(outcome_effs), 3) if outcome_effs else None,
        "process_eff": round(sum(r.process_efficiency for r in results) / count, 3) if count else None,
        "stopped": sum(o.stopped for o in outcomes),
        "reasons": dict(Counter(o.reason for o in outcomes)),
    }


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def group_results(results: Iterable[TraceResult]) -> dict[str, list[TraceResult]]:
    """Traces grouped by ``dataset/model``, plus every trace under ``ALL``."""
    groups: dict[str, list[TraceResult]] = defaultdict(list)
    for result in results:
        groups[f"{result.dataset}/{result.model}"].append(result)
        groups[TOTAL].append(result)
    return dict(sorted(groups.items(), key=lambda item: (item[0] == TOTAL, item[0])))


def build_report(results: Sequence[TraceResult], policies: Sequence[str]) -> dict[str, Any]:
    groups = group_results(results)
    return {
        "policies": list(policies),
        "groups": {
            name: {policy: summarize(members, policy) for policy in policies} for name, members in groups.items()
        },
    }


COLUMNS = [
    ("group", "group"),
    ("policy", "policy"),
    ("traces", "n"),
    ("acc_full", "acc full %"),
    ("acc_stop", "acc stop %"),
    ("acc_delta", "Δ pts"),
    ("changed", "changed %"),
    ("agreement", "agree %"),
    ("harmful", "harmful %"),
    ("tokens_full", "tok full"),
    ("tokens_stop", "tok stop"),
    ("saved", "saved %"),
    ("saved_net", "net saved %"),
    ("probes", "probes/trace"),
    ("fallback", "text-only"),
    ("vs_oracle", "tok/oracle"),
    ("solutions", "sol/trace"),
    ("outcome_eff", "outcome eff"),
    ("process_eff", "process eff"),
    ("reasons", "stops by reason"),
]


def markdown_table(report: dict[str, Any], groups: Sequence[str] | None = None) -> str:
    """A markdown table: one row per group and policy (``groups`` limits the rows)."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, by_policy in report["groups"].items():
        if groups is not None and name not in groups:
            continue
        for policy in report["policies"]:
            row = {"group": name, **by_policy[policy]}
            cells = []
            for key, _title in COLUMNS:
                value = row[key]
                if key == "reasons":
                    value = ", ".join(f"{reason} {n}" for reason, n in sorted(value.items()))
                elif key == "acc_delta" and value is not None and value > 0:
                    value = f"+{value}"  # a gain shows its sign, as a loss does
                cells.append("" if value is None else str(value))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Tokens saved (%) against accuracy at the stop (%), one point per policy, for all traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = report["groups"][TOTAL]
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*X"
    for index, policy in enumerate(report["policies"]):  # a legend entry per policy: labels never overlap points
        figures = total[policy]
        axes.scatter(figures["saved"], figures["acc_stop"], s=60, marker=markers[index % len(markers)], label=policy)
    first = total[report["policies"][0]]
    axes.axhline(first["acc_full"], linestyle="--", color="grey", label="full-trace accuracy")
    axes.set_xlabel("reasoning tokens saved (%)")
    axes.set_ylabel("accuracy at stop (%)")
    axes.set_title(f"thinkbrake replay: {first['traces']} traces")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
