"""``thinkbrake serve --calibration FILE``: the served model's entry chooses each request's policy by risk level.

A real ``thinkbrake serve`` process in front of the fake upstream (model ``fake-reasoner``), the real ``openai``
client. The calibration file is written here with two levels whose policies are told apart in the response's
``thinkbrake`` object: 1% runs ``fcs_reflection``, 5% runs ``first_answer`` (which stops the written trace at its
first answer).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from controller.calibration import FORMAT, VERSION
from controller.policies import PolicyError
from server.calibrated import ServedCalibration
from server.protocol import ChatCompletionRequest, parse_control
from server.settings import Settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import thinkbrake_process

MODEL = "fake-reasoner"
QUESTION = [{"role": "user", "content": "What is the sum of the first ten positive integers?"}]
TRACE = {"fake_trace": 2}  # the written QwQ trace: first answer 55, confirmed, then more checking
LEVELS = [
    {"risk": 0.01, "policy": {"policy": "fcs_reflection"}, "certified": True, "bound": 0.009, "n": 900},
    {"risk": 0.05, "policy": {"policy": "first_answer"}, "certified": True, "bound": 0.04, "n": 900},
]


def calibration(default_risk: float = 0.01) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "delta": 0.05, "label": "model", "default_risk": default_risk,
            "models": {f"org/{MODEL}": {"traces": 900, "data_sha256": "", "levels": LEVELS}}}  # fmt: skip


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    path.write_text(json.dumps(calibration()))
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url, "--calibration", str(path)) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {**TRACE, **extra}
    if not stream:
        response = client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=body)
        return dict(response.model_extra["thinkbrake"])
    chunks = client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=body, stream=True)
    infos = [chunk.model_extra["thinkbrake"] for chunk in chunks if (chunk.model_extra or {}).get("thinkbrake")]
    assert len(infos) == 1
    return dict(infos[0])


@pytest.mark.parametrize(
    ("extra", "policy", "risk"),
    [
        ({}, "fcs_reflection", 0.01),  # the file's default_risk
        ({"thinkbrake": {"risk": 0.05}}, "first_answer", 0.05),
        ({"thinkbrake": {"risk": 0.03}}, "fcs_reflection", 0.01),  # the largest level at or below 3%
        ({"thinkbrake": {"risk": 0.001}}, "off", 0.001),  # below every level: no early stop
        ({"reasoning_effort": "low"}, "first_answer", 0.05),  # low effort: the loosest level
        ({"reasoning_effort": "medium"}, "fcs_reflection", 0.01),  # medium: the tightest
        ({"reasoning_effort": "high"}, "off", None),  # high: never stops early, no level
        ({"thinkbrake": {"policy": "first_answer"}}, "first_answer", None),  # a named policy wins, no level
        ({"reasoning_effort": "low", "thinkbrake": {"risk": 0.01}}, "fcs_reflection", 0.01),  # risk beats effort
    ],
)
def test_a_request_runs_the_level_it_asks_for(client: openai.OpenAI, extra: Any, policy: str, risk: Any) -> None:
    info = ask(client, **extra)
    assert info["policy"] == policy and info.get("risk") == risk, info


@pytest.mark.parametrize("stream", [False, True])
def test_the_calibrated_policy_acts(client: openai.OpenAI, stream: bool) -> None:
    loose = ask(client, stream, thinkbrake={"risk": 0.05})
    assert loose["stopped"] and loose["reason"] == "first_answer" and loose["answer"] == "55", loose
    assert loose["risk"] == 0.05
    off = ask(client, stream, thinkbrake={"risk": 0.001})
    assert not off["stopped"] and off["policy"] == "off"


def test_policy_arguments_lay_over_the_level(client: openai.OpenAI) -> None:
    info = ask(client, thinkbrake={"risk": 0.05, "min_thinking_tokens": 100000})
    assert info["policy"] == "first_answer" and info["risk"] == 0.05 and not info["stopped"], info


@pytest.mark.parametrize(
    ("thinkbrake", "message"),
    [
        ({"risk": 2}, "must be a number in (0, 1)"),
        ({"risk": "low"}, "must be a number in (0, 1)"),
        ({"risk": 0.02, "policy": "off"}, "either a policy or a risk"),
    ],
)
def test_a_bad_risk_is_a_400_naming_it(client: openai.OpenAI, thinkbrake: Any, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        ask(client, thinkbrake=thinkbrake)
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] == "thinkbrake.risk" and message in error["message"], error


def test_a_risk_without_a_calibration_is_a_400() -> None:
    request = ChatCompletionRequest(model=MODEL, messages=QUESTION, thinkbrake={"risk": 0.02})
    with pytest.raises(PolicyError) as raised:
        parse_control(request.thinkbrake, Settings(upstream="http://u"), 0.5)
    assert raised.value.field == "thinkbrake.risk" and "--calibration" in raised.value.message


def test_levels_are_found_by_the_models_last_path_component() -> None:
    served = ServedCalibration(calibration(), "file")
    assert served.levels("/models/fake-reasoner") == [0.01, 0.05]
    assert served.choose("other-model", 0.05) is None  # not in the file: the server's own default applies
    shipped = ServedCalibration.load("default")
    assert shipped.levels("Qwen/Qwen3-8B") and shipped.levels("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "--calibration"), (json.dumps({"format": "other"}), "not a thinkbrake-calibration file")],
)
def test_serve_refuses_a_file_it_cannot_use(tmp_path: pathlib.Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    command = [sys.executable, "-m", "server.cli", "serve", "--upstream", "http://127.0.0.1:9", "--calibration",
               str(path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and expected in done.stderr and str(path) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    risk_alone = [sys.executable, "-m", "server.cli", "serve", "--upstream", "http://127.0.0.1:9", "--risk", "0.02"]
    done = subprocess.run(risk_alone, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "--risk needs --calibration" in done.stderr, done.stderr
