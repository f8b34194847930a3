"""Replay and serve make the same decision on the same stream: real dev traces through both, side by side.

Each trace's stream (``controller.offline.replay.trace_stream``: its thinking, then the model's end of thinking) and the
start of its final answer are tokenized with the tiny test model's tokenizer and forced through the real vLLM
engine by the scripted logits processor: embedded (``thinkbrake serve --model``) and as a proxy in front of
vLLM's OpenAI server with the ``deepseek_r1`` reasoning parser. ``thinkbrake replay``'s code path replays the
same tokens. Most traces chosen here end on a confirmation followed by the model's own ``\\n</think>``: neither
side may stop them. The others are stopped, by both, at the same answer and token position (the server may
decode a few tokens past its decision before the abort lands).
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.offline.replay import REPLAY_DELIMITERS, replay_trace, token_deltas, trace_stream
from controller.policies import FcsReflectionConfig
from controller.session import ThinkingController
from controller.verify import AnswerComparer
from tests.support.dev_traces import traces_by_id
from tests.support.serving import FEW_TOKENS, http_json, scripted_thinkbrake

pytestmark = [pytest.mark.engine, pytest.mark.replay]

#: closed dev traces short enough for the tiny model's context; picked by replaying them: the first four end on
#: a confirmation right before the model's end of thinking, two are stopped earlier, one has no stop at all
ENDS_ON_CONFIRMATION = [
    "math500/265/DeepSeek-R1-Distill-Qwen-7B/seed44",
    "math500/322/DeepSeek-R1-Distill-Qwen-7B/seed44",
    "math500/40/DeepSeek-R1-Distill-Qwen-7B/seed44",
    "math500/262/Qwen3-8B/seed44",
]
STOPPED = ["math500/212/DeepSeek-R1-Distill-Qwen-7B/seed44", "math500/430/Qwen3-8B/seed43"]
NATURAL = ["math500/98/DeepSeek-R1-Distill-Qwen-7B/seed43"]
FINAL_CHARS = 120  # the start of the final answer is enough: it is decoded only after the end of thinking


@pytest.fixture(scope="module")
def traces() -> dict[str, dict[str, Any]]:
    return traces_by_id(ENDS_ON_CONFIRMATION + STOPPED + NATURAL)


@pytest.fixture(scope="module")
def fast_tokenizer(tiny_model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module", params=["embedded", "proxy"])
def server(request, tiny_model_dir, tmp_path_factory):
    with scripted_thinkbrake(request.param, tiny_model_dir, tmp_path_factory.mktemp(request.param)) as url:
        yield url


def replayed(trace: dict[str, Any], fast_tokenizer: Any, comparer: AnswerComparer) -> tuple[Any, bool]:
    """Replay's outcome on the stream, and whether a decision was held pending and then dropped at the end tag."""
    deltas = token_deltas(fast_tokenizer, trace_stream(trace))
    outcome = replay_trace(trace, deltas, [FcsReflectionConfig()], comparer).outcomes[0]
    controller = ThinkingController(FcsReflectionConfig(), REPLAY_DELIMITERS, comparer)
    held = False
    for delta in deltas:
        held = held or controller.pending is not None
        controller.feed(delta, 1)
    return outcome, held and controller.decision is None


def served(server: str, trace: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    text = trace_stream(trace) + trace["final"][:FINAL_CHARS]
    script = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]
    body = {
        "model": "tiny-r1",
        "messages": [{"role": "user", "content": trace["question"][:300]}],
        "max_tokens": len(script) + 8,
        "vllm_xargs": {"script": script, "think_end_id": tokenizer.convert_tokens_to_ids("</think>")},
        "thinkbrake": {"policy": "fcs_reflection"},
    }
    status, data = http_json(f"{server}/v1/chat/completions", body, timeout=600)
    assert status == 200, data
    return data


@pytest.mark.parametrize("trace_id", ENDS_ON_CONFIRMATION + STOPPED + NATURAL)
def test_replay_and_serve_decide_alike(server, traces, trace_id, fast_tokenizer, tiny_tokenizer) -> None:
    trace = traces[trace_id]
    comparer = AnswerComparer()
    try:
        outcome, ended_on_confirmation = replayed(trace, fast_tokenizer, comparer)
    finally:
        comparer.close()
    data = served(server, trace, tiny_tokenizer)
    info = data["thinkbrake"]
    print(
        f"{trace_id}: replay {outcome.reason} {outcome.answer} @{outcome.tokens}; "
        f"serve stopped={info['stopped']} {info['reason']} {info['answer']} @{info.get('stop_position_tokens')}"
        f" of {info['thinking_tokens']}"
    )
    assert ended_on_confirmation == (trace_id in ENDS_ON_CONFIRMATION)
    assert info["stopped"] == outcome.stopped == (trace_id in STOPPED)
    if not outcome.stopped:
        assert info["reason"] is None and "stop_position_tokens" not in info
        message = data["choices"][0]["message"]
        assert message["reasoning_content"] == trace["thinking"] + ("" if trace["thinking"].endswith("\n") else "\n")
        assert info["thinking_tokens"] == outcome.tokens  # the same count of thinking tokens, end tag included
        return
    assert (info["reason"], info["answer"]) == (outcome.reason, outcome.answer)
    assert outcome.tokens <= info["stop_position_tokens"] <= outcome.tokens + FEW_TOKENS
