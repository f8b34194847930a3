"""Search answer-probe stop rules fast: replay each trace's text detector once, then simulate rules in Python.

Step 1 (``build``, slow, once): every ``dev-probes`` trace of a split is recorded by the product's
:func:`controller.offline.simulate.record_case` (the cases ``thinkbrake calibrate`` simulates): tokenized with its
tokenizer and streamed token by token through the text detector as replay does; the detector's answer and
solution events, the "Wait" triggers (with the position where each trigger became certain), the recorded probes
and the grading of every answer against ``reference`` are written to a cache file. ``probe_fcs`` settings
themselves are simulated exactly by :func:`controller.offline.simulate.simulate` (the real runtime); the rules below
are the wider families tried on the way, simulated here.

Step 2 (``search``, seconds): candidate rules are simulated on the cache with replay's accounting: a probe
asked at position ``p`` answers at ``p + out_tokens + 1``, the stop is there (no stop if that is at or past
the end of the thinking); every probe asked before the stop is charged (also those still in flight); the
answer at the stop is the probe's; accuracy change is against the full trace's graded answer; harmful = full
trace correct and stop answer wrong. A "dense" probe (the Dynasor-family suffix, ``probe_spec(SOLUTION)``)
asked at token ``t`` gets the recorded dense probe at the latest position at or before ``t``.

Step 3 (``text``, seconds): text-only ``fcs_reflection`` variants simulated on the same cache (the detector's
answers with their explicit flag, its solutions and loops).

Step 4 (``bounds``, seconds): how often a wait probe's answer is right by its confidence (on traces whose own
answer is right), and what an oracle that never changes a trace's outcome could save at each confidence.

Run: ``python benchmarks/probe_rule_search.py build ../shared/data/traces/dev-probes.jsonl.gz --split tune
--cache /tmp/probe_sim_tune.json`` then ``python benchmarks/probe_rule_search.py search --cache
/tmp/probe_sim_tune.json`` (or ``text`` / ``bounds --cache ...``).
"""

from __future__ import annotations

import argparse
import bisect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.offline.replay import default_tokenizer_root, load_traces, split_of  # noqa: E402
from controller.offline.simulate import Equality, load_or_build, read_cases  # noqa: E402
from controller.probe_policy import plain_answer  # noqa: E402

# ---------------------------------------------------------------------------------------------- build


def build(args: argparse.Namespace) -> int:
    """Record the traces of a split into a case cache (:func:`controller.offline.simulate.record_case`)."""
    traces = [t for t in load_traces([args.traces]) if args.split == "all" or split_of(t) == args.split][: args.limit]
    cases = load_or_build(traces, str(default_tokenizer_root(args.traces)), None, args.jobs, args.cache)
    print(f"{len(cases)} traces cached in {args.cache}")
    return 0


# ---------------------------------------------------------------------------------------------- simulate

equal = Equality()


@dataclass
class Outcome:
    stop: int  # stop position (== total when the trace ran to its end)
    answer: str | None
    ok: bool
    spent: int
    probes: int


def group_of(trace: dict[str, Any]) -> str:
    """The group a trace is reported in: ``math500`` or ``amc+aime``."""
    return "math500" if trace["dataset"] == "math500" else "amc+aime"


def dense_at(trace: dict[str, Any], tokens: int) -> list[Any] | None:
    """The dense probe recorded at the latest position at or before ``tokens``."""
    positions = trace.setdefault("_dense_pos", [d[0] for d in trace["dense"]])
    index = bisect.bisect_right(positions, tokens) - 1
    return trace["dense"][index] if index >= 0 else None


def text_before(trace: dict[str, Any], tokens: int, window: int) -> list[str]:
    """Answers the text detector read at or before token ``tokens`` (the last ``window`` of them)."""
    positions = trace.setdefault("_ans_pos", [a[0] for a in trace["answers"]])
    index = bisect.bisect_right(positions, tokens)
    return [a[2] for a in trace["answers"][max(0, index - window) : index]]


