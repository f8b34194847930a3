"""Real responses validate against the official OpenAI specification (upstream mode; the embedded engine's are
checked in ``tests/test_serve_embedded.py`` on that module's server).

thinkbrake runs as a process in front of the fake upstream (real sockets), with an API key and a small body
limit so that every error class can be produced: each body and each SSE chunk is validated with ``jsonschema``
against the schema the specification gives for it (:mod:`tests.support.openai_spec`). Besides the schema, the
fields the specification makes required-but-nullable are checked to be written the way OpenAI writes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import openai_spec as spec
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import thinkbrake_process

KEY = "spec-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 16384
MODEL = "fake-reasoner"
MESSAGES = [{"role": "user", "content": "What is 6 * 7?"}]
PROMPT = "Question: what is 6 * 7?\n<think>\n"  # leaves the model inside thinking: the completion is controlled
#: a written trace the text rule stops (``QWQ_BOXED``: 55, a value the question does not hold). The text rule
#: decides on the text as it is read, so the stop does not depend on this machine's speed (the default policy's
#: stop waits on its answer probes, which may come back after an unpaced trace has ended on a loaded machine).
#: Streams are paced (the fake upstream's ``fake_token_rate``) so that tokens arrive as many SSE chunks.
TRACE = {"fake_trace": 2, "thinkbrake": {"policy": "fcs_reflection"}}
PACED = {"fake_token_rate": 2000, **TRACE}


@pytest.fixture(scope="module")
def thinkbrake() -> Iterator[str]:
    flags = ("--api-key", KEY, "--max-body-bytes", str(BODY_LIMIT))
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url, *flags) as (url, _):
        yield url


def post(base: str, path: str, body: Any = None, content: bytes | None = None, headers: Any = None) -> httpx.Response:
    sent = {**AUTH, **(headers or {})}
    if content is not None:
        return httpx.post(f"{base}{path}", content=content, headers=sent, timeout=30)
    return httpx.post(f"{base}{path}", json=body, headers=sent, timeout=30)


def check_usage(usage: dict[str, Any]) -> None:
    """Details are objects or absent, never null; the counts add up."""
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(usage["completion_tokens_details"]["reasoning_tokens"], int)
    assert usage.get("prompt_tokens_details", {}) is not None


# -- success --------------------------------------------------------------------------------------------------


def test_models(thinkbrake: str) -> None:
    response = httpx.get(f"{thinkbrake}/v1/models", headers=AUTH, timeout=60)
    assert response.status_code == 200
    spec.assert_valid(spec.MODELS, response.json())


@pytest.mark.parametrize("n", [1, 2])
def test_chat(thinkbrake: str, n: int) -> None:
    response = post(thinkbrake, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": n, **TRACE})
    assert response.status_code == 200, response.text
    data = response.json()
    spec.assert_valid(spec.CHAT, data)
    assert len(data["choices"]) == n and data["thinkbrake"]["stopped"]
    for choice in data["choices"]:
        assert choice["logprobs"] is None and choice["message"]["refusal"] is None
        assert choice["message"]["reasoning_content"] and choice["thinkbrake"]
    check_usage(data["usage"])


@pytest.mark.parametrize(("n", "include_usage"), [(1, False), (2, True)])
def test_chat_stream(thinkbrake: str, n: int, include_usage: bool) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "n": n, "stream": True, **PACED}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response = post(thinkbrake, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    chunks = spec.sse_payloads(response.text)
    assert spec.assert_valid_stream(spec.CHAT_CHUNK, chunks, "chat stream") >= 5
    check_stream(chunks, n, include_usage)
    reasoning = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("reasoning_content")]
    assert reasoning and all(c["choices"][0]["finish_reason"] is None for c in reasoning)


@pytest.mark.parametrize("n", [1, 2])
def test_completions(thinkbrake: str, n: int) -> None:
    response = post(thinkbrake, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": n, **TRACE})
    assert response.status_code == 200, response.text
    data = response.json()
    spec.assert_valid(spec.COMPLETION, data)
    assert len(data["choices"]) == n and data["thinkbrake"]["stopped"]
    assert all(choice["logprobs"] is None and choice["finish_reason"] == "stop" for choice in data["choices"])
    check_usage(data["usage"])


@pytest.mark.parametrize(("n", "include_usage"), [(1, False), (2, True)])
def test_completions_stream(thinkbrake: str, n: int, include_usage: bool) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "n": n, "stream": True, **PACED}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response = post(thinkbrake, "/v1/completions", body)
    assert response.status_code == 200, response.text
    chunks = spec.sse_payloads(response.text)
    assert spec.assert_valid_stream(spec.COMPLETION_CHUNK, chunks, "completion stream") >= 5
    check_stream(chunks, n, include_usage)


def check_stream(chunks: list[dict[str, Any]], n: int, include_usage: bool) -> None:
    """As OpenAI streams: ``logprobs`` and ``finish_reason`` on every choice, null until each choice's one final
    chunk; ``usage`` absent without ``include_usage``, else on the last chunk (choices ``[]``) and null on the
    others (chat; completion chunks leave it out, the specification does not allow null there)."""
    finals = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"] is not None]
    assert sorted(c["index"] for c in finals) == list(range(n))
    for chunk in chunks:
        for choice in chunk["choices"]:
            assert "logprobs" in choice and choice["logprobs"] is None
            assert "finish_reason" in choice
    body, last = (chunks[:-1], chunks[-1]) if include_usage else (chunks, None)
    if include_usage:
        assert last is not None and last["choices"] == []
        check_usage(last["usage"])
        chat = chunks[0]["object"] == "chat.completion.chunk"
        assert all(chunk["usage"] is None if chat else "usage" not in chunk for chunk in body)
    else:
        assert all("usage" not in chunk for chunk in body)
    summaries = [chunk["thinkbrake"] for chunk in chunks if "thinkbrake" in chunk]
    assert len(summaries) == 1 and summaries[0]["stopped"]


# -- errors -----------------------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    data = response.json()
    spec.assert_valid(spec.ERROR, data, f"{status} error")
    error = data["error"]
    assert error["code"] == code and error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error"), error
    return error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"messages": MESSAGES, "thinkbrake": {"k": "x"}}, "thinkbrake.k"),
        ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": 0}, "n"),
    ],
)
def test_bad_parameter_is_400(thinkbrake: str, path: str, body: dict[str, Any], param: str) -> None:
    error = assert_error(post(thinkbrake, path, body), 400, "invalid_request_error", param)
    assert param.split(".")[-1] in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "x", "messages": [', b"", b"[]"])
def test_invalid_json_is_400_without_a_param(thinkbrake: str, raw: bytes) -> None:
    response = post(thinkbrake, "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 400, "invalid_json" if raw.startswith(b"{") else "invalid_request_error")
    assert error["message"].startswith("The request body ") and "JSON" in error["message"], error


def test_unknown_model_is_404(thinkbrake: str) -> None:
    response = post(thinkbrake, "/v1/chat/completions", {"model": "nope", "messages": MESSAGES})
    assert_error(response, 404, "model_not_found", "model")


def test_unknown_path_is_404(thinkbrake: str) -> None:
    assert_error(post(thinkbrake, "/v1/nothing", {}), 404, "not_found")


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_failure_is_502(thinkbrake: str, stream: bool) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": stream, "fake_fault": "status:503"}
    error = assert_error(post(thinkbrake, "/v1/chat/completions", body), 502, "upstream_error")
    assert "injected HTTP 503" in error["message"]


def test_upstream_client_error_keeps_its_status(thinkbrake: str) -> None:
    """The upstream's own 400 (vLLM sends an integer ``code``) is passed on with a string code."""
    body = {"model": MODEL, "messages": MESSAGES, "fake_fault": "status:400"}
    assert_error(post(thinkbrake, "/v1/chat/completions", body), 400, "upstream_error")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_mid_stream_error_event(thinkbrake: str, path: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "stream": True, "fake_fault": "error@5"}
    body.update({"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": PROMPT})
    response = post(thinkbrake, path, body)
    assert response.status_code == 200
    chunks = spec.sse_payloads(response.text)
    name = spec.CHAT_CHUNK if path.endswith("chat/completions") else spec.COMPLETION_CHUNK
    spec.assert_valid_stream(name, chunks, path)
    errors = [chunk for chunk in chunks if "error" in chunk]
    assert len(errors) == 1 and errors[0] is chunks[-1]
    assert errors[0]["error"]["code"] == "upstream_error" and errors[0]["error"]["type"] == "server_error"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["missing", "wrong"])
