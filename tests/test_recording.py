"""Recording real traffic (``thinkbrake serve --record DIR``) in front of an upstream.

The upstream is the fake of ``tests/support/fake_upstream.py`` (real HTTP over loopback, vLLM's protocol, answer
probes included); thinkbrake runs in a thread of the test (real uvicorn on loopback, so a test can hold up the
recorder's writer) or as the real CLI; clients are the real ``openai`` client. Recordings are checked against the
trace format (``tests/support/trace_format.py``) and read back by the real ``thinkbrake replay`` and
``thinkbrake calibrate``, which must reproduce the stop the live server decided.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support.fake_upstream import FakeUpstream, Trace
from tests.support.fixtures import REPO_ROOT
from tests.support.servers import thinkbrake_process, thinkbrake_thread
from tests.support.serving import FEW_TOKENS, metric, wait_metric
from tests.support.trace_format import check_trace

QUESTION = "What is 6 * 7?"
SOLVE = "Six times seven: 6 * 7 = 42. So the answer is 42.\n\n"
CONFIRM = "Wait, let me check it another way: 7 * 6 = 42. Yes, so the answer is 42.\n\n"
RECHECK = "Wait, maybe I should check once more."
TAIL = " Let me add it up again: 6 + 6 + 6 + 6 + 6 + 6 + 6 = 42." * 8
THINKING = SOLVE + CONFIRM + RECHECK + TAIL
ANSWER = "The answer is $\\boxed{42}$."
TRACE = Trace(THINKING, ANSWER)
DEV_PROBES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "dev-probes.jsonl.gz"
RECORDED = "thinkbrake_recorded_traces_total"
DROPPED = "thinkbrake_recording_dropped_traces_total"


@contextlib.contextmanager
def serving(folder: pathlib.Path | None, token_rate: float = 0.0, **settings: Any) -> Iterator[tuple[Any, str]]:
    """A fake upstream and thinkbrake (in this process) recording into ``folder``; yields (app, base URL). The app
    is built before it starts, so a test may change its recorder's writer first (``on_app``)."""
    from prometheus_client import CollectorRegistry

    from server.app import build_app
    from server.metrics import Metrics
    from server.settings import Settings
    from server.upstream import UpstreamBackend

    on_app = settings.pop("on_app", None)
    with FakeUpstream([TRACE], token_rate=token_rate) as upstream:
        record = {"record": str(folder)} if folder is not None else {}
        config = Settings(upstream=upstream.url, **record, **settings)
        app = build_app(config, UpstreamBackend(config), Metrics(registry=CollectorRegistry()))
        app.state.upstream = upstream
        if on_app is not None:
            on_app(app)
        with thinkbrake_thread(app) as url:
            yield app, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(url: str, question: str = QUESTION, n: int = 1, **thinkbrake: Any) -> Any:
    return client(url).chat.completions.create(
        model="fake-reasoner",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
        n=n,
        extra_body={"thinkbrake": thinkbrake} if thinkbrake else None,
    )


def recordings(folder: pathlib.Path) -> list[dict[str, Any]]:
    """Every trace written so far, file by file in the order they were begun."""
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()]


def wait_written(url: str, folder: pathlib.Path, count: int) -> list[dict[str, Any]]:
    """Poll until ``count`` traces were written (a generous deadline: recording finishes after the response)."""
    assert wait_metric(url, RECORDED, count, timeout=120) >= count
    return recordings(folder)


def test_no_recording_without_the_flag(tmp_path: pathlib.Path) -> None:
    with serving(None) as (app, url):
        response = ask(url, policy="probe_fcs")
        info = response.model_extra["thinkbrake"]
        assert app.state.recorder is None and "shadow" not in info
        assert metric(url, RECORDED) == 0 and metric(url, DROPPED) == 0


