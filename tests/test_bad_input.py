"""Bad input: generated requests from the service's own OpenAPI schema never cause a 5xx; oversized bodies get
413; malformed JSON, wrong types, out-of-range sampling values and unknown ``thinkbrake`` fields get 400, all in
the OpenAI error shape.

thinkbrake runs as a process (``--max-body-bytes 65536``) in front of the fake upstream, which answers anything
well-formed at once, so only thinkbrake's own handling is under test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import thinkbrake_process

BODY_LIMIT = 65536
MODEL = "fake-reasoner"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
EXAMPLES = 100  # per operation and generation mode


@pytest.fixture(scope="module")
def thinkbrake() -> Iterator[str]:
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url, "--max-body-bytes", str(BODY_LIMIT)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(thinkbrake: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thinkbrake}/v1", api_key="unused", max_retries=0, timeout=20)


def error_of(body: Any) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error body (all four fields present)."""
    assert isinstance(body, dict), body
    error = body.get("error", body)  # the SDK hands over the inner object
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


# -- schema-driven fuzzing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "mode"),
    [("/v1/chat/completions", "positive"), ("/v1/chat/completions", "negative"), ("/v1/completions", "positive"),
     ("/v1/completions", "negative"), ("/v1/models", "positive"), ("/health", "positive")],
)  # fmt: skip
def test_generated_requests_never_cause_a_server_error(thinkbrake: str, path: str, mode: str) -> None:
    """Negative generation only where there is input to break (the GET operations take none)."""
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{thinkbrake}/openapi.json")
    operation = next(iter(schema[path].values()))
    generation_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    strategy = operation.as_strategy(generation_mode=generation_mode)
    seen: dict[int, int] = {}

    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any) -> None:
        response = case.call(base_url=thinkbrake, timeout=20)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            error_of(response.json())

    check()
    print(path, mode, "status counts:", seen)
    assert seen


# -- body size ------------------------------------------------------------------------------------------------------


def test_oversized_body_with_content_length_is_413(client: openai.OpenAI) -> None:
    big = [{"role": "user", "content": "x" * (BODY_LIMIT + 1)}]
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=MODEL, messages=big)  # type: ignore[arg-type]
    assert raised.value.status_code == 413
    assert error_of(raised.value.body)["code"] == "request_too_large"


