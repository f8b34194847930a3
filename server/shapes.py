"""The two response shapes, chat and completion, as the writers in :mod:`server.writers` use them.

A shape says what differs between ``/v1/chat/completions`` and ``/v1/completions``: the id prefix, the pydantic
models (and so the ``object`` names), how a choice's text is framed (chat: ``reasoning_content``/``reasoning``
and ``content`` sections; completions: the raw text, thinking tags included) and whether stream chunks carry
``usage: null`` before the last one. Everything else about a response is the same for both.
"""

from __future__ import annotations

from pydantic import BaseModel

from server.events import ChoiceEvent, ChoiceResult
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    ResponseMessage,
)
from server.sse import CompletionFrames, DeltaFrames


class ChoiceOutput:
    """One choice of a response as its events arrive: its text (kept only for a whole, non-streamed response; in
    parts, joined once) and its result once it ended."""

    __slots__ = ("index", "result", "_keep", "_reasoning", "_content", "_text")

    def __init__(self, index: int, keep_text: bool) -> None:
        self.index = index
        self.result: ChoiceResult | None = None
        self._keep = keep_text
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._text: list[str] = []

    def add(self, event: ChoiceEvent) -> None:
        if self._keep:
            if event.reasoning:
                self._reasoning.append(event.reasoning)
            if event.content:
                self._content.append(event.content)
            if event.text:
                self._text.append(event.text)
        if event.result is not None:
            self.result = event.result

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def text(self) -> str:
        return "".join(self._text)


class ChoiceOutputs:
    """The ``n`` choices of one response, by index."""

    def __init__(self, n: int, keep_text: bool) -> None:
        self._items = [ChoiceOutput(index, keep_text) for index in range(n)]

    def add(self, event: ChoiceEvent) -> None:
        self._items[event.index].add(event)

    def finished(self) -> list[ChoiceOutput]:
        """The choices that ended, in index order."""
        return [item for item in self._items if item.result is not None]

    def results(self) -> list[ChoiceResult]:
        return [item.result for item in self._items if item.result is not None]

    @property
    def complete(self) -> bool:
        return all(item.result is not None for item in self._items)


class ResponseShape:
    """What one endpoint's responses look like (see the module docstring)."""

    id_prefix: str
    raw_text: bool  # choices carry raw text (tags included) rather than reasoning/content sections
    null_usage: bool  # with include_usage, stream chunks carry "usage": null until the last one

    def frames(self, chunk_id: str, created: int, model: str, include_usage: bool) -> DeltaFrames | CompletionFrames:
        """The per-token frames of a stream."""
        raise NotImplementedError

    def opening(self, index: int) -> BaseModel | None:
        """The stream choice sent for choice ``index`` before any text, if the shape sends one."""
        raise NotImplementedError

    def final(self, index: int, result: ChoiceResult) -> BaseModel:
        """The stream choice that ends choice ``index``."""
        raise NotImplementedError

    def choice(self, output: ChoiceOutput, result: ChoiceResult) -> BaseModel:
        """A whole choice of a non-streamed response."""
        raise NotImplementedError

    def chunk(self, **fields: object) -> BaseModel:
        raise NotImplementedError

    def response(self, **fields: object) -> BaseModel:
        raise NotImplementedError


class ChatShape(ResponseShape):
    id_prefix, raw_text, null_usage = "chatcmpl", False, True

    def frames(self, chunk_id: str, created: int, model: str, include_usage: bool) -> DeltaFrames:
        return DeltaFrames(chunk_id, created, model, include_usage)

    def opening(self, index: int) -> ChatStreamChoice:
        return ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))

    def final(self, index: int, result: ChoiceResult) -> ChatStreamChoice:
        return ChatStreamChoice(
            index=index, delta=DeltaMessage(), finish_reason=result.finish_reason, thinkbrake=result.info()
        )

    def choice(self, output: ChoiceOutput, result: ChoiceResult) -> ChatChoice:
        reasoning = output.reasoning or None
        message = ResponseMessage(content=output.content or None, reasoning_content=reasoning, reasoning=reasoning)
        return ChatChoice(
            index=output.index, message=message, finish_reason=result.finish_reason, thinkbrake=result.info()
        )

    def chunk(self, **fields: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(**fields)  # type: ignore[arg-type]

    def response(self, **fields: object) -> ChatCompletionResponse:
        return ChatCompletionResponse(**fields)  # type: ignore[arg-type]


class CompletionShape(ResponseShape):
    id_prefix, raw_text, null_usage = "cmpl", True, False

    def frames(self, chunk_id: str, created: int, model: str, include_usage: bool) -> CompletionFrames:
        return CompletionFrames(chunk_id, created, model)

    def opening(self, index: int) -> None:
        return None

    def final(self, index: int, result: ChoiceResult) -> CompletionChoice:
        return CompletionChoice(index=index, text="", finish_reason=result.finish_reason, thinkbrake=result.info())

    def choice(self, output: ChoiceOutput, result: ChoiceResult) -> CompletionChoice:
        return CompletionChoice(
            index=output.index, text=output.text, finish_reason=result.finish_reason, thinkbrake=result.info()
        )

    def chunk(self, **fields: object) -> CompletionResponse:
        return CompletionResponse(**fields)  # type: ignore[arg-type]

    def response(self, **fields: object) -> CompletionResponse:
        return CompletionResponse(**fields)  # type: ignore[arg-type]


CHAT = ChatShape()
COMPLETION = CompletionShape()