def test_a_recorded_request_runs_in_shadow_and_is_written_as_a_trace(tmp_path: pathlib.Path) -> None:
    every = 16
    with serving(tmp_path, token_rate=200, record_probe_every=every) as (app, url):
        response = ask(url, policy="probe_fcs")
        (trace,) = wait_written(url, tmp_path, 1)
        upstream: FakeUpstream = app.state.upstream
        probes_sent = len(upstream.probe_requests())
        assert metric(url, DROPPED) == 0
    info, message = response.model_extra["thinkbrake"], response.choices[0].message
    # shadow: the whole trace and the model's own answer reached the client; the would-be stop is reported
    assert not info["stopped"] and info["shadow"]["would_stop"] and info["shadow"]["answer"] == "42"
    assert message.model_extra["reasoning_content"] == THINKING and message.content == ANSWER

    check_trace(trace)
    assert (trace["question"], trace["thinking"], trace["final"], trace["closed"]) == (QUESTION, THINKING, ANSWER, True)
    assert trace["model"] == "fake-reasoner" == trace["tokenizer"] and trace["dataset"] == "recorded"
    assert trace["id"].startswith("recorded/") and trace["reference"] == ""
    recorded = trace["recording"]
    assert recorded["policy"]["policy"] == "probe_fcs" and recorded["finish_reason"] == "stop"
    assert recorded["shadow"]["reason"] == info["shadow"]["reason"]
    assert recorded["shadow"]["stop_tokens"] == info["shadow"]["stop_tokens"]
    assert recorded["thinking_tokens"] == info["thinking_tokens"]

    # a wait probe at each "Wait", read with its confidence (the fake answers 42, log-probability -0.0001)
    waits = [row for row in trace["wait_probes"]]
    assert [row[1] for row in waits] == [len(SOLVE), len(SOLVE + CONFIRM)]
    assert all(row[2] == "42" and 0.999 < row[3] < 1 and row[5] == "wait" for row in waits)
    # a dense probe every 16 thinking tokens, with a confidence besides "certain"
    dense = [row for row in trace["probes"] if row[6] == "dense"]
    total = info["thinking_tokens"]
    assert [row[0] for row in dense] == list(range(every, total, every))[: len(dense)]
    assert len(dense) >= (total - 1) // every - 1  # one for every 16 tokens of thinking (but at its very end)
    assert all(row[2] == "42" and row[3] is True and 0.999 < row[5] < 1 for row in dense)
    # every probe the policy sent and every probe sent for the recording is in the trace
    assert probes_sent == len(trace["probes"]) + len(trace["wait_probes"])
    assert info["probes"]["sent"] < probes_sent  # the response counts the policy's own probes only


def test_recording_probes_are_never_acted_on(tmp_path: pathlib.Path) -> None:
    """Dense probes answer 42 with certainty from the first 4 tokens on; the would-be stop still comes where the
    policy's own probes put it (two confident wait probes in a row: the second "Wait"), as on the same request
    unrecorded (shadow: true)."""
    with serving(tmp_path, token_rate=200, record_probe_every=4) as (_, url):
        recorded = ask(url, policy="probe_fcs", agree_confidence=1).model_extra["thinkbrake"]
        (trace,) = wait_written(url, tmp_path, 1)
    with serving(None, token_rate=200) as (_, url):
        plain = ask(url, policy="probe_fcs", agree_confidence=1, shadow=True).model_extra["thinkbrake"]
    assert len([row for row in trace["probes"] if row[6] == "dense"]) > 10
    assert recorded["probes"]["sent"] == plain["probes"]["sent"]
    for key in ("would_stop", "reason", "answer"):
        assert recorded["shadow"][key] == plain["shadow"][key], key
    assert recorded["shadow"]["reason"] == "probe_confirmed"
    assert recorded["shadow"]["stop_tokens"] > len(SOLVE.split() + CONFIRM.split())  # after the second "Wait"


