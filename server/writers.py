"""The two response writers, one whole (non-streamed) and one streamed (SSE), for either shape.

Streamed: chat sends each choice's opening chunk first; text events leave as hand-built frames (O(text) per
event); each choice ends with a chunk carrying its ``finish_reason`` and ``thinkbrake`` object; the last
choice's end carries the response's ``thinkbrake`` summary, or, with ``include_usage``, one more chunk with no
choices carries the usage and the summary. A failure after the response started becomes one error event. The
stream always ends with ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel

from server.errors import error_body
from server.events import ChoiceEvent, ChoiceResult
from server.fan_in import chain
from server.protocol import Usage, new_id, now
from server.shapes import ChoiceOutputs, ResponseShape
from server.sse import DONE, sse


def usage_of(results: list[ChoiceResult]) -> Usage:
    """Prompt counted once; completion = every generated token of every choice (continuations included)."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(result.generated_tokens for result in results)
    reasoning = sum(result.thinking_tokens for result in results)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        completion_tokens_details={"reasoning_tokens": reasoning},
    )


def summary(results: list[ChoiceResult]) -> dict[str, Any]:
    """The top-level ``thinkbrake`` object: choice 0's fields, plus every choice's when n > 1."""
    infos = [result.info() for result in results]
    top = dict(infos[0])
    if len(infos) > 1:
        top["choices"] = infos
    return top


async def write_response(
    shape: ResponseShape, model: str, first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None], n: int
) -> BaseModel:
    """The whole response once every choice has ended."""
    outputs = ChoiceOutputs(n, keep_text=True)
    async for event in chain(first, events):
        outputs.add(event)
    finished = outputs.finished()
    done = [output.result for output in finished if output.result is not None]
    choices = [shape.choice(output, result) for output, result in zip(finished, done, strict=True)]
    return shape.response(
        id=new_id(shape.id_prefix), created=now(), model=model, choices=choices, usage=usage_of(done),
        thinkbrake=summary(done),
    )  # fmt: skip


async def write_stream(
    shape: ResponseShape, model: str, first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None], n: int,
    include_usage: bool,
) -> AsyncIterator[str]:  # fmt: skip
    """The SSE body of a streamed response."""
    chunk_id, created = new_id(shape.id_prefix), now()
    usage_field: dict[str, Any] = {"usage": None} if include_usage and shape.null_usage else {}

    def chunk(choices: list[BaseModel], **extra: Any) -> str:
        fields = {**usage_field, **extra}
        return sse(shape.chunk(id=chunk_id, created=created, model=model, choices=choices, **fields))

    frame_of = shape.frames(chunk_id, created, model, include_usage).of
    outputs = ChoiceOutputs(n, keep_text=False)
    try:
        for index in range(n):
            opening = shape.opening(index)
            if opening is not None:
                yield chunk([opening])
        event = first
        async with aclosing(events):  # (read here, not through chain(): one generator less for every token)
            while event is not None:
                frame = frame_of(event)
                if frame is not None:
                    yield frame
                result = event.result
                if result is not None:
                    outputs.add(event)
                    extra = {"thinkbrake": summary(outputs.results())} if outputs.complete and not include_usage else {}
                    yield chunk([shape.final(event.index, result)], **extra)
                event = await anext(events, None)
        if include_usage:
            done = outputs.results()
            yield chunk([], usage=usage_of(done), thinkbrake=summary(done))
    except Exception as error:  # noqa: BLE001 - mid-stream failure: one error event, then [DONE]
        yield sse(error_body(error))  # all four fields, param and code too
    yield DONE
