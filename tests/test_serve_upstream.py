"""``thinkbrake serve --upstream`` in front of a real vLLM OpenAI server, end to end with the ``openai`` client.

The upstream (``python -m vllm.entrypoints.openai.api_server``, tiny model, scripted logits processor,
``--reasoning-parser deepseek_r1``, block size 32) and the proxy are started once per module. What the upstream
decoded is read from *its* ``/metrics``: closing the upstream stream at a stop must stop its decoding.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import openai_spec as spec
from tests.support.engine_metrics import GENERATION_TOKENS, PROMPT_TOKENS_CACHED
from tests.support.fixtures import (
    BLOCK_SIZE,
    chat_prompt_ids,
    openai_server,
)
from tests.support.serving import (
    ANSWER,
    FEW_TOKENS,
    NEVER_DECODED,
    QUESTION,
    STOP_MARK,
    THINKING,
    assert_same_message,
    http_json,
    metric,
    scripted_body,
    settled_metric,
    stream_message,
    thinkbrake_server,
    wait_metric,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def upstream(tiny_model_dir, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("upstream") / "vllm.log"
    extra = ("--reasoning-parser", "deepseek_r1", "--served-model-name", "tiny-up")
    with openai_server(tiny_model_dir, *extra, log_path=log) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("proxy") / "serve.log"
    with thinkbrake_server(
        "--upstream", upstream, "--served-model-name", "tiny-r1", "--policy", "fcs_reflection", log_path=log
    ) as url:
        yield url


@pytest.fixture
def client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0)


def create(client: openai.OpenAI, tokenizer, thinkbrake=None, model="tiny-r1", **fields):
    body = scripted_body(tokenizer, **fields)
    extra = {"vllm_xargs": body.pop("vllm_xargs")}
    if thinkbrake is not None:
        extra["thinkbrake"] = thinkbrake
    return client.chat.completions.create(model=model, extra_body=extra, **body)


def test_models_and_health(proxy, client):
    assert http_json(f"{proxy}/health")[0] == 200
    assert [model.id for model in client.models.list().data] == ["tiny-r1"]


def test_stop_closes_the_upstream_stream_and_continues_from_its_cache(upstream, client, tiny_tokenizer):
    generated_before = metric(upstream, GENERATION_TOKENS)
    cached_before = metric(upstream, PROMPT_TOKENS_CACHED)
    response = create(client, tiny_tokenizer)
    info = response.model_extra["thinkbrake"]
    message = response.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert info["stopped"] and info["reason"] == "confirmed" and info["answer"] == "42"
    assert STOP_MARK in reasoning and NEVER_DECODED not in reasoning
    assert message.model_extra["reasoning"] == reasoning
    assert message.content.strip() == ANSWER

    usage = response.usage
    answer_tokens = len(tiny_tokenizer.encode(ANSWER, add_special_tokens=False)) + 1
    prompt_tokens = len(chat_prompt_ids(tiny_tokenizer, QUESTION))
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == info["thinking_tokens"] + info["answer_tokens"]
    assert usage.completion_tokens_details.reasoning_tokens == info["thinking_tokens"]
    assert info["answer_tokens"] == answer_tokens

    # the upstream's own counter: closing its stream at the stop ended its decoding
    generated = wait_metric(upstream, GENERATION_TOKENS, generated_before + usage.completion_tokens)
    generated -= generated_before
    assert usage.completion_tokens <= generated <= usage.completion_tokens + FEW_TOKENS
    assert generated - answer_tokens <= info["stop_position_tokens"] + FEW_TOKENS
    # the token-id continuation reused the upstream's KV blocks of prompt + thinking
    expected_cached = (prompt_tokens + info["thinking_tokens"] - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert metric(upstream, PROMPT_TOKENS_CACHED) - cached_before >= expected_cached


def test_streaming_and_non_streaming_give_the_same_message(client, tiny_tokenizer):
    whole = create(client, tiny_tokenizer)
    stream = create(client, tiny_tokenizer, stream=True, stream_options={"include_usage": True})
    assert_same_message(stream_message(stream), whole)


def test_two_choices_each_stop(upstream, client, tiny_tokenizer):
    before = metric(upstream, GENERATION_TOKENS)
    response = create(client, tiny_tokenizer, n=2)
    assert len(response.choices) == 2
    for choice in response.choices:
        assert choice.model_extra["thinkbrake"]["stopped"]
        assert choice.message.content.strip() == ANSWER
    completion = response.usage.completion_tokens
    generated = wait_metric(upstream, GENERATION_TOKENS, before + completion) - before
    assert completion <= generated <= completion + 2 * FEW_TOKENS


def test_policy_off_passes_the_upstream_message_through(upstream, client, tiny_tokenizer):
    proxied = create(client, tiny_tokenizer, thinkbrake={"policy": "off"})
    direct = create(
        openai.OpenAI(base_url=f"{upstream}/v1", api_key="unused", max_retries=0), tiny_tokenizer, model="tiny-up"
    )
    assert not proxied.model_extra["thinkbrake"]["stopped"]
    mine, theirs = proxied.choices[0].message, direct.choices[0].message
    assert mine.model_extra["reasoning"] == theirs.model_extra["reasoning"] == THINKING
    assert mine.content == theirs.content == ANSWER
    assert proxied.usage.completion_tokens == direct.usage.completion_tokens
    assert proxied.usage.prompt_tokens == direct.usage.prompt_tokens


def test_finalize_answer_sends_no_continuation(upstream, client, tiny_tokenizer):
    before = metric(upstream, GENERATION_TOKENS)
    response = create(client, tiny_tokenizer, thinkbrake={"finalize": "answer"})
    info = response.model_extra["thinkbrake"]
    assert response.choices[0].message.content.strip() == "**Final Answer**\n\n\\boxed{42}"
    generated = wait_metric(upstream, GENERATION_TOKENS, before + info["thinking_tokens"]) - before
    assert info["thinking_tokens"] <= generated <= info["thinking_tokens"] + FEW_TOKENS


def test_completions_with_a_text_prompt_inside_thinking(proxy, tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    xargs = scripted_body(tiny_tokenizer)["vllm_xargs"]
    body = {"model": "tiny-r1", "prompt": prompt, "max_tokens": 1500, "vllm_xargs": xargs}
    status, data = http_json(f"{proxy}/v1/completions", body)
    assert status == 200, data
    thinking, _, answer = data["choices"][0]["text"].partition("</think>")
    assert data["thinkbrake"]["stopped"] and STOP_MARK in thinking and NEVER_DECODED not in thinking
    assert answer.strip() == ANSWER


def test_client_disconnect_stops_the_upstream(upstream, proxy, tiny_tokenizer):
    body = scripted_body(tiny_tokenizer, thinking=THINKING * 2, max_tokens=1900, stream=True)
    body.update(model="tiny-r1", thinkbrake={"policy": "off"})
    before = metric(upstream, GENERATION_TOKENS)
    with httpx.stream("POST", f"{proxy}/v1/chat/completions", json=body, timeout=60) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index >= 5:
                break
    total = len(body["vllm_xargs"]["script"])
    after = settled_metric(upstream, GENERATION_TOKENS, before + total)
    assert after - before < total // 4


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny-r1"}, 400, "messages"),
        ({"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "n": "two"}, 400, "n"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "thinkbrake": {"policy": "nope"}}, 400, "thinkbrake.policy"),
        ({"messages": [{"role": "user", "content": "hi"}], "thinkbrake": {"bogus": 1}}, 400, "thinkbrake.bogus"),
    ],
)
def test_bad_requests_get_openai_errors(proxy, body, status, param):
    code, data = http_json(f"{proxy}/v1/chat/completions", body)
    assert code == status, data
    spec.assert_valid(spec.ERROR, data)
    assert set(data["error"]) == {"message", "type", "param", "code"} and isinstance(data["error"]["code"], str)
    assert data["error"]["param"] == param


def test_responses_follow_the_openai_specification(proxy, tiny_tokenizer):
    """In front of a real vLLM server: whole and streamed chat (n = 2, usage on and off) and a streamed
    completion, validated against the official OpenAI specification (every error class: test_openai_spec.py)."""
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    for path, stream, fields in [
        ("/v1/chat/completions", False, {"n": 2}),
        ("/v1/chat/completions", True, {"n": 2, "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", True, {}),
        ("/v1/completions", True, {"prompt": prompt, "stream_options": {"include_usage": True}}),
    ]:
        body = {"model": "tiny-r1", **scripted_body(tiny_tokenizer), **fields, "stream": stream}
        if "prompt" in body:
            del body["messages"]
        response = httpx.post(f"{proxy}{path}", json=body, timeout=300)
        assert response.status_code == 200, response.text
        data = spec.assert_valid_response(response, path, stream)
        finals = [c for chunk in (data if stream else [data]) for c in chunk["choices"] if c["finish_reason"]]
        assert len(finals) == fields.get("n", 1) and all(c["thinkbrake"]["stopped"] for c in finals)