def simulate(trace: dict[str, Any], decide: Callable[..., Any], max_probes: int = 30) -> Outcome:
    """Run ``decide`` over the wait probes in order of asking. ``decide(trace, index, state)`` returns None or
    ``(answer, position)``: stop there with that answer; extra probes it asks are ``(position, tokens)`` in
    ``state["extra"]`` (charged when asked at or before the stop)."""
    total = trace["total"]
    state: dict[str, Any] = {"extra": [], "history": []}
    waits: list[Any] = []  # the wait probes asked (the cap counts every probe asked before)
    state["room"] = max_probes
    for index, wait in enumerate(trace["waits"]):
        if len(waits) + sum(1 for p, _ in state["extra"] if p <= wait[0]) >= max_probes:
            break
        waits.append(wait)
        state["room"] = max_probes - len(waits) - len(state["extra"])
        stop = decide(trace, index, state)
        if stop is not None and stop[1] < total:
            answer, at = stop
            asked = [w[5] for w in waits if w[0] <= at] + [t for p, t in state["extra"] if p <= at]
            return Outcome(at, answer, trace["graded"].get(answer, False), sum(asked), len(asked))
    asked = [w[5] for w in waits] + [t for p, t in state["extra"] if p < total]
    return Outcome(total, trace["full"], trace["full_ok"], sum(asked), len(asked))


def make_rule(
    conf: float = 0.9,
    confirm: float = 0.999,
    sure: float | None = None,
    text_window: int = 8,
    text_solution: bool = False,
    dense_conf: float | None = None,
    triple: bool = False,
    min_tokens: int = 0,
    consec: bool = True,
    solutions: int = 0,
    solutions_conf: float | None = None,
) -> Callable[..., Any]:
    """A ``probe_fcs`` variant:
    - ``consec``: two consecutive counted probes (>= conf) agree and one reaches ``confirm``;
    - ``sure``: one probe >= sure whose answer the text detector reached in the last ``text_window`` answers
      before the probe's position (``text_solution``: only answers that closed a solution);
    - ``dense_conf``: one probe >= dense_conf whose answer equals a dense probe asked at the same point
      (charged); ``solutions`` (``probe_solutions``): one probe >= ``solutions_conf`` (None: ``conf``) whose
      answer at least ``solutions`` solutions closed before the probe's position reached;
      ``triple``: any wait probe, whatever its confidence, whose answer is the text detector's latest
      answer and a dense probe at the same point (charged) agrees.
    """

    def decide(trace: dict[str, Any], index: int, state: dict[str, Any]) -> str | None:
        wait = trace["waits"][index]
        position, tokens, _offset, answer, confidence, _out = wait
        arrive = position + _out + 1
        history = state["history"]
        counted = answer is not None and plain_answer(answer) and confidence >= conf and tokens >= min_tokens
        previous = history[-1] if history else None
        history.append((answer, confidence, counted))
        if solutions and answer is not None and plain_answer(answer) and tokens >= min_tokens:
            if confidence >= (conf if solutions_conf is None else solutions_conf):
                reached = [s[2] for s in trace["solutions"] if s[0] <= tokens]
                if sum(1 for text in reached if equal(text, answer)) >= solutions:
                    return answer, arrive  # every other stop of this probe is here too, with the same answer
        if not counted and not triple:
            return None
        if triple and answer is not None and plain_answer(answer) and tokens >= min_tokens:
            texts = text_before(trace, tokens, 1)
            if texts and equal(texts[0], answer) and state["room"] > 0:
                probe = dense_at(trace, tokens)
                out = 32 if probe is None else int(probe[4])
                state["extra"].append((arrive + 1, out))
                if probe is not None and probe[3] and probe[2] is not None and equal(probe[2], answer):
                    return answer, arrive + 1 + out + 1
        if not counted:
            return None
        if (
            consec
            and previous is not None
            and previous[2]
            and max(previous[1], confidence) >= confirm
            and equal(previous[0], answer)
        ):
            return answer, arrive
        if sure is not None and confidence >= sure:
            if text_solution:
                texts = [s[2] for s in trace["solutions"] if s[0] <= tokens][-text_window:]
            else:
                texts = text_before(trace, tokens, text_window)
            if any(equal(t, answer) for t in texts):
                return answer, arrive
        if dense_conf is not None and confidence >= dense_conf and state["room"] > 0:
            probe = dense_at(trace, tokens)
            out = 32 if probe is None else int(probe[4])
            state["extra"].append((arrive + 1, out))  # asked with the next token after the wait probe answers
            if probe is not None and probe[3] and probe[2] is not None and equal(probe[2], answer):
                return answer, arrive + 1 + out + 1
        return None

    return decide


