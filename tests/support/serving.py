"""Helpers shared by the ``thinkbrake serve`` tests (embedded engine and upstream proxy).

The scripted trace is an R1-style chain of thought: the problem is solved ("So the answer is 42."), a
reflection re-derives 42 ("Wait, let me double-check ..."), and then a long tail of re-checking that a
stopped request must never decode. :data:`STOP_MARK` ends the confirming sentence, :data:`NEVER_DECODED`
starts the first sentence after it.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.support.engine_metrics import metrics_text_value
from tests.support.fixtures import (
    KV_CACHE_BYTES,
    MAX_MODEL_LEN,
    SCRIPTED_PROCESSOR_FQCN,
    engine_environment,
    free_port,
    openai_server,
    script_ids,
    server_process,
    think_end_id,
    wait_healthy,
)

QUESTION = "What is 6 * 7? Put the final answer in \\boxed{}."
SOLVE = (
    "Okay, so I need to find the product of 6 and 7, then make sure it is right. "
    "Let me start by writing it as repeated addition: 6 + 6 + 6 + 6 + 6 + 6 + 6. "
    "That is 12, 18, 24, 30, 36, 42. So 6 * 7 = 42.\n\n"
    "So the answer is 42.\n\n"
)
CONFIRM = (
    "Wait, let me double-check this another way. 7 * 6 is 7 * 5 + 7 = 35 + 7 = 42. "
    "Yes, that gives 42 again, so the answer is 42.\n\n"
)
NEVER_DECODED = "Hmm, but maybe I should verify once more with a different method. "
OVERTHINKING = (
    NEVER_DECODED + "Using 6 * 7 = 6 * 10 - 6 * 3 = 60 - 18 = 42. Still 42.\n\n"
    "Alternatively, let me think about it as 42 / 7 = 6, which confirms that 6 * 7 = 42. "
    "Let me also check with 42 / 6 = 7. That is consistent too.\n\n"
) + "".join(
    f"Wait, let me re-check the addition one more time, pass {i}. 6 + 6 = 12, 12 + 6 = 18, 18 + 6 = 24, "
    f"24 + 6 = 30, 30 + 6 = 36, 36 + 6 = 42. So it is 42.\n\n"
    for i in range(6)
)
THINKING = SOLVE + CONFIRM + OVERTHINKING
STOP_MARK = "so the answer is 42."
ANSWER = "The product of 6 and 7 is **42**.\n\n\\boxed{42}"
#: what the controller may decode past its stop point before the abort lands (one engine step, plus slack)
FEW_TOKENS = 4


def trace_tokens(tokenizer: Any) -> int:
    """Tokens of the scripted thinking: what a request that is never stopped decodes before its answer."""
    return len(tokenizer.encode(THINKING, add_special_tokens=False))


def scripted_body(tokenizer: Any, thinking: str = THINKING, answer: str = ANSWER, **fields: Any) -> dict[str, Any]:
    """Chat request body whose output the scripted logits processor forces (``vllm_xargs``)."""
    script = script_ids(tokenizer, thinking, answer)
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 1500,
        "vllm_xargs": {"script": script, "think_end_id": think_end_id(tokenizer)},
    }
    body.update(fields)
    return body


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (or GET when None); return (status, JSON), error statuses included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def metric(base_url: str, name: str) -> float:
    """A counter from a server's ``/metrics`` (summed over labels)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=60) as response:
        return metrics_text_value(response.read().decode(), name)


def wait_metric(base_url: str, name: str, minimum: float, timeout: float = 60.0) -> float:
    """Poll a counter until it reaches ``minimum`` (or ``timeout``); return the last value. It returns as soon as
    the counter gets there, so the long default deadline only spares a slow, loaded machine a false failure."""
    deadline = time.monotonic() + timeout
    value = metric(base_url, name)
    while value < minimum and time.monotonic() < deadline:
        time.sleep(0.05)
        value = metric(base_url, name)
    return value


def settled_metric(base_url: str, name: str, limit: float, quiet: float = 2.0, deadline: float = 120.0) -> float:
    """Poll a counter until it reaches ``limit`` or stops moving for ``quiet`` seconds; return the last value.

    An engine request that is still generating moves the token counter every step (milliseconds apart, even on
    a slow, loaded machine); one that was aborted leaves it still. So "the request ended before its end" is
    checked without assuming how fast the engine decodes."""
    give_up = time.monotonic() + deadline
    value = metric(base_url, name)
    still_since = time.monotonic()
    while value < limit and time.monotonic() - still_since < quiet:
        assert time.monotonic() < give_up, f"{name} still moving after {deadline} s: {value}"
        time.sleep(0.1)
        latest = metric(base_url, name)
        if latest != value:
            value, still_since = latest, time.monotonic()
    return value


