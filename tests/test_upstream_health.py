"""An upstream that cannot be reached, as ``thinkbrake serve --upstream`` reports it.

thinkbrake runs as a real process; the upstream is a port nothing listens on, then the fake upstream
(``tests/support/fake_upstream.py``) on that same port. Clients are the real ``openai`` SDK and httpx.
What must hold: a 503 ``upstream_unavailable`` naming the URL tried (without the credentials in it) on
``/health``, ``/v1/models`` and requests; attempts repeated with growing waits; one WARNING per change of state,
none per attempt; serving as soon as the upstream answers.
"""

from __future__ import annotations

import datetime
import pathlib
import re
import time

import httpx
import openai
import pytest

from server.upstream_health import BACKOFF_SECONDS, public_url
from tests.support.fake_upstream import FakeUpstream
from tests.support.fixtures import free_port
from tests.support.servers import thinkbrake_process, wait_healthy

MODEL = "fake-reasoner"
MESSAGES = [{"role": "user", "content": "What is 6 * 7?"}]
ATTEMPT = "upstream not serving yet"


def first_answer(url: str, deadline: float = 60.0) -> httpx.Response:
    """The first answer of ``url`` once the server listens."""
    end = time.monotonic() + deadline
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < end, f"{url} never answered"
            time.sleep(0.1)


def wait_for_lines(log: pathlib.Path, marker: str, count: int, deadline: float = 120.0) -> list[str]:
    end = time.monotonic() + deadline
    while True:
        lines = [line for line in log.read_text().splitlines() if marker in line]
        if len(lines) >= count:
            return lines
        assert time.monotonic() < end, log.read_text()[-3000:]
        time.sleep(0.2)


def stamp(line: str) -> datetime.datetime:
    """The time of a log line (``%(asctime)s``: ``2026-01-01 10:00:00,123``)."""
    found = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    assert found, line
    return datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")


def assert_unavailable(error: dict, port: int) -> None:
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == "upstream_unavailable" and error["type"] == "server_error" and error["param"] is None
    assert f"the upstream http://127.0.0.1:{port} is unreachable" in error["message"], error
    assert "ConnectError" in error["message"]
    assert "s3cret" not in error["message"] and "admin" not in error["message"]


def test_public_url_drops_credentials_query_and_fragment() -> None:
    assert public_url("https://admin:s3cret@fleet.example:8443/base/?key=sk-1#x") == "https://fleet.example:8443/base"
    assert public_url("http://[::1]:8000") == "http://[::1]:8000"


def test_a_dead_upstream_is_named_retried_with_backoff_and_logged_once(tmp_path: pathlib.Path) -> None:
    port = free_port()  # nothing listens here until the fake upstream starts on it
    log = tmp_path / "serve.log"
    upstream = f"http://admin:s3cret@127.0.0.1:{port}"
    with thinkbrake_process(upstream, "--log-level", "debug", log_path=log, wait=False) as (url, _):
        health = first_answer(f"{url}/health")  # before the first attempt ends: connecting
        assert health.status_code == 503 and health.json()["error"]["code"] == "upstream_unavailable"
        wait_for_lines(log, ATTEMPT, 1)
        health = httpx.get(f"{url}/health", timeout=60)
        assert health.status_code == 503
        assert_unavailable(health.json()["error"], port)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        with pytest.raises(openai.APIStatusError) as raised:
            client.models.list()
        assert raised.value.status_code == 503
        assert_unavailable(raised.value.body, port)  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        assert raised.value.status_code == 503 and raised.value.response.headers["retry-after"] == "1"
        assert_unavailable(raised.value.body, port)  # type: ignore[arg-type]

        attempts = wait_for_lines(log, ATTEMPT, 5)
        gaps = [(stamp(b) - stamp(a)).total_seconds() for a, b in zip(attempts, attempts[1:], strict=False)]
        for gap, wait in zip(gaps, BACKOFF_SECONDS, strict=False):
            assert gap >= wait - 0.01, (gaps, BACKOFF_SECONDS)  # each attempt waits at least its back-off
        text = log.read_text()
        warnings = [line for line in text.splitlines() if " WARNING " in line]
        assert len(warnings) == 1 and f"the upstream http://127.0.0.1:{port} is unreachable" in warnings[0], text
        assert "s3cret" not in text and "still loading" not in text

        with FakeUpstream(port=port):
            wait_healthy(url, timeout=60)
            response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)  # type: ignore[arg-type]
            assert response.choices[0].message.model_extra["reasoning_content"]  # type: ignore[index]
            assert [model.id for model in client.models.list().data] == [MODEL]
        warnings = [line for line in log.read_text().splitlines() if " WARNING " in line]
        assert len(warnings) == 2 and "is reachable again" in warnings[1], warnings


def test_an_upstream_lost_after_start_is_a_503_and_health_says_so(tmp_path: pathlib.Path) -> None:
    first = FakeUpstream().start()
    port = first.port
    log = tmp_path / "serve.log"
    with thinkbrake_process(first.url, log_path=log) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
        first.stop()
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as raised:
                result = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)  # type: ignore[arg-type]
                if stream:
                    list(result)  # type: ignore[arg-type]
            assert raised.value.status_code == 503
            assert_unavailable(raised.value.body, port)  # type: ignore[arg-type]
        health = httpx.get(f"{url}/health", timeout=60)
        assert health.status_code == 503
        assert_unavailable(health.json()["error"], port)
        assert [model.id for model in client.models.list().data] == [MODEL]  # known since the start
        with FakeUpstream(port=port):
            wait_healthy(url, timeout=60)
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
    warnings = [line for line in log.read_text().splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert "is unreachable" in warnings[0] and "is reachable again" in warnings[1]
