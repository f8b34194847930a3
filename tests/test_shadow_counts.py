"""Shadow mode reads the thinking to its end: the same trace gives the same counts with ``shadow: true`` as with
policy ``off`` (``solutions``, thinking and answer tokens), and ``shadow.solutions`` is the count at the would-be
stop. thinkbrake runs as a real process in front of the fake upstream; the client is the real ``openai`` SDK.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.data.written_traces import MATH_TRACES
from tests.support.fake_upstream import FakeUpstream
from tests.support.servers import thinkbrake_process

MODEL = "fake-reasoner"
MESSAGES = [{"role": "user", "content": "Solve it."}]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def info(client: openai.OpenAI, trace: int, stream: bool, **control: Any) -> dict[str, Any]:
    extra = {"fake_trace": trace, "thinkbrake": control}
    if not stream:
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra)  # type: ignore[arg-type]
        return dict(response.model_extra["thinkbrake"])  # type: ignore[index]
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, extra_body=extra)  # type: ignore[arg-type]
    found = [chunk.model_extra["thinkbrake"] for chunk in chunks if (chunk.model_extra or {}).get("thinkbrake")]
    return dict(found[-1])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("policy", ["fcs_reflection", "first_answer"])
@pytest.mark.parametrize("trace", range(len(MATH_TRACES)))
def test_shadow_counts_equal_policy_off(client: openai.OpenAI, trace: int, policy: str, stream: bool) -> None:
    off = info(client, trace, stream, policy="off")
    shadow = info(client, trace, stream, policy=policy, shadow=True)
    acted = info(client, trace, stream, policy=policy)
    assert not shadow["stopped"] and shadow["shadow"]["would_stop"], shadow
    assert acted["stopped"], acted
    for field in ("solutions", "thinking_tokens", "answer_tokens"):
        assert shadow[field] == off[field], (field, shadow, off)
    assert shadow["shadow"]["solutions"] == acted["solutions"] <= off["solutions"]
    assert shadow["shadow"]["stop_tokens"] == acted["stop_position_tokens"]
