"""Answer probes on the embedded vLLM engine (``thinkbrake serve --model``), end to end with the ``openai`` client.

The tiny random-weight model decodes the scripted R1-style trace of :mod:`tests.support.serving`; its probes are
forced to decode ``probe_script`` (the scripted logits processor sees the probe marker the server adds to the
request's ``vllm_xargs``). The processor forces tokens *after* vLLM has taken the raw log-probabilities, so a
random model's forced tokens have low confidence: these tests set the policy's confidence thresholds to 0 (how
confidence is read is covered by tests/test_probing.py and tests/test_probes_upstream.py). Engine facts come
from the engine's own counters (``vllm:generation_tokens_total``, ``vllm:prompt_tokens_cached_total``).
"""

from __future__ import annotations

import openai
import pytest

from tests.support.engine_metrics import GENERATION_TOKENS, PROMPT_TOKENS_CACHED
from tests.support.fixtures import (
    CPU_BLOCK_SIZE,
    KV_CACHE_BYTES,
    MAX_MODEL_LEN,
    SCRIPTED_PROCESSOR_FQCN,
    chat_prompt_ids,
)
from tests.support.serving import (
    CONFIRM,
    NEVER_DECODED,
    QUESTION,
    SOLVE,
    metric,
    scripted_body,
    thinkbrake_server,
    trace_tokens,
    wait_metric,
)

pytestmark = pytest.mark.engine
TRUST_ANY = {
    "policy": "probe_fcs",
    "confidence": 0,
    "confirm_confidence": 0,
    "sure_confidence": 0,
    "agree_confidence": 1,
}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = (
        "--model", str(tiny_model_dir), "--served-model-name", "tiny-r1",
        "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-bytes", str(KV_CACHE_BYTES),
        "--enforce-eager", "--logits-processors", SCRIPTED_PROCESSOR_FQCN,
    )  # fmt: skip
    with thinkbrake_server(*args, log_path=log) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def create(client: openai.OpenAI, tokenizer, probe_answer: str, thinkbrake: dict):
    body = scripted_body(tokenizer)
    xargs = {**body.pop("vllm_xargs"), "probe_script": tokenizer.encode(probe_answer, add_special_tokens=False)}
    return client.chat.completions.create(
        model="tiny-r1", extra_body={"vllm_xargs": xargs, "thinkbrake": thinkbrake}, **body
    )


def test_a_probe_on_the_cached_prefix_decides_the_stop(server, client, tiny_tokenizer):
    generated_before = metric(server, GENERATION_TOKENS)
    cached_before = metric(server, PROMPT_TOKENS_CACHED)
    response = create(client, tiny_tokenizer, "{42}", TRUST_ANY)
    info = response.model_extra["thinkbrake"]
    reasoning = response.choices[0].message.model_extra["reasoning_content"]
    probes = info["probes"]

    # the probe at the first "Wait" read 42, which the thinking had written: the probe decided the stop
    assert info["stopped"] and info["reason"] == "probe_sure" and info["answer"] == "42"
    assert probes["sent"] == probes["answered"] == 1 and probes["fallback"] is None
    assert reasoning.startswith(SOLVE + "Wait") and NEVER_DECODED not in reasoning

    # the probe's prompt (prompt + thinking before "Wait" + suffix) reused every full KV block of the main request
    prefix = len(chat_prompt_ids(tiny_tokenizer, QUESTION)) + len(tiny_tokenizer.encode(SOLVE.rstrip("\n")))
    expected_cached = prefix // CPU_BLOCK_SIZE * CPU_BLOCK_SIZE
    assert expected_cached >= CPU_BLOCK_SIZE
    assert probes["cached_tokens"] >= expected_cached
    assert probes["prompt_tokens"] > prefix
    assert metric(server, PROMPT_TOKENS_CACHED) - cached_before >= expected_cached + info["continuation_cached_tokens"]

    # the engine decoded the billed completion plus the probe ("{42}" and eos); usage bills only the completion
    assert probes["tokens"] == len(tiny_tokenizer.encode("{42}")) + 1
    completion = response.usage.completion_tokens
    assert completion == info["thinking_tokens"] + info["answer_tokens"]
    total = completion + probes["tokens"]
    generated = wait_metric(server, GENERATION_TOKENS, generated_before + total) - generated_before
    # the abort freed the engine: the main decode ended long before the scripted thinking did. (Steps decoded
    # while the probe's answer and the abort were on their way are decoded, not shown; how many depends on how
    # fast this machine is against the engine, so only the end of the thinking bounds them.)
    main_decoded = generated - info["answer_tokens"] - probes["tokens"]
    assert info["thinking_tokens"] <= main_decoded < trace_tokens(tiny_tokenizer)
    assert metric(server, "thinkbrake_probe_latency_seconds_count") >= 1


def test_two_agreeing_probes_stop_with_the_probes_answer(server, client, tiny_tokenizer):
    # probes answer 41 where the thinking says 42: no single probe is "sure" (the text never wrote 41), the
    # probe at the next "Wait" confirms 41, and the stop's answer is the probes' (finalize=answer writes it)
    response = create(client, tiny_tokenizer, "{41}", {**TRUST_ANY, "finalize": "answer"})
    info = response.model_extra["thinkbrake"]
    reasoning = response.choices[0].message.model_extra["reasoning_content"]
    assert info["stopped"] and info["reason"] == "probe_confirmed" and info["answer"] == "41"
    assert info["probes"]["sent"] == info["probes"]["answered"] == 2
    assert SOLVE + CONFIRM in reasoning and reasoning.count("Wait") == 2
    assert response.choices[0].message.content.endswith("\\boxed{41}")