def test_a_request_is_recorded_with_all_its_choices_or_not_at_all(tmp_path: pathlib.Path) -> None:
    requests, seed = 24, 7
    draws = random.Random(seed)
    drawn = [index for index in range(requests) if draws.random() < 0.5]
    assert 0 < len(drawn) < requests  # the seed draws some requests and not others

    def seeded(app: Any) -> None:
        app.state.recorder.random.seed(seed)  # one draw per request, in the order the requests come

    with serving(tmp_path, record_rate=0.5, record_probe_every=0, on_app=seeded) as (_, url):
        for index in range(requests):
            ask(url, question=f"{QUESTION} ({index})", n=2, policy="off")
        traces = wait_written(url, tmp_path, 2 * len(drawn))
        time.sleep(0.5)
        assert metric(url, RECORDED) == 2 * len(drawn)
    by_question: dict[str, int] = {}
    for trace in traces:
        check_trace(trace)
        by_question[trace["question"]] = by_question.get(trace["question"], 0) + 1
    assert by_question == {f"{QUESTION} ({index})": 2 for index in drawn}  # both choices of each drawn request


def test_the_rate_is_a_probability_per_request() -> None:
    from prometheus_client import CollectorRegistry

    from server.metrics import Metrics
    from server.recording import Recorder
    from server.settings import Settings

    def share(rate: float) -> float:
        settings = Settings(upstream="http://127.0.0.1:9", record=str(folder), record_rate=rate)
        recorder = Recorder(settings, backend=None, metrics=Metrics(registry=CollectorRegistry()), seed=7)  # type: ignore[arg-type]
        return sum(recorder.draw() for _ in range(4000)) / 4000

    with tempfolder() as folder:
        assert share(0.0) == 0.0 and share(1.0) == 1.0
        assert 0.22 < share(0.25) < 0.28


@contextlib.contextmanager
def tempfolder() -> Iterator[pathlib.Path]:
    import tempfile

    with tempfile.TemporaryDirectory() as name:
        yield pathlib.Path(name)


def test_files_rotate_by_size(tmp_path: pathlib.Path) -> None:
    limit = 3000  # a trace here is over 1 kB: two per file at most
    with serving(tmp_path, record_max_bytes=limit, record_probe_every=0) as (_, url):
        for index in range(7):
            ask(url, question=f"{QUESTION} ({index})", policy="off")
        traces = wait_written(url, tmp_path, 7)
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) >= 4 and len(traces) == 7
    assert all(path.stat().st_size <= limit for path in files)
    for path, after in zip(files, files[1:], strict=False):  # a file was begun only when the line did not fit
        first = after.read_bytes().splitlines(keepends=True)[0]
        assert path.stat().st_size + len(first) > limit
    assert [trace["question"] for trace in traces] == [f"{QUESTION} ({index})" for index in range(7)]
    numbers = [int(path.stem.rsplit("-", 1)[1]) for path in files]
    assert numbers == list(range(1, len(files) + 1))


def test_a_full_queue_drops_and_counts_never_fails_a_request(tmp_path: pathlib.Path) -> None:
    release = threading.Event()

    def hold_the_writer(app: Any) -> None:
        files = app.state.recorder.files
        files._queue = queue.Queue(1)  # before the writer starts: one trace waits at most
        write = files._write

        def slow_write(line: bytes) -> None:
            release.wait(120)
            write(line)

        files._write = slow_write

    with serving(tmp_path, record_probe_every=0, on_app=hold_the_writer) as (_, url):
        for index in range(4):  # the writer holds one, the queue one: two are dropped
            response = ask(url, question=f"{QUESTION} ({index})", policy="off")
            assert response.choices[0].message.content == ANSWER
        assert wait_metric(url, DROPPED, 2, timeout=120) == 2
        release.set()
        traces = wait_written(url, tmp_path, 2)
        assert len(traces) == 2 and metric(url, DROPPED) == 2