def make_agreement_rule(k: int, conf: float, text: bool, dense: bool) -> Callable[..., Any]:
    """``probe_fcs`` (the released settings), plus: a wait probe whose answer equals the ``k`` wait probes
    before it (any confidence), reaching ``conf`` -- or carrying no confidence at all (a Qwen3 probe that did
    not close its thinking) -- and (``text``) the thinking's own answer among the last 3 and (``dense``) a dense
    probe on the same prefix (charged)."""
    base = make_rule(sure=0.999, text_window=3, dense_conf=0.999)

    def decide(trace: dict[str, Any], index: int, state: dict[str, Any]) -> Any:
        stop = base(trace, index, state)
        if stop is not None:
            return stop
        position, tokens, _offset, answer, confidence, out = trace["waits"][index]
        if answer is None or not plain_answer(answer) or (confidence < conf and confidence != 0.0):
            return None
        before = [entry[0] for entry in state["history"][:-1]][-k:]
        if len(before) < k or not all(other is not None and equal(other, answer) for other in before):
            return None
        if text and not any(equal(t, answer) for t in text_before(trace, tokens, 3)):
            return None
        arrive = position + out + 1
        if not dense:
            return answer, arrive
        if state["room"] <= 0:
            return None
        probe = dense_at(trace, tokens)
        cost = 32 if probe is None else int(probe[4])
        state["extra"].append((arrive + 1, cost))
        if probe is not None and probe[3] and probe[2] is not None and equal(probe[2], answer):
            return answer, arrive + 1 + cost + 1
        return None

    return decide


def dense_checks(
    trace: dict[str, Any],
    start: int,
    points: Iterator[tuple[int, int]],
    k: int,
    window: int,
    cap: int | None = None,
    solutions: int = 0,
    solutions_conf: float | None = None,
) -> Outcome:
    """The rule of the release before settle probes (with ``probe_solutions`` when ``solutions`` > 0); where it
    has not stopped by token ``start``, dense probes at ``points`` (``(position where asked, tokens before)``, in
    order; charged, at most ``cap``) and a stop when ``k`` in a row give the same certain answer, one the text
    wrote among its last ``window`` answers (``window`` 0: any)."""
    base = make_rule(sure=0.999, text_window=3, dense_conf=0.999, solutions=solutions, solutions_conf=solutions_conf)
    outcome = simulate(trace, base)
    if outcome.stop < trace["total"] and outcome.stop <= start:
        return outcome
    limit = min(outcome.stop, trace["total"])
    answers: list[str | None] = []
    spent = asked = 0
    for position, tokens in points:
        if position >= limit or (cap is not None and asked >= cap):
            break
        probe = dense_at(trace, tokens)
        cost = 32 if probe is None else int(probe[4])
        spent, asked = spent + cost, asked + 1
        answer = probe[2] if probe is not None and probe[3] and plain_answer(probe[2]) else None
        if answer is not None and window and not any(equal(t, answer) for t in text_before(trace, tokens, window)):
            answer = None
        answers.append(answer)
        arrive = position + cost + 1
        if answer is not None and len(answers) >= k and arrive < limit:
            if all(other is not None and equal(other, answer) for other in answers[-k:]):
                waits = sum(w[5] for w in trace["waits"][:30] if w[0] <= arrive)
                return Outcome(arrive, answer, trace["graded"].get(answer, False), waits + spent, asked)
    return Outcome(outcome.stop, outcome.answer, outcome.ok, outcome.spent + spent, outcome.probes + asked)


def late_outcome(trace: dict[str, Any], start: int, step: int, k: int) -> Outcome:
    """Dense probes every ``step`` tokens from ``start`` (a fixed period, no check against the text)."""
    return dense_checks(trace, start, ((p, p) for p in range(start, trace["total"], step)), k, window=0)


def settle_outcome(
    trace: dict[str, Any],
    start: int,
    spacing: int,
    k: int,
    window: int,
    cap: int = 16,
    solutions: int = 0,
    solutions_conf: float | None = None,
) -> Outcome:
    """Settle probes (``probe_settled``): from token ``start``, a dense probe at each "Wait" at least ``spacing``
    tokens after the previous one (at most ``cap``), checked against the text's last ``window``; ``solutions``:
    with ``probe_solutions`` (the default is ``settle_outcome(t, 8192, 512, 3, 2, solutions=2)``)."""

    def points() -> Iterator[tuple[int, int]]:
        last = -(10**9)
        for position, tokens, *_ in trace["waits"]:
            if tokens >= start and tokens - last >= spacing:
                last = tokens
                yield position, tokens

    return dense_checks(trace, start, points(), k, window, cap, solutions, solutions_conf)


