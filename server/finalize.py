"""What happens after a stop, per ``finalize`` (the backend request is already aborted).

``model``: the backend continues from the token ids (prompt + generated up to the stop point + end-of-thinking
ids), so it reuses its prefix cache and the model writes its own answer; a backend without token ids falls back
to ``answer``. ``answer``: the thinking is closed and a short final answer is written from the detected one.
``none``: the response ends with the thinking.

Invariants: the continuation is aborted on every exit that is not its natural end; its tokens count as generated;
the controller is fed everything the client is sent and finished last.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from controller.policies import StopDecision
from controller.session import ThinkingController
from server.backend import Backend, Generation, Sampling, side_request
from server.emitter import Emitter
from server.events import ChoiceEvent, ChoiceResult
from server.protocol import RequestControl

log = logging.getLogger(__name__)


@dataclass
class Stopped:
    """A choice stopped: its generation, the ids it generated and the decision."""

    generation: Generation
    generated: list[int]
    decision: StopDecision


async def finalize(
    backend: Backend, control: RequestControl, sampling: Sampling, request_id: str, emit: Emitter,
    controller: ThinkingController, result: ChoiceResult, stopped: Stopped,
) -> AsyncGenerator[ChoiceEvent, None]:  # fmt: skip
    """The events after the stop: the closing of the thinking and the answer."""
    generation, generated = stopped.generation, stopped.generated
    mode = control.finalize
    end_text = backend.think_end_text
    end_ids = await backend.encode(end_text) if mode == "model" else None
    if mode == "model" and (end_ids is None or generation.prompt_token_ids is None):
        log.warning("cannot continue from token ids on this backend; finalizing with the detected answer")
        mode = "answer"
    if mode == "none":
        yield emit.event(controller.finish(), "")
        return
    yield emit.event(emit.feed(controller, end_text, 0), end_text)
    if mode == "answer":
        answer = stopped.decision.answer
        text = f"**Final Answer**\n\n\\boxed{{{answer}}}" if answer is not None else ""
        yield emit.event(emit.feed(controller, text, 0), text)
        yield emit.event(controller.finish(), "")
        return
    assert end_ids is not None and generation.prompt_token_ids is not None
    kept = generated if controller.kept_tokens is None else generated[: controller.kept_tokens]
    token_ids = generation.prompt_token_ids + kept + end_ids
    limit = control.max_answer_tokens
    if sampling.max_tokens is not None:
        limit = max(1, min(limit, sampling.max_tokens - len(generated)))
    continuation = backend.continue_tokens(
        token_ids, Sampling(limit, sampling.options, sampling.extra_args), side_request(request_id, "answer")
    )
    stream = continuation.__aiter__()
    finished = False
    try:
        async for chunk in stream:
            result.generated_tokens += len(chunk.token_ids)
            yield emit.event(emit.feed(controller, chunk.text, len(chunk.token_ids)), chunk.text)
            if chunk.finish_reason is not None:
                result.finish_reason = chunk.finish_reason
                finished = True
    finally:
        if not finished:
            await continuation.abort()
        await stream.aclose()
    result.continuation_cached_tokens = getattr(continuation, "num_cached_tokens", None)
    yield emit.event(controller.finish(), "")
