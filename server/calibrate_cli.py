"""``thinkbrake calibrate``: choose, per model, the stop rule that saves the most at a risk the user sets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from controller.offline.calibrate import MODEL_LABEL, REFERENCE_LABEL, calibrate, evaluate, family
from controller.offline.replay import default_tokenizer_root, has_probe_data, load_traces, split_of
from controller.offline.simulate import data_hash, load_or_build

DESCRIPTION = """\
For each model in the traces, choose the answer-probe stop rule (a probe_fcs setting) that saves the most
thinking tokens net of probe tokens while the share of requests whose answer it changes stays at most A with
probability at least 1 - D. A changed answer is one that differs from the full trace's own final answer
(--label model: no ground truth needed) or, with --label reference, a right answer made wrong by the stop.

How: every candidate is simulated on each trace with replay's accounting (probe tokens charged). The
candidates: the single confident wait probe (DEER-style: stop at the first probe of confidence >= tau), alone
and with the probe schedule (back-off after 3 unconfident probes in a row, 256-token spacing, no probe before
512 tokens), and probe_fcs's confirmations (the previous probe, the thinking's own answer, two of its
solutions, a dense probe; a lone ten-times-surer probe) with every threshold at tau; tau from 0.99999 down to
0.9. Per model, they are tested in a fixed order, threshold by threshold from the safest down (the confirmed
rules before the lone probe at each threshold), for H0 "risk > A", accepting while p <= D and stopping at the
first failure (Learn-then-Test with fixed-sequence testing). The unit is the problem: with one trace per
problem (recorded traffic) the p-value is the binomial tail scipy.stats.binom.cdf(k, n, A) (k changed answers
among n traces); traces of one problem (several seeds; the id's first two parts name it) fail together, so there
each problem's loss is its traces' mean and the p-value is Hoeffding-Bentkus's over the problems. The accepted
candidate that saves the most is chosen; with none accepted the level holds 'off' (no early stop).

Traces need recorded probes (the dev-probes format). Prints the candidates tested (change rate, its upper
bound, net saved, p-value) and the choice per level; writes the calibration (JSON) to --out, which
`thinkbrake replay --calibration FILE` replays.
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="choose per model the stop rule that saves the most at a risk you set (with a guarantee)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("traces", nargs="+", help="trace files with recorded probes (.jsonl or .jsonl.gz)")
    parser.add_argument(
        "--risk",
        action="append",
        type=float,
        required=True,
        metavar="A",
        help="the largest share of changed answers to allow, e.g. 0.02 (repeatable: one level each)",
    )
    parser.add_argument(
        "--delta", type=float, default=0.05, metavar="D", help="allowed probability that a level fails (0.05)"
    )
    parser.add_argument(
        "--label",
        choices=[MODEL_LABEL, REFERENCE_LABEL],
        default=MODEL_LABEL,
        help="what a changed answer is measured against: the full trace's own answer (model, default) or the "
        "reference answer (reference: a right answer made wrong)",
    )
    parser.add_argument("--out", required=True, help="write the calibration (JSON) here")
    parser.add_argument("--default-risk", type=float, help="level used when a request names none (first --risk)")
    parser.add_argument("--family", choices=["all", "deer"], default="all", help="candidate family (default all)")
    parser.add_argument("--tokenizer", help="tokenizer folder (or tokenizer.json) to use for every trace")
    parser.add_argument(
        "--tokenizers-root", help="folder with one tokenizer folder per name (default: beside the traces)"
    )
    parser.add_argument(
        "--split",
        choices=["all", "tune", "holdout"],
        default="all",
        help="calibrate on one half of the problems only (as replay splits them; default all)",
    )
    parser.add_argument("--limit", type=int, help="use only the first N traces")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    parser.add_argument(
        "--cache",
        help="keep the recorded traces (tokenized, text detector run) in this file and reuse them when the same "
        "traces are calibrated again",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for risk in args.risk:
        if not 0.0 < risk < 1.0:
            print(f"thinkbrake calibrate: --risk {risk}: must be between 0 and 1", file=sys.stderr)
            return 2
    if not 0.0 < args.delta < 1.0:
        print(f"thinkbrake calibrate: --delta {args.delta}: must be between 0 and 1", file=sys.stderr)
        return 2
    for path in args.traces:
        if not Path(path).exists():
            print(f"thinkbrake calibrate: no such trace file: {path}", file=sys.stderr)
            return 2
    traces = [trace for trace in load_traces(args.traces) if has_probe_data(trace)]
    if args.split != "all":
        traces = [trace for trace in traces if split_of(trace) == args.split]
    if args.limit:
        traces = traces[: args.limit]
    if not traces:
        print("thinkbrake calibrate: no traces with recorded probes to calibrate on", file=sys.stderr)
        return 2
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for trace in traces:
        by_model[str(trace.get("model", "?"))].append(trace)
    hashes = {model: data_hash(group) for model, group in by_model.items()}
    root = args.tokenizers_root or str(default_tokenizer_root(args.traces[0]))
    print(
        f"{len(traces)} traces of {len(by_model)} models; recording them (tokenizer, text detector) ...",
        file=sys.stderr,
    )
    cases = load_or_build(traces, root, args.tokenizer, args.jobs, args.cache)
    candidates = family(args.family)
    print(f"simulating {len(candidates)} candidate rules on {len(cases)} traces ...", file=sys.stderr)
    evaluation = evaluate(cases, candidates, args.jobs)
    calibration = calibrate(
        evaluation,
        args.risk,
        args.delta,
        args.label,
        hashes,
        report=print,
        default_risk=args.default_risk,
    )
    calibration["command"] = "thinkbrake calibrate " + " ".join(_command_words(args))
    Path(args.out).write_text(json.dumps(calibration, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _command_words(args: argparse.Namespace) -> list[str]:
    """The arguments that decide the calibration (file names as given), for the record in the file."""
    words = [*args.traces, *(f"--risk {risk:g}" for risk in args.risk), f"--delta {args.delta:g}"]
    words += [f"--label {args.label}", f"--family {args.family}"]
    if args.split != "all":
        words.append(f"--split {args.split}")
    if args.limit:
        words.append(f"--limit {args.limit}")
    return words