def evaluate(
    traces: list[dict[str, Any]], decide: Callable[..., Any], outcome_of: Callable[..., Outcome] | None = None
) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = {}
    for trace in traces:
        outcome = outcome_of(trace) if outcome_of is not None else simulate(trace, decide)
        names = [group_of(trace), "ALL", trace["model"][:6]]
        for name in names:
            row = groups.setdefault(name, [0.0] * 7)
            values = (1, trace["total"], outcome.stop, outcome.spent, trace["full_ok"], outcome.ok, 0)
            for i, v in enumerate(values):
                row[i] += v
            row[6] += trace["full_ok"] and not outcome.ok
    result = {}
    for name, (n, total, stop, spent, full_ok, ok, harmful) in groups.items():
        result[name] = {
            "n": n,
            "delta": 100 * (ok - full_ok) / n,
            "harmful": 100 * harmful / n,
            "net": 100 * (total - stop - spent) / total,
        }
    return result


def candidates() -> dict[str, Callable[..., Any]]:
    """The rules compared; names give their parameters."""
    rules: dict[str, Callable[..., Any]] = {"probe_fcs 0.9/0.999 (old default)": make_rule()}
    for conf, confirm in [(0.9, 0.99), (0.9, 0.995), (0.8, 0.999), (0.95, 0.99)]:
        rules[f"consec {conf}/{confirm}"] = make_rule(conf, confirm)
    for sure in [0.99, 0.995, 0.999]:
        for window in [1, 3, 8]:
            rules[f"sure {sure} text{window}"] = make_rule(sure=sure, text_window=window, consec=False)
            rules[f"old + sure {sure} text{window}"] = make_rule(sure=sure, text_window=window)
        rules[f"old + sure {sure} solution-text3"] = make_rule(sure=sure, text_window=3, text_solution=True)
    for dense in [0.95, 0.99, 0.995, 0.999]:
        rules[f"dense-agree {dense}"] = make_rule(dense_conf=dense, consec=False)
        rules[f"old + dense-agree {dense}"] = make_rule(dense_conf=dense)
    for sure, dense in [(0.999, 0.999), (0.999, 0.998), (0.998, 0.998), (0.999, 0.997)]:
        rules[f"combo: old + sure {sure} text3 + dense-agree {dense}"] = make_rule(
            sure=sure, text_window=3, dense_conf=dense
        )
    rules["triple (any wait conf) text1 + dense"] = make_rule(triple=True, consec=False)
    rules["old + triple"] = make_rule(triple=True)
    return rules


def row(name: str, figures: dict[str, dict[str, float]]) -> str:
    cells = "  ".join(
        f"{g}: {f['net']:5.1f}% {f['delta']:+5.2f} h{f['harmful']:.2f}" for g, f in sorted(figures.items())
    )
    return f"{name:40s} {cells}"


