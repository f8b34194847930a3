"""Round trip of a recording: what ``thinkbrake serve --record`` writes replays to the decision the live server made.

As in ``tests/test_replay_vs_serve.py``, real dev traces are forced through the tiny test model by the scripted
logits processor: embedded (``thinkbrake serve --model``) and as a proxy in front of vLLM's OpenAI server with the
``deepseek_r1`` reasoning parser, each recording every request (``--record``). Recorded requests run in shadow
mode, so the live decision is the response's would-be stop. The recordings must have the trace format, hold the
thinking the model streamed, and give the same decisions under the real ``thinkbrake replay`` (tokenized with the
tiny model's own tokenizer):

- the text rule ``fcs_reflection`` on a trace it stops and one it does not: the same stop, at the same token
  (the server decides at the end of a delta, which may hold a few tokens);
- ``probe_fcs`` stopping at the first wait probe whatever its confidence (thresholds at 0, DEER's rule at its
  loosest), the probes answering the trace's own answer (``probe_script``): replay must find the recorded probe at
  the recorded "Wait" and stop for the same reason with the same answer. Where a probe-driven stop lands depends on
  when the live probe came back (replay assumes ``out_tokens + 1`` tokens later), so only its order is checked.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

from controller.offline.replay import trace_stream
from tests.support.dev_traces import traces_by_id
from tests.support.fixtures import REPO_ROOT
from tests.support.serving import FEW_TOKENS, http_json, scripted_thinkbrake, wait_metric
from tests.support.trace_format import check_trace

pytestmark = [pytest.mark.engine, pytest.mark.replay]

TEXT_STOPPED = "math500/212/DeepSeek-R1-Distill-Qwen-7B/seed44"  # fcs_reflection stops it
TEXT_NATURAL = "math500/98/DeepSeek-R1-Distill-Qwen-7B/seed43"  # ... and not this one
PROBED = "math500/430/Qwen3-8B/seed43"  # a "Wait" after 217 characters
FIRST_PROBE = {"policy": "probe_fcs", "confidence": 0, "alone_confidence": 0}
FINAL_CHARS = 120
PROBE_EVERY = 64
WAIT_WORD = re.compile(r"(?<![A-Za-z])wait(?![A-Za-z])", re.IGNORECASE)


@pytest.fixture(scope="module")
def traces() -> dict[str, dict[str, Any]]:
    return traces_by_id([TEXT_STOPPED, TEXT_NATURAL, PROBED])


@pytest.fixture(scope="module", params=["embedded", "proxy"])
def recording_server(request, tiny_model_dir, tmp_path_factory):
    """(base URL, recording folder, the recordings' ``tokenizer``) of a thinkbrake that records every request."""
    logs = tmp_path_factory.mktemp(request.param)
    folder = logs / "traces"
    record = ("--record", str(folder), "--record-probe-every", str(PROBE_EVERY))
    with scripted_thinkbrake(request.param, tiny_model_dir, logs, *record) as url:
        # embedded, replay finds the recordings' tokenizer in the model's folder; proxied, by the upstream's name
        yield url, folder, str(tiny_model_dir.resolve()) if request.param == "embedded" else "tiny-up"


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def served(url: str, trace: dict[str, Any], tokenizer: Any, thinkbrake: dict[str, Any]) -> dict[str, Any]:
    """The trace forced through the model (its thinking, end of thinking, the start of its final answer); answer
    probes answer ``{reference}``."""
    script = [*ids(tokenizer, trace_stream(trace) + trace["final"][:FINAL_CHARS]), tokenizer.eos_token_id]
    body = {
        "model": "tiny-r1",
        "messages": [{"role": "user", "content": trace["question"][:300]}],
        "max_tokens": len(script) + 8,
        "vllm_xargs": {
            "script": script,
            "think_end_id": tokenizer.convert_tokens_to_ids("</think>"),
            "probe_script": ids(tokenizer, "{" + trace["reference"] + "}"),
        },
        "thinkbrake": thinkbrake,
    }
    status, data = http_json(f"{url}/v1/chat/completions", body, timeout=600)
    assert status == 200, data
    return data


def replay(path: pathlib.Path, tokenizer: str | None, *args: str) -> list[dict[str, Any]]:
    """``thinkbrake replay`` (the real CLI) of one recording file (``--tokenizer`` when given): per trace, its one
    policy's outcome."""
    report = path.with_suffix(".report.json")
    chosen = ["--tokenizer", tokenizer] if tokenizer else []
    command = [sys.executable, "-m", "server.cli", "replay", str(path), *chosen, "--jobs", "1", "--json",
               str(report), *args]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [{**trace, "outcome": trace["outcomes"][0]} for trace in json.loads(report.read_text())["traces"]]


def test_recordings_replay_to_the_live_decisions(recording_server, traces, tiny_tokenizer, tiny_model_dir, tmp_path):
    url, folder, tokenizer = recording_server
    embedded = tokenizer != "tiny-up"
    before = wait_metric(url, "thinkbrake_recorded_traces_total", 0)
    requests = [(TEXT_STOPPED, {"policy": "fcs_reflection"}), (TEXT_NATURAL, {"policy": "fcs_reflection"}),
                (PROBED, FIRST_PROBE)]  # fmt: skip
    live = {trace_id: served(url, traces[trace_id], tiny_tokenizer, control) for trace_id, control in requests}
    assert wait_metric(url, "thinkbrake_recorded_traces_total", before + 3, timeout=300) == before + 3
    recorded: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            trace = json.loads(line)
            for trace_id, control in requests:
                if trace["question"] == traces[trace_id]["question"][:300] and trace["recording"]["policy"]["policy"] \
                        == control["policy"]:  # fmt: skip
                    recorded[trace_id] = trace  # (the last one: a module-scoped server may have served it before)
    assert set(recorded) == set(live)

    for trace_id, trace in recorded.items():
        check_trace(trace)
        original, info = traces[trace_id], live[trace_id]["thinkbrake"]
        # the thinking as the model streamed it (the dev traces end theirs with the newline before </think>)
        assert trace["thinking"] == original["thinking"] and trace["closed"]
        assert trace["final"] == original["final"][:FINAL_CHARS].lstrip()
        assert (trace["model"], trace["tokenizer"]) == ("tiny-r1", tokenizer)
        assert trace["recording"]["thinking_tokens"] == info["thinking_tokens"]
        assert not info["stopped"] and info["shadow"]["would_stop"] == (trace_id != TEXT_NATURAL)
        # a dense probe in every stretch of 64 thinking tokens (at the end of the delta that reached it; a lagging
        # reader may get a few tokens in one delta), a wait probe at every whole-word "Wait" but the last
        stretches = [row[0] // PROBE_EVERY for row in trace["probes"] if row[6] == "dense"]
        assert stretches == sorted(set(stretches)) and min(stretches) >= 1
        assert len(stretches) >= info["thinking_tokens"] // PROBE_EVERY // 2
        waits = {row[1] for row in trace["wait_probes"]}
        written = {match.start() for match in WAIT_WORD.finditer(trace["thinking"])}
        assert waits <= written and len(waits) >= len(written) - 1

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps(recorded[trace_id]) + "\n" for trace_id in (TEXT_STOPPED, TEXT_NATURAL)))
    # embedded: the recorded tokenizer (the model's folder) is found as it is; proxy: the upstream's model name is
    # no folder here, so replay is told where the tokenizer is
    stopped, natural = replay(text, None if embedded else str(tiny_model_dir), "--policy", "fcs_reflection")
    shadow = live[TEXT_STOPPED]["thinkbrake"]["shadow"]
    outcome = stopped["outcome"]
    print(f"{TEXT_STOPPED}: live {shadow['reason']} {shadow['answer']} @{shadow['stop_tokens']}; replay "
          f"{outcome['reason']} {outcome['answer']} @{outcome['tokens']}")  # fmt: skip
    assert outcome["stopped"] and (outcome["reason"], outcome["answer"]) == (shadow["reason"], shadow["answer"])
    assert outcome["tokens"] <= shadow["stop_tokens"] <= outcome["tokens"] + FEW_TOKENS
    assert not natural["outcome"]["stopped"]
    assert natural["tokens"] == live[TEXT_NATURAL]["thinkbrake"]["thinking_tokens"]  # the same count, end tag in

    probed = tmp_path / "probed.jsonl"
    probed.write_text(json.dumps(recorded[PROBED]) + "\n")
    args = [f"--policy-arg={key}={value}" for key, value in FIRST_PROBE.items() if key != "policy"]
    (replayed,) = replay(probed, None if embedded else str(tiny_model_dir), "--policy", "probe_fcs", *args)
    shadow, outcome = live[PROBED]["thinkbrake"]["shadow"], replayed["outcome"]
    first = recorded[PROBED]["wait_probes"][0]
    print(f"{PROBED}: first wait probe at {first[0]} ({first[2]!r}, {first[3]:.3g}); live {shadow['reason']} "
          f"{shadow['answer']} @{shadow['stop_tokens']}; replay {outcome['reason']} {outcome['answer']} "
          f"@{outcome['tokens']}")  # fmt: skip
    assert shadow["would_stop"] and shadow["reason"] == "probe_confident"
    assert outcome["stopped"] and (outcome["reason"], outcome["answer"]) == (shadow["reason"], shadow["answer"])
    assert outcome["answer"] == traces[PROBED]["reference"] and outcome["missing_probes"] == 0
    assert first[0] < outcome["tokens"] and first[0] < shadow["stop_tokens"]
