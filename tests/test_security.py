"""Access control: API keys (flags, file, environment), open or protected /health and /metrics, the upstream's key
kept between thinkbrake and the upstream, and no request or completion text in the logs.

thinkbrake runs as a real process in front of the fake upstream, which records every header it receives.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import httpx
import openai
import pytest

from server.security import KeyChecker
from tests.support.fake_upstream import FakeUpstream, Trace
from tests.support.servers import thinkbrake_process

MODEL = "fake-reasoner"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
KEYS = ("sk-first-key-0123456789", "sk-second-key-abcdef")
UPSTREAM_KEY = "sk-upstream-secret-42"
#: markers that must never appear in the logs: one in the request, two in the upstream's completion
REQUEST_MARKER = "zebra-request-7731"
THINKING_MARKER = "quokka-thinking-5510"
ANSWER_MARKER = "narwhal-answer-0429"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    traces = [Trace(f"I think about {THINKING_MARKER}. So the answer is 4.\n\nWait, 2 + 2 is 4. So the answer is 4.\n\n"
                    "Hmm, let me think more about it, it is still 4.", f"The answer is {ANSWER_MARKER}.")]  # fmt: skip
    with FakeUpstream(traces, api_key=UPSTREAM_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("logs") / "thinkbrake.log"


@pytest.fixture(scope="module")
def thinkbrake(upstream: FakeUpstream, log_path: pathlib.Path) -> Iterator[str]:
    flags = ["--api-key", KEYS[0], "--api-key", KEYS[1], "--upstream-api-key", UPSTREAM_KEY]
    with thinkbrake_process(upstream.url, *flags, log_path=log_path) as (url, _):
        yield url


def client_with(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=20)


def assert_auth_error(body: object) -> None:
    assert isinstance(body, dict)
    error = body.get("error", body)
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"


def test_key_checker_accepts_exactly_the_configured_keys() -> None:
    checker = KeyChecker(list(KEYS))
    assert all(checker.accepts(key.encode()) for key in KEYS)
    for wrong in (b"", b"sk-first-key-012345678", b"sk-first-key-01234567890", KEYS[0].upper().encode()):
        assert not checker.accepts(wrong)
    assert not KeyChecker([])


@pytest.mark.parametrize("key", KEYS)
def test_configured_keys_are_accepted(thinkbrake: str, key: str) -> None:
    response = client_with(thinkbrake, key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert response.choices[0].message.content
    assert [model.id for model in client_with(thinkbrake, key).models.list()] == [MODEL]


@pytest.mark.parametrize("key", ["wrong", KEYS[0] + "x", KEYS[0][:-1]])
def test_wrong_key_is_401(thinkbrake: str, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        client_with(thinkbrake, key).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert raised.value.status_code == 401
    assert_auth_error(raised.value.body)


@pytest.mark.parametrize("headers", [{}, {"authorization": "Basic c2stZmlyc3Q="}, {"authorization": "Bearer"}])
def test_missing_key_is_401_everywhere_but_health_and_metrics(thinkbrake: str, headers: dict[str, str]) -> None:
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("GET", "/openapi.json"), ("GET", "/docs")]:  # fmt: skip
        response = httpx.request(method, f"{thinkbrake}{path}", headers=headers, json={}, timeout=60)
        assert response.status_code == 401, path
        assert_auth_error(response.json())
    assert httpx.get(f"{thinkbrake}/health", headers=headers, timeout=60).status_code == 200
    assert httpx.get(f"{thinkbrake}/metrics", headers=headers, timeout=60).status_code == 200


def test_protected_health_and_metrics(upstream: FakeUpstream) -> None:
    flags = ["--api-key", KEYS[0], "--protect-health", "--protect-metrics", "--upstream-api-key", UPSTREAM_KEY]
    with thinkbrake_process(upstream.url, *flags) as (url, _):
        for path in ("/health", "/metrics"):
            response = httpx.get(f"{url}{path}", timeout=60)
            assert response.status_code == 401
            assert_auth_error(response.json())
            authorized = httpx.get(f"{url}{path}", headers={"authorization": f"Bearer {KEYS[0]}"}, timeout=60)
            assert authorized.status_code == 200


def test_keys_from_file_and_environment(upstream: FakeUpstream, tmp_path: pathlib.Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nsk-from-file\n\n")
    flags = ["--api-key-file", str(key_file), "--upstream-api-key", UPSTREAM_KEY]
    with thinkbrake_process(upstream.url, *flags, env={"THINKBRAKE_API_KEYS": "sk-env-1, sk-env-2"}) as (url, _):
        for key in ("sk-from-file", "sk-env-1", "sk-env-2"):
            assert client_with(url, key).chat.completions.create(model=MODEL, messages=MESSAGES).choices
        with pytest.raises(openai.AuthenticationError):
            client_with(url, "sk-env-1,sk-env-2").chat.completions.create(model=MODEL, messages=MESSAGES)


def test_no_keys_configured_means_open(upstream: FakeUpstream) -> None:
    with thinkbrake_process(upstream.url, "--upstream-api-key", UPSTREAM_KEY) as (url, _):
        assert client_with(url, "anything").chat.completions.create(model=MODEL, messages=MESSAGES).choices


def test_upstream_key_is_never_forwarded_from_or_exposed_to_clients(thinkbrake: str, upstream: FakeUpstream) -> None:
    started = len(upstream.requests)
    client = client_with(thinkbrake, KEYS[0])
    bodies = [client.chat.completions.create(model=MODEL, messages=MESSAGES).model_dump_json()]
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
        bodies.append(chunk.model_dump_json())
    bodies.append(client.completions.create(model=MODEL, prompt="2 + 2 =").model_dump_json())
    bodies.append(httpx.get(f"{thinkbrake}/metrics", timeout=60).text)
    for fault in ("echo_auth", "status:500"):  # an upstream error message that quotes the key it was sent
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as raised:
                result = client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, stream=stream, extra_body={"fake_fault": fault}
                )
                if stream:
                    list(result)  # type: ignore[arg-type]
            bodies.append(raised.value.response.text)
    seen = upstream.requests[started:]
    assert seen and all(record.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}" for record in seen)
    for record in seen:
        assert KEYS[0] not in repr(record.headers) and KEYS[0] not in repr(record.body)
    for body in bodies:
        assert UPSTREAM_KEY not in body


def test_bodies_and_completions_are_not_logged(thinkbrake: str, log_path: pathlib.Path) -> None:
    client = client_with(thinkbrake, KEYS[0])
    messages = [{"role": "user", "content": f"Tell me about {REQUEST_MARKER}."}]
    client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    for _ in client.chat.completions.create(model=MODEL, messages=messages, stream=True):  # type: ignore[arg-type]
        pass
    with pytest.raises(openai.BadRequestError):  # a rejected request is not logged either
        client.chat.completions.create(model=MODEL, messages=messages, extra_body={"n": REQUEST_MARKER})  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model=MODEL, messages=messages, extra_body={"fake_fault": "malformed@2"})  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        client_with(thinkbrake, "sk-wrong-key-in-log").chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    log = log_path.read_text(errors="replace")
    assert "POST /v1/chat/completions" in log  # the log is being written
    for secret in (REQUEST_MARKER, THINKING_MARKER, ANSWER_MARKER, UPSTREAM_KEY, *KEYS, "sk-wrong-key-in-log"):
        assert secret not in log, secret