def search(args: argparse.Namespace) -> int:
    traces = read_cases(args.cache)
    print(f"{len(traces)} traces; per group: net saved %, accuracy change (points), harmful %")
    for name, decide in candidates().items():
        if args.only and args.only not in name:
            continue
        print(row(name, evaluate(traces, decide)), flush=True)
    # agreement without confidence (Qwen3's unclosed probes included), and dense checks late in long traces
    for k in (1, 2, 3):
        for conf in (0.5, 0.9):
            for text, dense in ((True, True), (True, False), (False, True)):
                name = f"released + agree{k} conf{conf}{' text' if text else ''}{' dense' if dense else ''}"
                if not args.only or args.only in name:
                    print(row(name, evaluate(traces, make_agreement_rule(k, conf, text, dense))), flush=True)
    for start in (8192, 10240):
        for spacing in (256, 512):
            for k in (3, 4):
                for window in (2, 1):
                    name = f"released + settle from {start}, waits {spacing} apart, {k} agree, text {window}"
                    if not args.only or args.only in name:
                        figures = evaluate(
                            traces, None, lambda t, a=start, b=spacing, c=k, d=window: settle_outcome(t, a, b, c, d)
                        )
                        print(row(name, figures), flush=True)
    for solutions in (1, 2, 3):
        for solutions_conf in (None, 0.0):
            name = f"released + settle + probe_solutions {solutions}, probe {'>= 0.9' if solutions_conf is None else 'any'}"
            if not args.only or args.only in name:
                figures = evaluate(
                    traces,
                    None,
                    lambda t, a=solutions, b=solutions_conf: settle_outcome(t, 8192, 512, 3, 2, 16, a, b),
                )
                print(row(name, figures), flush=True)
    for start in (4096, 6144, 8192, 10240):
        for step in (512, 1024):
            for k in (2, 3, 4):
                name = f"released + late dense from {start} every {step}, {k} agree"
                if not args.only or args.only in name:
                    figures = evaluate(traces, None, lambda t, a=start, b=step, c=k: late_outcome(t, a, b, c))
                    print(row(name, figures), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- text rules


def text_stop(trace: dict[str, Any], implicit_k: int = 3, explicit_all: bool = False, gap: int = 0) -> Any:
    """Simulate ``fcs_reflection`` on the cached detector events: ``(position, answer)`` of its stop or None.

    Two consecutive solutions agree and one states its answer explicitly (every one with ``explicit_all``);
    otherwise ``implicit_k`` agreeing solutions, the last ``gap`` tokens or more after the first. An explicit
    answer confirms at once (as a solution that closes there); a ``loop`` stops with the latest answer.
    """
    events = [(a[0], 0, "answer", a) for a in trace["answers"]] + [(s[0], 1, "solution", s) for s in trace["solutions"]]
    events += [(at, 2, "loop", None) for at in trace.get("loops", [])]
    keys: list[tuple[str, bool, int]] = []  # (key, explicit, answer position) per solution
    last = None

    def agreed(chain: list[tuple[str, bool, int]]) -> bool:
        current = chain[-1][0]
        if len(chain) >= 2 and equal(chain[-2][0], current) and (chain[-1][1] or chain[-2][1]) and not explicit_all:
            return True
        if explicit_all and len(chain) >= 2 and equal(chain[-2][0], current) and chain[-1][1] and chain[-2][1]:
            return True
        n = implicit_k
        return (
            len(chain) >= n
            and all(equal(key, current) for key, _, _ in chain[-n:-1])
            and chain[-1][2] - chain[-n][2] >= gap
        )

    for position, _, kind, event in sorted(events, key=lambda e: (e[0], e[1])):
        if kind == "loop":
            return position, last
        if kind == "answer":
            last = event[2]
            if event[4] and agreed(keys + [(event[3], True, event[0])]):
                return position, event[2]
        else:
            keys.append((event[3], event[4], event[1]))
            if agreed(keys):
                return position, event[2]
    return None


def text_search(args: argparse.Namespace) -> int:
    traces = read_cases(args.cache)
    rules: dict[str, dict[str, Any]] = {
        "implicit_k 2 (one check of any value)": {"implicit_k": 2},
        "implicit_k 3 (released)": {"implicit_k": 3},
        "implicit_k 4": {"implicit_k": 4},
        "explicit answers only (both)": {"implicit_k": 99, "explicit_all": True},
        "explicit in one of two, else never": {"implicit_k": 99},
        "implicit_k 2, gap 200 tokens": {"implicit_k": 2, "gap": 200},
        "implicit_k 2, gap 400 tokens": {"implicit_k": 2, "gap": 400},
        "implicit_k 3, gap 400 tokens": {"implicit_k": 3, "gap": 400},
    }
    print(f"{len(traces)} traces; per group: saved %, accuracy change (points), harmful %")
    for name, kwargs in rules.items():
        groups: dict[str, list[float]] = {}
        for trace in traces:
            stop = text_stop(trace, **kwargs)
            if stop is None or stop[0] >= trace["total"]:
                at, ok = trace["total"], trace["full_ok"]
            else:  # the replay acts with the next token (a decision completed by whitespace waits for it)
                at, ok = stop[0] + 1, stop[1] is not None and trace["graded"].get(stop[1], False)
            group = group_of(trace)
            for key in (group, "ALL"):
                sums = groups.setdefault(key, [0.0] * 6)
                for i, v in enumerate((1, trace["total"], at, trace["full_ok"], ok, trace["full_ok"] and not ok)):
                    sums[i] += v
        figures = {
            key: {"n": n, "net": 100 * (total - at) / total, "delta": 100 * (ok - full) / n, "harmful": 100 * h / n}
            for key, (n, total, at, full, ok, h) in groups.items()
        }
        print(row(name, figures), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- bounds

CONFIDENCE_BINS = (0.0, 0.5, 0.9, 0.99, 0.999)


def confidence_bin(confidence: float) -> str:
    """``"none"`` for a probe without confidence (0: a Qwen3 probe that did not close its thinking), else its
    bin between two edges of ``CONFIDENCE_BINS`` (the last bin is ``>=0.999``)."""
    if confidence == 0.0:
        return "none"
    low = max(edge for edge in CONFIDENCE_BINS if confidence >= edge)
    higher = [edge for edge in CONFIDENCE_BINS if edge > low]
    return f"{low}-{higher[0]}" if higher else f">={low}"


def no_regret_stop(trace: dict[str, Any], min_confidence: float) -> int:
    """Where an oracle that knows the future stops without changing the outcome, at a wait probe of at least
    ``min_confidence``: the first one (answer arrived) after the last wait probe whose answer would change
    the trace's graded outcome (any wait probe of a wrong trace whose answer is correct)."""
    waits = [w for w in trace["waits"][:30] if w[3] and w[0] < trace["total"]]
    changes = [w[0] for w in waits if trace["graded"].get(w[3], False) != trace["full_ok"]]
    last = changes[-1] if changes else -1
    after = (w[0] + w[5] + 1 for w in waits if w[0] > last and w[4] >= min_confidence)
    return min(next(after, trace["total"]), trace["total"])


def bounds(args: argparse.Namespace) -> int:
    """What the recorded probes can say: how often a wait probe's answer is right when the full trace is right,
    by confidence, and how much an oracle that stops without changing any outcome could save."""
    traces = read_cases(args.cache)
    counts: dict[tuple[str, str, str], list[int]] = {}
    for trace in traces:
        if not trace["full_ok"]:
            continue
        group = group_of(trace)
        for wait in trace["waits"][:30]:
            if wait[3] is None or not plain_answer(wait[3]) or wait[0] >= trace["total"]:
                continue
            cell = counts.setdefault((group, trace["model"], confidence_bin(wait[4])), [0, 0])
            cell[0] += 1
            cell[1] += trace["graded"].get(wait[3], False)
    print("wait probes on traces whose full answer is right: share whose own answer is right, by confidence")
    for (group, model, name), (n, right) in sorted(counts.items()):
        print(f"  {group:9s} {model:30s} {name:10s} {n:6d} probes  {100 * right / n:5.1f}% right")
    print("net saved % (no probe cost) of stopping without changing any trace's outcome, at the first wait probe")
    print("of at least the given confidence after the last one that would change it; and the first right dense probe")
    sums: dict[str, list[float]] = {}
    levels = (0.0, 0.9, 0.99, 0.999)
    for trace in traces:
        group = group_of(trace)
        total = trace["total"]
        right = next((d[0] for d in trace["dense"] if trace["graded"].get(d[2], False)), total)
        row_sums = sums.setdefault(group, [0.0] * (len(levels) + 2))
        row_sums[0] += total
        for index, level in enumerate(levels, 1):
            row_sums[index] += total - no_regret_stop(trace, level)
        row_sums[-1] += total - min(right, total)
    for group, (total, *saved) in sorted(sums.items()):
        cells = "  ".join(f">={level}: {100 * s / total:5.1f}%" for level, s in zip(levels, saved[:-1], strict=True))
        print(f"  {group:9s} {cells}  first right dense probe: {100 * saved[-1] / total:5.1f}%")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("traces")
    b.add_argument("--split", choices=["all", "tune", "holdout"], default="tune")
    b.add_argument("--cache", required=True)
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--limit", type=int)
    s = sub.add_parser("search")
    s.add_argument("--cache", required=True)
    s.add_argument("--only", help="only the rules whose name contains this")
    t = sub.add_parser("text", help="simulate text-only fcs_reflection variants on the cache")
    t.add_argument("--cache", required=True)
    o = sub.add_parser("bounds", help="what the probes can say: precision by confidence, no-regret savings")
    o.add_argument("--cache", required=True)
    args = parser.parse_args()
    commands = {"build": build, "search": search, "text": text_search, "bounds": bounds}
    return commands[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