def test_an_unwritable_folder_drops_and_counts_never_fails_a_request(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "traces"
    with serving(folder, record_probe_every=0) as (_, url):
        shutil.rmtree(folder)
        folder.write_text("a file where the folder was")  # nothing can be written there now
        for index in range(2):
            response = ask(url, question=f"{QUESTION} ({index})", policy="off")
            assert response.choices[0].message.content == ANSWER
        assert wait_metric(url, DROPPED, 2, timeout=120) == 2
        folder.unlink()  # writable again: the next trace is written
        ask(url, policy="off")
        assert wait_metric(url, RECORDED, 1, timeout=120) == 1
    assert len(recordings(folder)) == 1


def test_a_folder_that_cannot_be_made_fails_at_start(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    command = [sys.executable, "-m", "server.cli", "serve", "--upstream", "http://127.0.0.1:9", "--record",
               str(blocker / "traces")]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--record" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_trace_format_is_the_dev_traces_format() -> None:
    """The schema recordings are checked against holds every dev probe trace."""
    import gzip

    if not DEV_PROBES.exists():
        pytest.skip(f"dev traces not found at {DEV_PROBES}")
    with gzip.open(DEV_PROBES, "rt") as lines:
        for number, line in enumerate(lines):
            if number % 25 == 0:
                check_trace(json.loads(line))


# -------------------------------------------------------------------------------------- round trip: replay


def word_piece_tokenizer(path: pathlib.Path) -> pathlib.Path:
    """A ``tokenizer.json`` that cuts text as the fake upstream does (a word with the whitespace before it, one
    token each), so replay counts the tokens the upstream streamed."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from tests.support.fake_upstream import PIECE

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE.pattern), behavior="isolated")
    tokenizer.save(str(path))
    return path


def thinkbrake_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.cli", *args]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_replay_of_a_recording_reproduces_the_live_stop(tmp_path: pathlib.Path) -> None:
    """The proxy (the real CLI) and probe_fcs stopping on two consecutive confident probes: the live would-be
    stop is the one ``thinkbrake replay`` finds on the recording, and ``thinkbrake calibrate`` reads the recording
    too. The upstream pauses right after the second "Wait", so its probe answers there, as replay assumes (a probe
    answers ``out_tokens + 1`` tokens after it was asked); the pause only has to outlast one loopback request."""
    folder = tmp_path / "traces"
    with FakeUpstream([TRACE], token_rate=100) as upstream:
        pause = len(upstream.vocabulary.pieces(SOLVE + CONFIRM + "Wait,"))
        with thinkbrake_process(upstream.url, "--record", str(folder)) as (url, _):
            response = client(url).chat.completions.create(
                model="fake-reasoner", messages=[{"role": "user", "content": QUESTION}],
                extra_body={"fake_fault": f"stall:5@{pause}", "thinkbrake": {"agree_confidence": 1}},
            )  # fmt: skip
            (trace,) = wait_written(url, folder, 1)
    live = response.model_extra["thinkbrake"]["shadow"]
    check_trace(trace)
    assert live["would_stop"] and live["reason"] == "probe_confirmed" and live["answer"] == "42"

    tokenizer = word_piece_tokenizer(tmp_path / "tokenizer.json")
    (recording,) = folder.glob("*.jsonl")
    report = tmp_path / "replay.json"
    thinkbrake_cli("replay", str(recording), "--tokenizer", str(tokenizer), "--json", str(report), "--jobs", "1",
                   "--policy-arg", "agree_confidence=1")  # fmt: skip
    (outcome,) = json.loads(report.read_text())["traces"][0]["outcomes"]
    print(f"live: {live['reason']} {live['answer']} @{live['stop_tokens']}; replay: {outcome['reason']} "
          f"{outcome['answer']} @{outcome['tokens']}")  # fmt: skip
    assert outcome["policy"] == "probe_fcs" and outcome["stopped"] and outcome["missing_probes"] == 0
    assert (outcome["reason"], outcome["answer"]) == (live["reason"], live["answer"])
    assert 0 <= outcome["tokens"] - live["stop_tokens"] <= FEW_TOKENS
    assert outcome["agrees"]  # the answer at the stop is the trace's own final answer

    calibration = tmp_path / "calibration.json"
    thinkbrake_cli("calibrate", str(recording), "--risk", "0.5", "--tokenizer", str(tokenizer), "--out",
                   str(calibration), "--jobs", "1")  # fmt: skip
    assert "fake-reasoner" in json.loads(calibration.read_text())["models"]
