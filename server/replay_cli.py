"""``thinkbrake replay``: stream recorded traces through the controller and report savings and accuracy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from controller.calibration import CalibrationError, load_calibration, policy_for
from controller.offline.parallel import map_with_progress
from controller.offline.replay import (
    TraceResult,
    default_tokenizer_root,
    has_probe_data,
    init_worker,
    load_traces,
    replay_in_worker,
    split_of,
)
from controller.offline.report import TOTAL, build_report, markdown_table, plot
from controller.policies import DEFAULT_POLICY, POLICIES, PolicyConfig, PolicyError, parse_policy

ALL_POLICIES_ARGS = {"budget": {"max_thinking_tokens": 4096}}


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "replay",
        help="evaluate stop policies on recorded reasoning traces",
        description=(
            "Stream each trace's thinking token by token through the controller (as the server would) and "
            "report, per dataset/model and in total: accuracy of the full trace and at the stop, answers changed "
            "by the stop (and agreement), "
            "harmful stops, reasoning tokens saved, tokens vs the oracle, solutions per trace and efficiencies."
        ),
    )
    parser.add_argument("traces", nargs="+", help="trace files (.jsonl or .jsonl.gz)")
    parser.add_argument(
        "--policy",
        action="append",
        help=f"policy to evaluate (repeatable; default {DEFAULT_POLICY}; 'all' = every policy): {', '.join(POLICIES)}",
    )
    parser.add_argument(
        "--policy-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="policy argument, e.g. k=3 or consistency.k=3 (an unqualified one applies to every policy that takes it)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder (or tokenizer.json) to use for every trace")
    parser.add_argument(
        "--tokenizers-root", help="folder with one tokenizer folder per name (default: beside the traces)"
    )
    parser.add_argument("--json", dest="json_out", help="write the full report as JSON here")
    parser.add_argument("--plot", help="draw tokens saved vs accuracy per policy into this PNG")
    parser.add_argument(
        "--split",
        choices=["all", "tune", "holdout"],
        default="all",
        help="replay only one half of the problems (by a hash of dataset/question-index; every model and seed "
        "of a problem is on the same side): 'tune' to choose rules on, 'holdout' to report on (default all)",
    )
    parser.add_argument("--limit", type=int, help="replay only the first N traces")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    parser.add_argument("--all-groups", action="store_true", help="print every dataset/model row, not just totals")
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="replay a calibration (thinkbrake calibrate): each trace runs its model's entry, as row "
        "'calibrated@A' (a model the file does not hold runs the default policy); --policy adds rows",
    )
    parser.add_argument(
        "--risk",
        action="append",
        type=float,
        metavar="A",
        help="with --calibration: the risk level to replay (repeatable; default: the file's default_risk)",
    )
    parser.set_defaults(run=run)


def build_configs(names: list[str] | None, raw_args: list[str]) -> list[PolicyConfig]:
    """Policy configs from ``--policy`` names and ``--policy-arg`` pairs; PolicyError on bad input."""
    if not names:
        names = [DEFAULT_POLICY]
    if "all" in names:
        names = list(POLICIES)
    overrides: dict[str | None, dict[str, str]] = {}
    for item in raw_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise PolicyError("--policy-arg", f"expected K=V, got {item!r}")
        scope, dot, field = key.rpartition(".")
        overrides.setdefault(scope if dot else None, {})[field] = value
    configs = []
    for name in dict.fromkeys(names):
        cls = POLICIES.get(name)
        fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
        data: dict[str, Any] = {"policy": name, **ALL_POLICIES_ARGS.get(name, {})}
        data.update({k: v for k, v in overrides.get(None, {}).items() if k in fields})
        data.update(overrides.get(name, {}))
        configs.append(parse_policy(data))
    return configs


def run(args: argparse.Namespace) -> int:
    calibration: dict[str, Any] | None = None
    try:
        if args.calibration:
            calibration = load_calibration(args.calibration)
        configs = build_configs(args.policy, args.policy_arg) if args.policy or not calibration else []
    except (PolicyError, CalibrationError) as error:
        print(f"thinkbrake replay: {error}", file=sys.stderr)
        return 2
    if args.risk and calibration is None:
        print("thinkbrake replay: --risk needs --calibration", file=sys.stderr)
        return 2
    for path in args.traces:
        if not Path(path).exists():
            print(f"thinkbrake replay: no such trace file: {path}", file=sys.stderr)
            return 2
    traces = list(load_traces(args.traces))
    if args.split != "all":
        traces = [trace for trace in traces if split_of(trace) == args.split]
    if args.limit:
        traces = traces[: args.limit]
    root = args.tokenizers_root or str(default_tokenizer_root(args.traces[0]))
    policies = [config.name for config in configs]
    if calibration is None:
        results = replay_all(traces, configs, root, args.tokenizer, args.jobs)
        report = build_report(results, policies)
        report["configs"] = [config.as_dict() for config in configs]
    else:
        risks = args.risk or [float(calibration.get("default_risk", 0.0))]
        results, used = replay_calibration(traces, configs, calibration, risks, root, args.tokenizer, args.jobs)
        policies += [calibrated_name(risk) for risk in risks]
        report = build_report(results, policies)
        report["configs"] = [config.as_dict() for config in configs]
        report["calibrated"] = used
    print(markdown_table(report, None if args.all_groups else [TOTAL]))
    without = sum(not has_probe_data(trace) for trace in traces)
    if without and any(config.uses_probes for config in configs):
        print(
            f"{without} of {len(traces)} traces carry no probe data: probe policies ran their text-only "
            "fallback (fcs_reflection) on them (column 'text-only')."
        )
    if args.json_out:
        report["traces"] = [dataclasses.asdict(result) for result in results]
        Path(args.json_out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json_out}", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def calibrated_name(risk: float) -> str:
    """The report row of a calibration replayed at ``risk``."""
    return f"calibrated@{100 * risk:g}%"


def replay_calibration(
    traces: list[dict[str, Any]],
    configs: list[PolicyConfig],
    calibration: dict[str, Any],
    risks: list[float],
    root: str,
    tokenizer: str | None,
    jobs: int,
) -> tuple[list[TraceResult], dict[str, dict[str, Any]]]:
    """Replay ``configs`` and, per trace, its model's calibrated policy at each of ``risks`` (outcomes named
    :func:`calibrated_name`); results keep the input order. Also returns, per model and row, the config used."""
    by_model: dict[str, list[int]] = {}
    for index, trace in enumerate(traces):
        by_model.setdefault(str(trace.get("model", "?")), []).append(index)
    results: list[TraceResult | None] = [None] * len(traces)
    used: dict[str, dict[str, Any]] = {}
    for model, indices in by_model.items():
        calibrated = [policy_for(calibration, model, risk) for risk in risks]
        if any(config is None for config in calibrated):
            print(f"{model}: not in the calibration: its rows run the default policy {DEFAULT_POLICY}", file=sys.stderr)
        chosen = [config or parse_policy({}) for config in calibrated]
        used[model] = {calibrated_name(risk): config.as_dict() for risk, config in zip(risks, chosen, strict=True)}
        group = replay_all([traces[i] for i in indices], [*configs, *chosen], root, tokenizer, jobs)
        for index, result in zip(indices, group, strict=True):
            for outcome, risk in zip(result.outcomes[len(configs) :], risks, strict=True):
                outcome.policy = calibrated_name(risk)
            results[index] = result
    return [result for result in results if result is not None], used


def replay_all(
    traces: list[dict[str, Any]], configs: list[PolicyConfig], root: str, tokenizer: str | None, jobs: int
) -> list[TraceResult]:
    """Replay traces in ``jobs`` processes with a progress bar; results keep the input order."""
    return map_with_progress(replay_in_worker, traces, jobs, init_worker, (root, tokenizer, configs), "replay")