def test_missing_or_wrong_api_key_is_401(thinkbrake: str, headers: dict[str, str]) -> None:
    response = httpx.post(f"{thinkbrake}/v1/chat/completions", json={"messages": MESSAGES}, headers=headers, timeout=60)
    assert_error(response, 401, "invalid_api_key")
    models = httpx.get(f"{thinkbrake}/v1/models", headers=headers, timeout=60)
    assert_error(models, 401, "invalid_api_key")


def test_body_too_large_is_413(thinkbrake: str) -> None:
    big = [{"role": "user", "content": "x" * BODY_LIMIT}]
    assert_error(post(thinkbrake, "/v1/chat/completions", {"model": MODEL, "messages": big}), 413, "request_too_large")


# -- the checker itself -------------------------------------------------------------------------------------------


def test_the_checker_rejects_what_the_spec_forbids(thinkbrake: str) -> None:
    """The old shapes fail: a required field dropped, null where an object is required, an integer code."""
    chat = post(thinkbrake, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **TRACE}).json()
    spec.assert_valid(spec.CHAT, chat)
    broken = [
        ("choices/0: 'logprobs' is a required property", lambda d: d["choices"][0].pop("logprobs")),
        ("choices/0/message: 'refusal' is a required property", lambda d: d["choices"][0]["message"].pop("refusal")),
        ("usage/prompt_tokens_details: None", lambda d: d["usage"].update(prompt_tokens_details=None)),
    ]
    for expected, breaks in broken:
        data = {**chat, "choices": [{**chat["choices"][0], "message": dict(chat["choices"][0]["message"])}]}
        data["usage"] = dict(chat["usage"])
        breaks(data)
        assert any(problem.startswith(expected) for problem in spec.problems(spec.CHAT, data)), expected
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
             "choices": [{"index": 0, "delta": {"content": "x"}}]}  # fmt: skip
    assert spec.problems(spec.CHAT_CHUNK, chunk) == ["choices/0: 'finish_reason' is a required property"]
    error = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": 400}}
    assert spec.problems(spec.ERROR, error)[0].startswith("error/code: 400 is not valid")
    completion = {"id": "c", "object": "text_completion", "created": 0, "model": MODEL,
                  "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]}  # fmt: skip
    assert spec.problems(spec.COMPLETION, completion)  # the spec's flaw, patched for streamed chunks only
    assert not spec.problems(spec.COMPLETION_CHUNK, completion)