def test_oversized_chunked_body_is_413(thinkbrake: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "fake-reasoner", "messages": [{"role": "user", "content": "'
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b"x" * 1024
        yield b'"}]}'

    response = httpx.post(f"{thinkbrake}/v1/chat/completions", content=chunks(), timeout=60)
    assert response.status_code == 413
    error_of(response.json())


def test_body_under_the_limit_is_served(client: openai.OpenAI) -> None:
    fits = [{"role": "user", "content": "x" * (BODY_LIMIT - 1024)}]
    response = client.chat.completions.create(model=MODEL, messages=fits, max_tokens=5)  # type: ignore[arg-type]
    assert response.choices[0].finish_reason == "length"


def test_huge_declared_length_is_refused_before_reading(thinkbrake: str) -> None:
    host, port = thinkbrake.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n{"
        )
        reply = read_http_response(sock)
    assert reply.startswith("HTTP/1.1 413")
    error_of(json.loads(reply.split("\r\n\r\n", 1)[1]))


def read_http_response(sock: socket.socket) -> str:
    """One whole HTTP/1.1 response (headers and a Content-Length body), however the bytes arrive."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


# -- malformed and invalid requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[]", b"null", b'{"model": "fake-reasoner", "messages": [', "\udcff".encode("utf-8", "surrogatepass")],
    ids=["broken", "empty", "array", "null", "truncated", "bad-utf8"],
)  # fmt: skip
def test_malformed_json_is_400(thinkbrake: str, raw: bytes) -> None:
    response = httpx.post(
        f"{thinkbrake}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 400, response.text
    error_of(response.json())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", "hello"),
        ("messages", []),
        ("messages", [{"content": "no role"}]),
        ("n", "two"),
        ("stream", "maybe"),
        ("max_tokens", "many"),
        ("temperature", "hot"),
        ("stop", 5),
        ("thinkbrake", "fast"),
        ("stream_options", {"include_usage": "sometimes"}),
    ],
)
def test_wrong_types_are_400(client: openai.OpenAI, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={field: value})
    error = error_of(raised.value.body)
    assert error["param"] and error["param"].split(".")[0] == field, error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("top_p", 0),
        ("n", 0),
        ("n", 1000),
        ("max_tokens", 0),
        ("max_completion_tokens", -5),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
    ],
)
def test_out_of_range_sampling_values_are_400(client: openai.OpenAI, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={field: value})
    assert error_of(raised.value.body)["param"] == field


def test_out_of_range_completion_request_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="2 + 2 =", temperature=-1)
    assert error_of(raised.value.body)["param"] == "temperature"


@pytest.mark.parametrize(
    ("control", "param"),
    [
        ({"polcy": "off"}, "thinkbrake.polcy"),
        ({"policy": "first_answer", "k": 3}, "thinkbrake.k"),
        ({"policy": "no_such_policy"}, "thinkbrake.policy"),
        ({"policy": "budget"}, "thinkbrake.max_thinking_tokens"),
        ({"finalize": "later"}, "thinkbrake.finalize"),
        ({"max_answer_tokens": 0}, "thinkbrake.max_answer_tokens"),
        ({"min_thinking_tokens": -1}, "thinkbrake.min_thinking_tokens"),
        ({"max_thinking_tokens": "lots"}, "thinkbrake.max_thinking_tokens"),
        ({"shadow": "yes"}, "thinkbrake.shadow"),
        ({"policy": "consistency", "k": {"nested": 1}}, "thinkbrake.k"),
    ],
)
def test_bad_thinkbrake_fields_are_400_naming_the_field(
    client: openai.OpenAI, control: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"thinkbrake": control})
    assert error_of(raised.value.body)["param"] == param


@given(control=st.dictionaries(st.text(max_size=12), st.none() | st.booleans() | st.integers() | st.text(max_size=8)))
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_random_thinkbrake_objects_are_200_or_400(thinkbrake: str, control: dict[str, Any]) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "thinkbrake": control}
    response = httpx.post(f"{thinkbrake}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert error_of(response.json())["param"].startswith("thinkbrake")


# -- as strict as vLLM's OpenAI server -------------------------------------------------------------------------


def test_an_unknown_message_role_is_400_naming_it(client: openai.OpenAI) -> None:
    wizard = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "What is 2 + 2?"}]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=wizard)  # type: ignore[arg-type]
    error = error_of(raised.value.body)
    assert error["param"] == "messages.1.role" and "'wizard'" in error["message"], error
    for role in ("system", "developer", "assistant"):  # the roles OpenAI accepts are served
        messages = [{"role": role, "content": "Be brief."}, *MESSAGES]
        response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        assert response.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", None], ids=["form", "text", "none"]
)
def test_a_json_body_with_another_content_type_is_400(thinkbrake: str, content_type: str | None) -> None:
    """As vLLM's OpenAI server answers (its ``validate_json_request``): only ``application/json`` is read."""
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 4}).encode()
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = httpx.post(f"{thinkbrake}{path}", content=body, headers=headers, timeout=60)
        assert response.status_code == 400, response.text
        error = error_of(response.json())
        assert error["code"] == "unsupported_media_type" and error["param"] is None
        assert "Only 'application/json' is allowed" in error["message"]
        assert (content_type or "none") in error["message"]


def test_json_with_a_charset_is_served(thinkbrake: str) -> None:
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 4}).encode()
    headers = {"content-type": "application/json; charset=utf-8"}
    response = httpx.post(f"{thinkbrake}/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text


def test_client_and_server_errors_are_separate_outcomes(thinkbrake: str, client: openai.OpenAI) -> None:
    """An upstream that refuses the request (a 4xx) is the client's error; one that fails (a 5xx) is the server's:
    only server errors feed the error-rate alert (``deploy/prometheus/alerts.yml``)."""

    def outcomes() -> dict[str, float]:
        text = httpx.get(f"{thinkbrake}/metrics", timeout=60).text
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("thinkbrake_requests_total{") and f'model="{MODEL}"' in line:
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                found[outcome] = found.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    before = outcomes()
    for fault, status in (("status:400", 400), ("status:503", 502)):
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"fake_fault": fault})
        assert raised.value.status_code == status
    after = outcomes()
    assert "error" not in after
    assert after["client_error"] - before.get("client_error", 0) == 1
    assert after["server_error"] - before.get("server_error", 0) == 1
