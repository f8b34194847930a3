"""Calibration: the probe schedule and the lone confident probe in ``probe_fcs``, Learn-then-Test, the calibration
file and ``policy_for``, the simulator against real replay, and ``thinkbrake calibrate`` / ``replay
--calibration`` end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import binom

from controller.calibration import (
    CalibrationError,
    default_calibration,
    load_calibration,
    policy_for,
    risk_levels,
    validate,
)
from controller.offline.calibrate import (
    Candidate,
    Evaluation,
    calibrate,
    deer,
    family,
    hb_p_value,
    hb_upper_bound,
    learn_then_test,
    upper_bound,
)
from controller.offline.replay import (
    PolicyOutcome,
    Tokenizers,
    TraceResult,
    default_tokenizer_root,
    load_traces,
    replay_trace,
    token_deltas,
    trace_delimiters,
    trace_stream,
)
from controller.offline.report import build_report, markdown_table
from controller.offline.simulate import Case, Equality, record_case, simulate
from controller.policies import OffConfig, ProbeFcsConfig
from controller.probe_policy import ProbeRuntime
from controller.probes import WAIT, ProbeResult
from controller.verify import AnswerComparer
from server.cli import main

PROBE_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "dev-probes.jsonl.gz"


def same(first: str, second: str) -> bool:
    return first == second


def ask_and_answer(runtime: ProbeRuntime, waits: list[int], answer: str | None, confidence: float) -> list[int]:
    """Trigger a "Wait" at each token position in ``waits``; every probe asked answers at once. Returns the
    positions at which a probe was asked."""
    asked = []
    for tokens in waits:
        runtime.trigger(WAIT, tokens, tokens * 5)
        for request in runtime.take_requests():
            asked.append(request.tokens)
            runtime.result(ProbeResult(request.id, answer, confidence, 6), tokens + 7, tokens * 5)
    return asked


def test_back_off_probes_rarely_when_probes_carry_no_confidence() -> None:
    waits = list(range(100, 20_000, 100))  # a "Wait" every 100 tokens
    every = ask_and_answer(ProbeRuntime(ProbeFcsConfig(settle_agree=0, max_probes=1000), same), waits, "7", 0.0)
    assert len(every) == len(waits)
    config = ProbeFcsConfig(settle_agree=0, max_probes=1000, backoff=3, backoff_tokens=256)
    backed = ask_and_answer(ProbeRuntime(config, same), waits, "7", 0.0)
    # three probes, then gaps of at least 256, 512, 1024, ... tokens
    assert backed[:3] == [100, 200, 300]
    gaps = [b - a for a, b in itertools.pairwise(backed[2:])]
    assert all(gap >= 256 * 2**i for i, gap in enumerate(gaps))
    assert len(backed) <= 3 + 7  # 256 * (2^7 - 1) > 20,000 tokens


def test_a_counted_probe_resets_the_back_off_and_spacing_applies_from_the_start() -> None:
    config = ProbeFcsConfig(settle_agree=0, max_probes=1000, backoff=1, backoff_tokens=1000, confirm_confidence=1.0,
                            sure_confidence=1.0, agree_confidence=1.0, solution_agree=0)  # fmt: skip
    runtime = ProbeRuntime(config, same)
    assert ask_and_answer(runtime, [100], "7", 0.0) == [100]
    assert runtime.spacing() == 1000
    assert ask_and_answer(runtime, [500, 1100], "7", 0.95) == [1100]  # 500 is too soon; 1100 counts (>= 0.9)
    assert runtime.spacing() == 0 and runtime.decision is None
    spaced = ProbeRuntime(ProbeFcsConfig(settle_agree=0, probe_spacing=250), same)
    assert ask_and_answer(spaced, [100, 200, 300, 400, 600, 700], "7", 0.5) == [100, 400, 700]


def test_the_lone_confident_probe_stops_on_its_own_only_at_its_threshold() -> None:
    stop = ProbeRuntime(deer(0.99), same)
    ask_and_answer(stop, [100, 200], "7", 0.985)
    assert stop.advance(300, 0) is None  # 0.985 < 0.99, and no other rule is on
    ask_and_answer(stop, [400], "8", 0.995)
    decision = stop.advance(410, 0)
    assert decision is not None and decision.reason == "probe_confident" and decision.answer == "8"
    with pytest.raises(ValueError, match="alone_confidence"):
        ProbeFcsConfig(alone_confidence=1.5)


def evaluation_of(losses: list[list[int]], net: list[list[int]], problems: list[str]) -> Evaluation:
    """A hand-made evaluation of one model: ``losses``/``net`` per candidate and trace (totals 1000 each)."""
    count = len(problems)
    changed = np.array(losses, dtype=bool)
    return Evaluation(
        candidates=[Candidate(f"c{i}", "deer", 1 - i / 100, deer(0.9 + i / 100)) for i in range(len(losses))],
        ids=[f"{p}/M" for p in problems],
        models=["M"] * count,
        datasets=["math500"] * count,
        problems=problems,
        totals=np.full(count, 1000),
        full_ok=np.ones(count, dtype=bool),
        stop_tokens=1000 - np.array(net),
        probe_tokens=np.zeros((len(losses), count), dtype=np.int64),
        changed=changed,
        correct=~changed,
    )


def test_learn_then_test_walks_in_order_and_stops_at_the_first_failure() -> None:
    count = 1500
    rng = np.random.default_rng(0)
    rates = [0.0, 0.004, 0.008, 0.03, 0.001]  # the walk's order; the safe last one is never reached at 2%
    savings = [100, 300, 700, 900, 950]
    losses = np.array([rng.random(count) < rate for rate in rates], dtype=np.int64)
    net = np.array([np.full(count, saving) for saving in savings])
    strict, loose = learn_then_test(losses, net, np.full(count, 1000), [0.005, 0.02], 0.05)
    assert strict.chosen == 0  # no loss at all: certified at 0.5%
    assert [step.accepted for step in strict.steps] == [True, False]  # 0.4%: not certified at 0.5%; walk ends
    assert loose.chosen == 2  # the most saving of the accepted ones
    assert [step.accepted for step in loose.steps] == [True, True, True, False]  # 3% changed: the walk ends
    k = int(losses[2].sum())
    assert loose.steps[2].p_value == pytest.approx(binom.cdf(k, count, 0.02))
    assert loose.steps[2].bound <= 0.02 < upper_bound(45, count, 0.05)


def test_the_guarantee_holds_over_many_calibration_draws() -> None:
    """Candidates whose true change rates straddle A: the chosen one exceeds A in at most delta of the draws."""
    rng = np.random.default_rng(1)
    rates = np.array([0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04])  # A = 0.02: the last three are too risky
    savings = np.linspace(100, 800, len(rates))
    risky = 0
    draws = 400
    for _ in range(draws):
        count = 1200
        losses = (rng.random((len(rates), count)) < rates[:, None]).astype(np.int64)
        net = np.repeat(savings[:, None], count, axis=1)
        (choice,) = learn_then_test(losses, net, np.full(count, 1000), [0.02], 0.05)
        risky += choice.chosen is not None and rates[choice.chosen] > 0.02
    assert risky / draws <= 0.05


def test_hoeffding_bentkus_p_value_and_bound() -> None:
    assert hb_p_value(0.0, 228, 0.02) == pytest.approx(0.98**228)  # no loss: Hoeffding's term, (1 - A)^n
    assert hb_p_value(0.03, 228, 0.02) == 1.0  # a mean above the risk never rejects
    mean, n = 0.004, 600
    bound = hb_upper_bound(mean, n, 0.05)
    assert hb_p_value(mean, n, bound) <= 0.05 < hb_p_value(mean, n, bound * 0.999)
    assert bound > upper_bound(round(mean * n), n, 0.05)  # bounded losses cost more than Bernoulli ones


def correlated_seeds(rng: np.random.Generator, rates: np.ndarray, problems: int, seeds: int) -> np.ndarray:
    """Losses of ``seeds`` traces per problem that go together: a problem is hard (every seed changed) with
    probability ``rate``; columns ordered problem by problem."""
    hard = rng.random((len(rates), problems)) < rates[:, None]
    return np.repeat(hard, seeds, axis=1).astype(np.int64)


def test_several_seeds_of_a_problem_count_as_one_unit() -> None:
    """Seeds of one problem fail together: counted as independent traces, the test certifies rules whose risk
    exceeds A far more often than delta; with the problem as the unit it keeps the guarantee."""
    rng = np.random.default_rng(2)
    rates = np.array([0.0, 0.01, 0.021])  # A = 0.02: the last one is too risky, though not by much
    savings = np.linspace(100, 500, len(rates))
    problems, seeds, draws = 230, 3, 300
    groups = [f"p{index // seeds}" for index in range(problems * seeds)]
    risky = {"traces": 0, "problems": 0}
    for _ in range(draws):
        losses = correlated_seeds(rng, rates, problems, seeds)
        net = np.repeat(savings[:, None], problems * seeds, axis=1)
        totals = np.full(problems * seeds, 1000)
        (by_trace,) = learn_then_test(losses, net, totals, [0.02], 0.05)
        (by_problem,) = learn_then_test(losses, net, totals, [0.02], 0.05, groups)
        risky["traces"] += by_trace.chosen is not None and rates[by_trace.chosen] > 0.02
        risky["problems"] += by_problem.chosen is not None and rates[by_problem.chosen] > 0.02
        assert all(step.problems == problems and step.n == problems * seeds for step in by_problem.steps)
    assert risky["problems"] / draws <= 0.05 < risky["traces"] / draws, risky


def test_calibrate_writes_levels_that_policy_for_serves() -> None:
    count = 1500
    problems = [f"math500/{i}" for i in range(count)]
    losses = [[0] * count, [int(i % 50 == 0) for i in range(count)], [int(i % 5 == 0) for i in range(count)]]
    net = [[100] * count, [400] * count, [900] * count]
    calibration = validate(calibrate(evaluation_of(losses, net, problems), [0.005, 0.05], 0.05, hashes={"M": "abc"}))
    entry = calibration["models"]["M"]
    assert entry["data_sha256"] == "abc" and entry["traces"] == count
    low, high = entry["levels"]
    assert low["candidate"] == "c0" and high["candidate"] == "c1"  # c2 changes 20% of answers: never certified
    assert high["bound"] <= 0.05 and high["n"] == count
    assert policy_for(calibration, "M", 0.05) == deer(0.91)
    assert policy_for(calibration, "M", 0.02) == deer(0.9)  # the largest level at or below 2%
    assert policy_for(calibration, "M") == deer(0.9)  # default_risk: the first level
    assert policy_for(calibration, "M", 0.001) == OffConfig()  # below every level: no early stop
    assert policy_for(calibration, "other", 0.05) is None
    assert risk_levels(calibration, "M") == [0.005, 0.05]


def test_model_names_match_by_case_and_by_last_path_component() -> None:
    level = {"risk": 0.02, "policy": deer(0.99).as_dict()}
    calibration = validate({"format": "thinkbrake-calibration", "version": 1, "default_risk": 0.02,
                            "models": {"Qwen/Qwen3-8B": {"levels": [level]}}})  # fmt: skip
    assert policy_for(calibration, "qwen/qwen3-8b") == deer(0.99)
    assert policy_for(calibration, "/models/Qwen3-8B") == deer(0.99)
    assert policy_for(calibration, "Qwen3-14B") is None


def test_bad_calibration_files_are_refused(tmp_path: Path) -> None:
    good = {"format": "thinkbrake-calibration", "version": 1, "models": {"M": {"levels": []}}}
    assert validate(good) is good
    for bad, message in [
        ({"format": "other"}, "not a"),
        ({**good, "version": 9}, "version"),
        ({**good, "models": {"M": {"levels": [{"risk": 2, "policy": {}}]}}}, "risk"),
        ({**good, "models": {"M": {"levels": [{"risk": 0.1, "policy": {"policy": "nope"}}]}}}, "bad policy"),
    ]:
        with pytest.raises(CalibrationError, match=message):
            validate(bad)
    path = tmp_path / "c.json"
    path.write_text("{")
    with pytest.raises(CalibrationError):
        load_calibration(path)


def test_the_shipped_calibration_holds_both_dev_models() -> None:
    calibration = default_calibration()
    assert calibration["delta"] == 0.05 and calibration["label"] == "model"
    for model in ("DeepSeek-R1-Distill-Qwen-7B", "Qwen3-8B"):
        levels = risk_levels(calibration, model)
        assert levels and calibration["default_risk"] in levels
        entry = next(e for name, e in calibration["models"].items() if name.endswith(model))
        for level in entry["levels"]:
            assert level["bound"] <= level["risk"] and len(entry["data_sha256"]) == 64
        assert isinstance(policy_for(calibration, model), ProbeFcsConfig)


@pytest.fixture(scope="module")
def probe_traces() -> list[dict[str, Any]]:
    if not PROBE_TRACES.exists():
        pytest.skip(f"probe traces not found at {PROBE_TRACES}")
    return list(itertools.islice(load_traces([PROBE_TRACES]), 0, 2736, 342))  # both models, several datasets


@pytest.fixture(scope="module")
def qwen3_math500() -> list[dict[str, Any]]:
    if not PROBE_TRACES.exists():
        pytest.skip(f"probe traces not found at {PROBE_TRACES}")
    return list(itertools.islice(load_traces([PROBE_TRACES]), 1536, 1560))  # 8 problems, 3 seeds each


@pytest.mark.replay
def test_the_simulator_gives_what_replay_gives(probe_traces: list[dict[str, Any]]) -> None:
    """The stop, answer, probes and probe tokens of the simulator equal the real replay's, for the default rule,
    DEER, and schedule and back-off settings of the calibration family (with and without confidence)."""
    tokenizers = Tokenizers(default_tokenizer_root(PROBE_TRACES))
    comparer = AnswerComparer()
    equal = Equality(comparer)
    names = ("deer+backoff+spacing 0.999", "deer+backoff+from 512 0.99", "confirmed+alone+backoff 0.99")
    configs = [ProbeFcsConfig(), deer(0.99), *(c.config for c in family() if c.name in names)]
    assert len(configs) == 5
    configs.append(ProbeFcsConfig(confidence=0.5, probe_spacing=256, settle_tokens=2048, settle_spacing=256))
    stops = 0
    for trace in probe_traces:
        deltas = token_deltas(tokenizers.get(trace["tokenizer"]), trace_stream(trace))
        replayed = replay_trace(trace, deltas, configs, comparer, trace_delimiters(trace))
        case = Case.of(record_case(trace, tokenizers, comparer))
        assert case.total == replayed.tokens
        for config, outcome in zip(configs, replayed.outcomes, strict=True):
            got = simulate(case, config, equal)
            assert (got.stopped, got.tokens, got.answer, got.probes, got.probe_tokens, got.changed) == (
                outcome.stopped, outcome.tokens, outcome.answer, outcome.probes, outcome.probe_tokens,
                not outcome.agrees,
            ), (trace["id"], config)  # fmt: skip
            if got.stopped:
                assert got.reason == outcome.reason
            stops += got.stopped
    assert stops >= 5  # the rules did stop on these traces


@pytest.mark.replay
def test_calibrate_then_replay_the_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], qwen3_math500: list[dict[str, Any]]
) -> None:
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(t) + "\n" for t in qwen3_math500))
    out = tmp_path / "calibration.json"
    root = str(default_tokenizer_root(PROBE_TRACES))
    code = main(["calibrate", str(traces), "--risk", "0.5", "--risk", "0.01", "--out", str(out), "--jobs", "1",
                 "--tokenizers-root", root, "--family", "deer"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "chosen at risk 0.5" in printed and "changed %  bound %  net saved %" in printed
    calibration = load_calibration(out)
    (model,) = calibration["models"]
    loose, strict = calibration["models"][model]["levels"]
    assert strict["policy"] == {"policy": "off"}  # 1% cannot be certified on a handful of traces
    assert loose["certified"] and loose["bound"] <= 0.5 and loose["policy"]["alone_confidence"] < 1.0
    assert "candidates tested, in the order of the walk" in printed
    code = main(["replay", str(traces), "--calibration", str(out), "--risk", "0.5", "--risk", "0.01",
                 "--tokenizers-root", root, "--jobs", "1", "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "changed %" in table and "| ALL | calibrated@50% |" in table and "| ALL | calibrated@1% |" in table
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["groups"]["ALL"]["calibrated@1%"]["stopped"] == 0
    assert report["calibrated"][model]["calibrated@50%"] == loose["policy"]
    assert main(["replay", str(traces), "--risk", "0.5"]) == 2  # --risk needs --calibration


def test_every_report_row_shows_the_answers_changed_beside_accuracy() -> None:
    results = []
    for index, agrees in enumerate([True, False, False, True]):
        result = TraceResult(f"math500/{index}/M", "math500", "M", 100, "7", True, True, 1, None, None, 0.5)
        result.outcomes.append(PolicyOutcome("probe_fcs", not agrees, "probe_sure", 50, "7" if agrees else "5",
                                             agrees, agrees))  # fmt: skip
        results.append(result)
    report = build_report(results, ["probe_fcs"])
    assert report["groups"]["ALL"]["probe_fcs"]["changed"] == 50.0
    header, _rule, row = markdown_table(report, ["ALL"]).splitlines()
    titles = [cell.strip() for cell in header.split("|")]
    assert titles.index("changed %") == titles.index("Δ pts") + 1
    assert [cell.strip() for cell in row.split("|")][titles.index("changed %")] == "50.0"


def test_the_reference_label_counts_only_right_answers_made_wrong() -> None:
    problems = [f"math500/{i}" for i in range(4)]
    evaluation = evaluation_of([[1, 1, 0, 0]], [[10, 10, 10, 10]], problems)
    evaluation.full_ok[:] = [True, False, True, False]  # the second trace's own answer was wrong already
    evaluation.correct[:] = [[False, True, True, False]]  # its changed answer is right: not a harmful stop
    assert evaluation.losses("model").tolist() == [[1, 1, 0, 0]]
    assert evaluation.losses("reference").tolist() == [[1, 0, 0, 0]]
