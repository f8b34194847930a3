"""Fast tests of the server's HTTP layer and helpers, without an engine.

A scripted in-memory backend (:class:`FakeBackend`) stands in for vLLM where a real engine cannot produce the
situation (a failure in the middle of a stream, a backend that is still loading); everything else about the
server (routing, SSE framing, error shapes, the controller) is the real code.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from controller.delimiters import delimiters_for
from controller.policies import PolicyError
from server import cli
from server.app import build_app
from server.backend import BackendError, Chunk, Prompt, Sampling, TextPrompt, tokens_through
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    parse_control,
)
from server.settings import Settings
from server.sse import CompletionFrames, DeltaFrames, sse
from server.upstream import RawTextRebuilder


class FakeGeneration:
    def __init__(self, chunks: list[Chunk], fail_after: int | None) -> None:
        self.chunks, self.fail_after = chunks, fail_after
        self.prompt_token_ids: list[int] | None = [1, 2, 3]
        self.aborted = False

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        for index, chunk in enumerate(self.chunks):
            if self.fail_after is not None and index >= self.fail_after:
                raise BackendError("the engine fell over")
            if self.aborted:
                return
            await asyncio.sleep(0)
            yield chunk

    async def abort(self) -> None:
        self.aborted = True


class FakeBackend:
    model_name = "fake"
    delimiters = delimiters_for("think-implicit")
    think_end_text = "\n</think>\n\n"

    def __init__(self, text: str, answer: str, fail_after: int | None = None) -> None:
        words = text.split(" ")
        self.thinking = [Chunk(word + " ", [7]) for word in words[:-1]] + [Chunk(words[-1], [7])]
        self.answer = [Chunk("</think>", [8]), Chunk(answer, [9], "stop")]
        self.fail_after = fail_after
        self.started = asyncio.Event()
        self.generations: list[FakeGeneration] = []

    @property
    def ready(self) -> bool:
        return self.started.is_set()

    async def start(self) -> None:
        self.started.set()

    async def shutdown(self) -> None:
        pass

    def generate(self, prompt: Prompt, sampling: Sampling, request_id: str) -> FakeGeneration:
        generation = FakeGeneration(self.thinking + self.answer, self.fail_after)
        self.generations.append(generation)
        return generation

    def continue_tokens(self, token_ids: list[int], sampling: Sampling, request_id: str) -> FakeGeneration:
        return FakeGeneration([Chunk("It is 42.", [9, 9], "stop")], None)

    async def encode(self, text: str) -> list[int] | None:
        return [8]

    async def prompt_tail(self, prompt: TextPrompt) -> str:
        return (prompt.text or "")[-64:]


TRACE = "So 6 * 7 = 42. So the answer is 42.\nWait, let me check. 7 * 6 = 42, so the answer is 42.\nHmm, once more."


def make_client(backend: FakeBackend, **settings: object) -> TestClient:
    app = build_app(Settings(model="fake", **settings), backend, Metrics(registry=CollectorRegistry()))
    return TestClient(app)


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def test_stop_and_continuation_through_the_http_layer():
    backend = FakeBackend(TRACE, "ignored")
    with make_client(backend) as client:
        body = {"messages": [{"role": "user", "content": "6*7?"}]}
        data = client.post("/v1/chat/completions", json=body).json()
    message = data["choices"][0]["message"]
    assert data["thinkbrake"]["stopped"] and data["thinkbrake"]["answer"] == "42"
    assert "once more" not in message["reasoning_content"] and message["content"] == "\n\nIt is 42."
    assert backend.generations[0].aborted
    assert data["usage"]["completion_tokens"] == data["thinkbrake"]["thinking_tokens"] + 2


def test_failure_mid_stream_is_one_error_event_then_done():
    backend = FakeBackend(TRACE, "ignored", fail_after=3)
    with make_client(backend) as client:
        body = {"messages": [{"role": "user", "content": "6*7?"}], "stream": True}
        response = client.post("/v1/chat/completions", json=body)
    events = sse_events(response.text)
    assert response.status_code == 200 and events[-1] == "[DONE]"
    errors = [json.loads(event) for event in events[:-1] if "error" in json.loads(event)]
    assert len(errors) == 1 and errors[0]["error"]["message"] == "the engine fell over"
    assert "error" in json.loads(events[-2])


TRICKY_TEXTS = ["", "plain", 'q"uote\\back\nline\ttab', "\u00e9\u4e2d\U0001f600", "\x01\x1f\x7f", "\u2028</think>"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_delta_frames_are_the_pydantic_chunk(include_usage):
    """The hand-built per-token chat frame is byte for byte ``sse()`` of the model (spec-required nulls included)."""
    frames = DeltaFrames("chatcmpl-1", 1700000000, 'm\u00e9"x', include_usage)
    for reasoning in TRICKY_TEXTS:
        for content in TRICKY_TEXTS[:3]:
            delta = DeltaMessage(
                content=content or None, reasoning_content=reasoning or None, reasoning=reasoning or None
            )
            chunk = ChatCompletionChunk(
                id="chatcmpl-1", created=1700000000, model="m\u00e9\"x", choices=[ChatStreamChoice(index=3, delta=delta)],
                **({"usage": None} if include_usage else {}),
            )  # fmt: skip
            assert frames(3, reasoning, content) == sse(chunk)
    assert '"logprobs":null,"finish_reason":null' in frames(0, "", "x")
    assert ('"usage":null' in frames(0, "", "x")) == include_usage


def test_completion_frames_are_the_pydantic_chunk():
    frames = CompletionFrames("cmpl-1", 1700000000, "m")
    for text in TRICKY_TEXTS:
        choice = CompletionChoice(index=1, text=text)
        assert frames(1, text) == sse(CompletionResponse(id="cmpl-1", created=1700000000, model="m", choices=[choice]))
    assert '"logprobs":null,"finish_reason":null' in frames(0, "x") and "usage" not in frames(0, "x")


def test_failure_before_any_output_is_an_http_error():
    backend = FakeBackend(TRACE, "ignored", fail_after=0)
    with make_client(backend) as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 502
    assert response.json()["error"] == {
        "message": "the engine fell over", "type": "server_error", "param": None, "code": "upstream_error"
    }  # fmt: skip


def test_health_is_503_until_the_backend_is_ready():
    backend = FakeBackend(TRACE, "ignored")
    release = asyncio.Event()

    async def slow_start() -> None:
        await release.wait()
        backend.started.set()

    backend.start = slow_start  # type: ignore[method-assign]
    with make_client(backend) as client:
        response = client.get("/health")
        error = response.json()["error"]
        assert response.status_code == 503 and (error["type"], error["code"]) == ("server_error", "service_unavailable")
        assert (
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code
            == 503
        )
        client.portal.call(release.set)  # type: ignore[union-attr]
        # the start task finishes on the server's loop once it runs again: poll (a loaded machine may take a while)
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "/health never answered 200 after the backend started"
            client.portal.call(asyncio.sleep, 0.01)  # type: ignore[union-attr]


def test_completion_prompt_outside_thinking_is_not_controlled():
    backend = FakeBackend(TRACE, " done")
    with make_client(backend) as client:
        data = client.post("/v1/completions", json={"prompt": "Hello"}).json()
    assert not data["thinkbrake"]["stopped"] and data["thinkbrake"]["policy"] == "off"
    assert data["choices"][0]["text"] == TRACE + "</think> done"


@pytest.mark.parametrize("implicit", [True, False])
def test_raw_text_rebuilder_restores_tags_however_the_stream_is_split(implicit):
    delimiters = delimiters_for("think-implicit" if implicit else "think")
    expected = ("" if implicit else "<think>") + "abc def</think>\n\nanswer"
    parsed = [("abc", None), (" def", None), (None, "\n\nans"), (None, "wer")]
    rebuilder = RawTextRebuilder(delimiters)
    assert "".join(rebuilder.feed(reasoning, content) for reasoning, content in parsed) == expected
    raw = RawTextRebuilder(delimiters)  # no reasoning parser upstream: tags arrive inside content
    assert "".join(raw.feed(None, piece) for piece in ["<think>abc", " def</think>", "\n\nanswer"]) == expected


def test_settings_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("THINKBRAKE_POLICY", "consistency")
    monkeypatch.setenv("THINKBRAKE_POLICY_ARGS", "k=4,min_thinking_tokens=10")
    monkeypatch.setenv("THINKBRAKE_PORT", "9000")
    settings = Settings(port=9100)
    assert settings.port == 9100 and settings.default_policy().k == 4  # type: ignore[attr-defined]
    with pytest.raises(ValidationError):
        Settings(model="a", upstream="http://b")
    with pytest.raises(ValidationError):
        Settings(policy_args=["k=1"], policy="consistency")


def test_request_control_merges_server_defaults_and_names_bad_fields():
    settings = Settings(model="m", policy="consistency", policy_args={"k": "3"}, shadow_rate=0.5)
    control = parse_control({"min_thinking_tokens": 5}, settings, shadow_draw=0.2)
    assert control.policy.k == 3 and control.policy.min_thinking_tokens == 5 and control.shadow  # type: ignore[attr-defined]
    assert not parse_control(None, settings, shadow_draw=0.7).shadow
    assert not parse_control({"policy": "off"}, settings, shadow_draw=0.0).shadow
    for bad, field in [({"finalize": 1}, "thinkbrake.finalize"), ({"max_answer_tokens": 0}, "thinkbrake.max_answer_tokens"),
                       ({"shadow": "yes"}, "thinkbrake.shadow"), ({"k": "x"}, "thinkbrake.k")]:  # fmt: skip
        with pytest.raises(PolicyError) as caught:
            parse_control(bad, settings, 0.0)
        assert caught.value.field == field


def test_cli_has_serve_and_replay(capsys):
    for command in ("serve", "replay"):
        with pytest.raises(SystemExit) as caught:
            cli.main([command, "--help"])
        assert caught.value.code == 0
    assert "--upstream" in capsys.readouterr().out


@pytest.mark.parametrize("merged", [1, 2, 3])
def test_a_chunk_that_closes_thinking_counts_only_its_tokens_through_the_end_tag(merged: int) -> None:
    """The engine merges tokens into one chunk when the server lags: ``merged`` tokens end the thinking
    (the last thinking token, the end tag, the answer's first token...); the counts stay those of one at a time."""
    backend = FakeBackend("So 6 * 7 = 42.", "ignored")
    thinking = [Chunk("So 6 * 7 = 42.", [7, 7, 7, 7, 7]), Chunk("\n", [6])]
    tail = [Chunk("</think>", [8]), Chunk("\n\n", [5]), Chunk("It is ", [9, 9]), Chunk("42.", [9], "stop")]
    stream = thinking + tail
    start = len(thinking) - 1 if merged == 3 else len(thinking)
    group = stream[start : start + merged]
    joined = Chunk("".join(c.text for c in group), [i for c in group for i in c.token_ids], group[-1].finish_reason)
    backend.thinking, backend.answer = stream[:start], [joined, *stream[start + merged :]]
    with make_client(backend) as client:
        body = {"messages": [{"role": "user", "content": "6*7?"}], "thinkbrake": {"policy": "fcs_reflection"}}
        data = client.post("/v1/chat/completions", json=body).json()
    info = data["thinkbrake"]
    assert not info["stopped"] and data["choices"][0]["message"]["content"] == "\n\nIt is 42."
    assert (info["thinking_tokens"], info["answer_tokens"]) == (7, 4)


def test_tokens_through_finds_the_end_ids_also_split_across_chunks() -> None:
    assert tokens_through([8], [1, 2], [3, 8, 5, 9]) == 2
    assert tokens_through([8], [1, 8], [5, 9]) is None
    assert tokens_through([4, 8], [1, 4], [8, 5]) == 1  # the delimiter's first id came in the chunk before
    assert tokens_through([4, 8], [], [4, 8, 5]) == 2
    assert tokens_through([4, 8], [4], [9, 4, 8]) == 3
    assert tokens_through([4, 8], [1], [4, 9, 8]) is None


def test_upstream_closes_thinking_with_the_event_that_carries_the_end_tag() -> None:
    """vLLM's reasoning parser sends an event whose tokens end with the end tag as reasoning only (no content):
    the rebuilt text closes the thinking there, so the next event's token is an answer token."""
    from types import SimpleNamespace

    from controller.policies import parse_policy
    from controller.session import ThinkingController
    from controller.verify import AnswerComparer
    from server.upstream import UpstreamGeneration

    backend = SimpleNamespace(delimiters=delimiters_for("think-implicit"))
    events = [
        {"choices": [{"delta": {"reasoning": "So 6 * 7 = 42."}, "token_ids": [7, 7]}]},
        {"choices": [{"delta": {"reasoning": "\n"}, "token_ids": [6, 8]}]},  # "\n" + "</think>" merged
        {"choices": [{"delta": {"content": "\n\nIt is 42."}, "token_ids": [5, 9, 9]}]},
    ]
    for end_ids, expected in (([8], (4, 3)), (None, (7, 0))):  # without: the tag comes with the answer
        generation = UpstreamGeneration(backend, "/v1/chat/completions", {}, chat=True)  # type: ignore[arg-type]
        rebuilder = RawTextRebuilder(backend.delimiters)
        chunks = [generation._parse(event, rebuilder, end_ids) for event in events]
        assert "".join(chunk.text for chunk in chunks if chunk) == "So 6 * 7 = 42.\n</think>\n\nIt is 42."
        comparer = AnswerComparer()
        controller = ThinkingController(parse_policy({"policy": "fcs_reflection"}), backend.delimiters, comparer)
        for chunk in chunks:
            assert chunk is not None
            controller.feed(chunk.text, len(chunk.token_ids))
        comparer.close()
        assert (controller.thinking_tokens, controller.answer_tokens) == expected