def post_then_disconnect(base_url: str, path: str, body: dict[str, Any], started: Any, deadline: float = 120.0) -> None:
    """POST ``body`` over a plain socket, wait until ``started()`` is true (e.g. the engine began generating),
    then close the connection without reading the response: a client that goes away mid-request, at a point
    that does not depend on how fast this machine is."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(base_url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((address.hostname, address.port), timeout=deadline) as connection:
        connection.sendall(head + payload)
        give_up = time.monotonic() + deadline
        while not started():
            assert time.monotonic() < give_up, "the request never started"
            time.sleep(0.01)


def serve_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]


@contextlib.contextmanager
def thinkbrake_server(*args: str, timeout: float = 600.0, log_path: pathlib.Path | None = None) -> Iterator[str]:
    """Run ``thinkbrake serve ARGS`` (cwd = repo root) and yield its base URL once ``/health`` is 200."""
    port = free_port()
    with server_process(serve_command(port, *args), engine_environment(), log_path) as process:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, timeout, process, log_path, poll=0.25, name="thinkbrake serve")
        yield base_url


@contextlib.contextmanager
def scripted_thinkbrake(kind: str, model_dir: pathlib.Path, logs: pathlib.Path, *args: str) -> Iterator[str]:
    """``thinkbrake serve ARGS`` on the tiny model with scripted decoding, served as ``tiny-r1``: ``embedded`` (the
    engine in process) or ``proxy`` (in front of a real vLLM OpenAI server on the same model, served as ``tiny-up``,
    with ``--tokenizer`` so an event that merged several engine steps is split per token, as embedded). Logs go
    to ``logs``; yields the base URL."""
    if kind == "embedded":
        engine = (
            "--model", str(model_dir), "--served-model-name", "tiny-r1", "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-bytes", str(KV_CACHE_BYTES), "--enforce-eager", "--logits-processors", SCRIPTED_PROCESSOR_FQCN,
        )  # fmt: skip
        with thinkbrake_server(*engine, *args, log_path=logs / "serve.log") as url:
            yield url
        return
    assert kind == "proxy", kind
    upstream_args = ("--reasoning-parser", "deepseek_r1", "--served-model-name", "tiny-up")
    with openai_server(model_dir, *upstream_args, log_path=logs / "vllm.log") as upstream:
        proxy = ("--upstream", upstream, "--served-model-name", "tiny-r1", "--tokenizer", str(model_dir))
        with thinkbrake_server(*proxy, *args, log_path=logs / "proxy.log") as url:
            yield url


def stream_message(stream: Any) -> dict[str, Any]:
    """Rebuild one choice's message, usage and final ``thinkbrake`` objects from an OpenAI SDK stream."""
    reasoning = {"reasoning_content": "", "reasoning": ""}
    content, finish, usage, summary, choice_info = "", None, None, None, None
    for chunk in stream:
        extra = chunk.model_extra or {}
        if extra.get("thinkbrake") is not None:
            summary = extra["thinkbrake"]
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(exclude_none=True)
        for choice in chunk.choices:
            delta = choice.delta
            for field in reasoning:
                reasoning[field] += getattr(delta, field, None) or ""
            content += delta.content or ""
            if choice.finish_reason:
                finish = choice.finish_reason
                choice_info = (choice.model_extra or {}).get("thinkbrake")
    return {**reasoning, "content": content, "finish_reason": finish, "usage": usage, "thinkbrake": summary,
            "choice_thinkbrake": choice_info}  # fmt: skip


def assert_same_message(streamed: dict[str, Any], whole: Any) -> None:
    """A streamed and a non-streamed response to the same scripted request carry the same message.

    The stop lands at the end of the backend delta in which the controller decided; a backend that
    coalesces tokens into one delta when its reader lags (vLLM does, under load) may let a few more thinking
    tokens through in one run than in the other. So the thinking must agree through the confirming sentence
    and differ by at most :data:`FEW_TOKENS`; everything else must be equal.
    """
    message = whole.choices[0].message
    info, streamed_info = whole.model_extra["thinkbrake"], streamed["thinkbrake"]
    for field in ("reasoning_content", "reasoning"):
        mine, theirs = streamed[field], message.model_extra[field]
        cut = theirs.index(STOP_MARK) + len(STOP_MARK)
        assert mine[:cut] == theirs[:cut] and NEVER_DECODED not in mine
    assert streamed["reasoning"] == streamed["reasoning_content"]
    assert streamed["content"] == message.content
    assert streamed["finish_reason"] == whole.choices[0].finish_reason
    for key in ("stopped", "reason", "answer", "solutions", "answer_tokens", "policy"):
        assert streamed_info[key] == info[key], key
    assert abs(streamed_info["thinking_tokens"] - info["thinking_tokens"]) <= FEW_TOKENS
    usage = streamed["usage"]
    assert usage["prompt_tokens"] == whole.usage.prompt_tokens
    assert usage["completion_tokens"] == streamed_info["thinking_tokens"] + streamed_info["answer_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == streamed_info["thinking_tokens"]
    assert streamed["choice_thinkbrake"] is None or streamed["choice_thinkbrake"] == streamed_info
