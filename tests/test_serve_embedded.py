"""``thinkbrake serve`` on an embedded vLLM engine, end to end with the real ``openai`` client.

One ``thinkbrake serve`` subprocess per module: the tiny random-weight model, the scripted logits processor
(so the engine really decodes the R1-style trace of :mod:`tests.support.serving`), CPU block size 128.
Engine facts are read from the engine's own counters on ``/metrics`` (``vllm:generation_tokens_total``,
``vllm:prompt_tokens_cached_total``), not from what the controller reports.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import openai_spec as spec
from tests.support.engine_metrics import GENERATION_TOKENS, PROMPT_TOKENS_CACHED
from tests.support.fixtures import (
    CPU_BLOCK_SIZE,
    KV_CACHE_BYTES,
    MAX_MODEL_LEN,
    SCRIPTED_PROCESSOR_FQCN,
    chat_prompt_ids,
)
from tests.support.serving import (
    ANSWER,
    CONFIRM,
    NEVER_DECODED,
    QUESTION,
    SOLVE,
    STOP_MARK,
    THINKING,
    assert_same_message,
    http_json,
    metric,
    post_then_disconnect,
    scripted_body,
    settled_metric,
    stream_message,
    thinkbrake_server,
    trace_tokens,
    wait_metric,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = (
        "--model", str(tiny_model_dir), "--served-model-name", "tiny-r1",
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-bytes", str(KV_CACHE_BYTES),
        "--enforce-eager", "--logits-processors", SCRIPTED_PROCESSOR_FQCN,
        "--policy", "fcs_reflection",  # the text rule's stop mechanics (probes: tests/test_serve_probes.py)
    )  # fmt: skip
    with thinkbrake_server(*args, log_path=log) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def create(client: openai.OpenAI, tokenizer, thinkbrake=None, **fields):
    body = scripted_body(tokenizer, **fields)
    extra = {"vllm_xargs": body.pop("vllm_xargs"), "thinkbrake": thinkbrake or {}}
    return client.chat.completions.create(model="tiny-r1", extra_body=extra, **body)


def test_health_and_models(server, client):
    assert http_json(f"{server}/health")[0] == 200
    assert [model.id for model in client.models.list().data] == ["tiny-r1"]


def test_stops_after_confirming_reflection_and_engine_stops_decoding(server, client, tiny_tokenizer):
    generated_before = metric(server, GENERATION_TOKENS)
    cached_before = metric(server, PROMPT_TOKENS_CACHED)
    response = create(client, tiny_tokenizer)
    choice = response.choices[0]
    info = response.model_extra["thinkbrake"]
    reasoning = choice.message.model_extra["reasoning_content"]

    assert info["stopped"] and info["reason"] == "confirmed" and info["answer"] == "42"
    assert info["solutions"] == 2 and info["policy"] == "fcs_reflection"
    # the stop comes right after the confirming reflection reached 42 again, before any further re-checking
    assert reasoning.startswith(SOLVE + CONFIRM.split(STOP_MARK)[0] + STOP_MARK)
    assert NEVER_DECODED not in reasoning
    assert choice.message.model_extra["reasoning"] == reasoning
    assert choice.message.content.strip() == ANSWER and choice.finish_reason == "stop"

    usage = response.usage
    answer_tokens = len(tiny_tokenizer.encode(ANSWER, add_special_tokens=False)) + 1  # + eos
    prompt_tokens = len(chat_prompt_ids(tiny_tokenizer, QUESTION))
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == info["thinking_tokens"] + info["answer_tokens"]
    assert usage.completion_tokens_details.reasoning_tokens == info["thinking_tokens"]
    assert info["answer_tokens"] == answer_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # the engine's own counter: it decoded what the client was billed, and the thinking stopped long before the
    # trace's end (it goes on for hundreds more tokens). Tokens of engine steps merged into the delta the stop
    # landed in (the reader lagged) were decoded and not shown; how many depends on the machine's load, so only
    # the trace's length bounds them.
    generated = wait_metric(server, GENERATION_TOKENS, generated_before + usage.completion_tokens) - generated_before
    assert usage.completion_tokens <= generated < trace_tokens(tiny_tokenizer) / 2

    # the continuation reused every full KV block of prompt + generated thinking
    computed = prompt_tokens + info["thinking_tokens"] - 1
    expected_cached = computed // CPU_BLOCK_SIZE * CPU_BLOCK_SIZE
    assert expected_cached >= CPU_BLOCK_SIZE
    assert info["continuation_cached_tokens"] >= expected_cached
    assert metric(server, PROMPT_TOKENS_CACHED) - cached_before >= expected_cached


def test_streaming_and_non_streaming_give_the_same_message(client, tiny_tokenizer):
    whole = create(client, tiny_tokenizer)
    stream = create(client, tiny_tokenizer, stream=True, stream_options={"include_usage": True})
    assert_same_message(stream_message(stream), whole)


def test_reasoning_is_streamed_as_it_arrives(client, tiny_tokenizer):
    stream = create(client, tiny_tokenizer, stream=True)
    reasoning_chunks = [
        chunk.choices[0].delta.model_extra.get("reasoning_content")
        for chunk in stream
        if chunk.choices and chunk.choices[0].delta.model_extra.get("reasoning_content")
    ]
    assert len(reasoning_chunks) > 50  # one delta per engine step, not one block at the end


def test_two_choices_each_stop(server, client, tiny_tokenizer):
    before = metric(server, GENERATION_TOKENS)
    response = create(client, tiny_tokenizer, n=2)
    assert [choice.index for choice in response.choices] == [0, 1]
    for choice in response.choices:
        info = choice.model_extra["thinkbrake"]
        assert info["stopped"] and info["answer"] == "42"
        assert choice.message.content.strip() == ANSWER
    top = dict(response.model_extra["thinkbrake"])
    each = top.pop("choices")  # n > 1: the top-level fields are choice 0's, and `choices` has every choice's
    assert each == [choice.model_extra["thinkbrake"] for choice in response.choices] and top == each[0]
    completion = response.usage.completion_tokens
    assert completion == sum(
        c.model_extra["thinkbrake"]["thinking_tokens"] + c.model_extra["thinkbrake"]["answer_tokens"]
        for c in response.choices
    )
    generated = wait_metric(server, GENERATION_TOKENS, before + completion) - before
    assert completion <= generated < trace_tokens(tiny_tokenizer)  # (two choices, each stopped before half its trace)


def test_finalize_answer_writes_the_detected_answer_without_a_second_request(server, client, tiny_tokenizer):
    before = metric(server, GENERATION_TOKENS)
    response = create(client, tiny_tokenizer, thinkbrake={"finalize": "answer"})
    info = response.model_extra["thinkbrake"]
    assert info["stopped"] and info["answer_tokens"] == 0
    assert response.choices[0].message.content.strip() == "**Final Answer**\n\n\\boxed{42}"
    assert response.usage.completion_tokens == info["thinking_tokens"]
    generated = wait_metric(server, GENERATION_TOKENS, before + info["thinking_tokens"]) - before
    assert info["thinking_tokens"] <= generated < trace_tokens(tiny_tokenizer) / 2  # (no second request)


def test_finalize_none_ends_with_the_thinking(client, tiny_tokenizer):
    response = create(client, tiny_tokenizer, thinkbrake={"finalize": "none"})
    choice = response.choices[0]
    assert choice.model_extra["thinkbrake"]["stopped"]
    assert not choice.message.content
    assert STOP_MARK in choice.message.model_extra["reasoning_content"]
    assert choice.finish_reason == "stop"


def test_policy_off_is_a_pass_through(client, tiny_tokenizer):
    response = create(client, tiny_tokenizer, thinkbrake={"policy": "off"})
    choice = response.choices[0]
    info = response.model_extra["thinkbrake"]
    assert not info["stopped"] and info["policy"] == "off"
    assert choice.message.model_extra["reasoning_content"] == THINKING
    assert choice.message.content == ANSWER
    script_length = len(scripted_body(tiny_tokenizer)["vllm_xargs"]["script"])
    assert response.usage.completion_tokens == script_length


def test_the_question_reaches_the_detector(client, tiny_tokenizer):
    """The same thinking is stopped on 42 for "What is 6 * 7?" (test above), but not when the user's question asks
    for a common fraction: an integer cannot be that answer, so it is never confirmed."""
    asks_a_fraction = [{"role": "user", "content": "What is 6 * 7? Express your answer as a common fraction."}]
    response = create(client, tiny_tokenizer, messages=asks_a_fraction)
    info = response.model_extra["thinkbrake"]
    assert not info["stopped"] and info["policy"] == "fcs_reflection"
    assert response.choices[0].message.model_extra["reasoning_content"] == THINKING


def test_shadow_mode_records_but_does_not_stop(client, tiny_tokenizer):
    response = create(client, tiny_tokenizer, thinkbrake={"shadow": True})
    info = response.model_extra["thinkbrake"]
    assert not info["stopped"]
    assert info["shadow"]["would_stop"] and info["shadow"]["answer"] == "42" and info["shadow"]["agree"] is True
    assert response.choices[0].message.model_extra["reasoning_content"] == THINKING
    # the request ran to its end, as with policy off: the same thinking has the same solutions and tokens
    off = create(client, tiny_tokenizer, thinkbrake={"policy": "off"}).model_extra["thinkbrake"]
    assert info["solutions"] == off["solutions"] >= info["shadow"]["solutions"] >= 2
    assert info["thinking_tokens"] == off["thinking_tokens"]


def test_completions_with_a_prompt_inside_thinking(server, tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    body = scripted_body(tiny_tokenizer)
    status, data = http_json(
        f"{server}/v1/completions",
        {"model": "tiny-r1", "prompt": prompt, "max_tokens": 1500, "vllm_xargs": body["vllm_xargs"]},
    )
    assert status == 200, data
    text = data["choices"][0]["text"]
    assert data["thinkbrake"]["stopped"]
    thinking, _, answer = text.partition("</think>")
    assert STOP_MARK in thinking and NEVER_DECODED not in thinking
    assert answer.strip() == ANSWER


def test_client_disconnect_aborts_the_engine_request(server, tiny_tokenizer):
    long_thinking = THINKING * 2
    body = scripted_body(tiny_tokenizer, thinking=long_thinking, max_tokens=1900, stream=True)
    body.update(model="tiny-r1", thinkbrake={"policy": "off"})
    before = metric(server, GENERATION_TOKENS)
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index >= 5:
                break
    total = len(body["vllm_xargs"]["script"])
    after = settled_metric(server, GENERATION_TOKENS, before + total)
    assert after - before < total // 4  # measured: about 10 tokens after the client went away


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "tiny-r1"}, 400, "messages"),
        ({"model": "tiny-r1", "messages": "hello"}, 400, "messages"),
        ({"model": "tiny-r1", "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
        (
            {"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
            400,
            "max_tokens",
        ),
        ({"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
        ({"model": "tiny-r1", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "thinkbrake": {"policy": "nope"}}, 400, "thinkbrake.policy"),
        ({"messages": [{"role": "user", "content": "hi"}], "thinkbrake": {"k": 1}}, 400, "thinkbrake.k"),
        ({"messages": [{"role": "user", "content": "hi"}], "thinkbrake": {"bogus": 1}}, 400, "thinkbrake.bogus"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "thinkbrake": {"finalize": "x"}},
            400,
            "thinkbrake.finalize",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "thinkbrake": {"min_thinking_tokens": "a"}},
            400,
            "thinkbrake.min_thinking_tokens",
        ),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    code, data = http_json(f"{server}/v1/chat/completions", body)
    assert code == status, data
    spec.assert_valid(spec.ERROR, data)
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)
    assert error["param"] == param and param.split(".")[-1] in error["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_beyond_the_context_is_400_naming_the_limit(server, field):
    """As vLLM's OpenAI server: more output tokens than the context holds is refused, not silently cut."""
    body = {"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], field: 10_000_000}
    code, data = http_json(f"{server}/v1/chat/completions", body)
    assert code == 400, data
    spec.assert_valid(spec.ERROR, data)
    assert data["error"]["param"] == field
    assert data["error"]["message"].startswith(f"{field}=10000000 cannot be greater than max_model_len={MAX_MODEL_LEN}")
    code, data = http_json(f"{server}/v1/completions", {"model": "tiny-r1", "prompt": "hi", field: 10_000_000})
    assert code == 400 and data["error"]["param"] == field, data
    fits = {"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], field: MAX_MODEL_LEN // 2}
    fits["thinkbrake"] = {"policy": "off"}
    code, data = http_json(f"{server}/v1/chat/completions", fits)
    assert code == 200, data


def test_bad_request_through_the_sdk(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-r1", messages=[{"role": "user", "content": "hi"}], extra_body={"thinkbrake": {"k": "x"}}
        )
    assert caught.value.body["param"] == "thinkbrake.k"


def test_client_disconnect_aborts_a_non_streaming_request(server, tiny_tokenizer):
    body = scripted_body(tiny_tokenizer, thinking=THINKING * 2, max_tokens=1900)
    body.update(model="tiny-r1", thinkbrake={"policy": "off"})
    before = metric(server, GENERATION_TOKENS)
    # the client goes away once the engine is generating (not after a fixed time, which a fast machine would spend
    # decoding the whole script and a slow one still queueing the request)
    post_then_disconnect(server, "/v1/chat/completions", body, lambda: metric(server, GENERATION_TOKENS) > before)
    total = len(body["vllm_xargs"]["script"])
    after = settled_metric(server, GENERATION_TOKENS, before + total)
    # the server notices within its 0.25 s disconnect poll (measured: about 300 of 1763 tokens); not running to the
    # end is what holds on a machine three times faster too (1763 tokens take it well over 0.25 s)
    assert after - before < total


def test_responses_follow_the_openai_specification(server, tiny_tokenizer):
    """Real engine responses, whole and streamed, n = 1 and 2, usage on and off, and the error classes the
    embedded engine can produce, each validated against the official OpenAI specification."""
    short = {"thinking": "Six sevens are 42. ", "answer": "42", "max_tokens": 64}
    chat, completions = "/v1/chat/completions", "/v1/completions"
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )

    def request(path, stream, n=1, include_usage=False, script=None, **fields):
        body = {"model": "tiny-r1", **scripted_body(tiny_tokenizer, **(short if script is None else script)), **fields}
        body.update(n=n, stream=stream)
        if path == completions:
            body["prompt"] = prompt
            del body["messages"]
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        response = httpx.post(f"{server}{path}", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return spec.assert_valid_response(response, path, stream)

    spec.assert_valid(spec.MODELS, httpx.get(f"{server}/v1/models", timeout=30).json())
    whole = request(chat, False, n=2, script={})  # the full scripted trace: both choices stop and continue
    assert [c["thinkbrake"]["stopped"] for c in whole["choices"]] == [True, True]
    assert all(c["logprobs"] is None and c["message"]["refusal"] is None for c in whole["choices"])
    assert "prompt_tokens_details" not in whole["usage"] or whole["usage"]["prompt_tokens_details"] is not None
    streamed = request(chat, True, n=2, include_usage=True, script={})
    assert streamed[-1]["choices"] == [] and streamed[-1]["usage"]["completion_tokens"] > 0
    assert all(chunk["usage"] is None for chunk in streamed[:-1])
    assert all(c["finish_reason"] is None for chunk in streamed for c in chunk["choices"] if c["delta"])
    assert all("usage" not in chunk for chunk in request(chat, True))
    assert request(completions, False, n=2)["choices"][1]["logprobs"] is None
    chunks = request(completions, True, n=2, include_usage=True)
    assert chunks[-1]["choices"] == [] and all("usage" not in chunk for chunk in chunks[:-1])
    assert len([c for chunk in chunks for c in chunk["choices"] if c["finish_reason"] is not None]) == 2
    request(completions, True)

    errors = [
        (chat, {"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, 400),
        (chat, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
        (completions, {"model": "tiny-r1", "prompt": [1] * (MAX_MODEL_LEN + 10), "max_tokens": 4}, 400),  # engine
        (completions, {"model": "tiny-r1", "prompt": "hi", "stream": True, "max_tokens": -1}, 400),
        (chat, {"model": "tiny-r1", "messages": [{"role": "user", "content": "hi"}], "min_p": 2}, 400),  # engine
    ]
    for path, body, status in errors:
        response = httpx.post(f"{server}{path}", json=body, timeout=120)
        assert response.status_code == status, response.text
        spec.assert_valid(spec.ERROR, response.json(), f"{path} {status}")
    broken = httpx.post(
        f"{server}{chat}", content=b'{"model": ', headers={"content-type": "application/json"}, timeout=60
    )
    assert broken.status_code == 400 and broken.json()["error"]["param"] is None
    spec.assert_valid(spec.ERROR, broken.json(), "invalid JSON")
