"""Server-sent events: the frame of one payload, and the hand-built frames sent per token.

Invariant: a frame built by :class:`DeltaFrames` or :class:`CompletionFrames` is byte for byte :func:`sse` of the
pydantic chunk it stands for (fields in model order, the specification's required nulls written), only a few
times cheaper to make.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from server.events import ChoiceEvent

#: ``json.dumps(text, ensure_ascii=False)``, the same string, without building an encoder per call (per token)
_json_text = json.JSONEncoder(ensure_ascii=False).encode


def sse(payload: BaseModel | str) -> str:
    """One SSE event carrying ``payload`` (a model as its JSON, or a string such as ``[DONE]`` as is)."""
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


class _TextFrames:
    """SSE frames of one choice's new text, built from a fixed prefix and suffix and the JSON string of the text.
    The suffix writes ``logprobs`` and ``finish_reason`` as null, and ``usage`` as null when the client asked for
    ``include_usage``."""

    def __init__(self, kind: str, chunk_id: str, created: int, model: str, include_usage: bool) -> None:
        head = {"id": chunk_id, "object": kind, "created": created, "model": model}
        self._prefix = (
            "data: " + json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"choices":[{"index":'
        )
        self._suffix = ',"logprobs":null,"finish_reason":null}]' + (',"usage":null}' if include_usage else "}") + "\n\n"


class DeltaFrames(_TextFrames):
    """Chat: ``sse(ChatCompletionChunk(choices=[ChatStreamChoice(delta=DeltaMessage(...))]))``."""

    def __init__(self, chunk_id: str, created: int, model: str, include_usage: bool = False) -> None:
        super().__init__("chat.completion.chunk", chunk_id, created, model, include_usage)

    def __call__(self, index: int, reasoning: str, content: str) -> str:
        fields = []
        if content:
            fields.append('"content":' + _json_text(content))
        if reasoning:
            text = _json_text(reasoning)
            fields.append(f'"reasoning_content":{text},"reasoning":{text}')
        return f'{self._prefix}{index},"delta":{{{",".join(fields)}}}{self._suffix}'

    def of(self, event: ChoiceEvent) -> str | None:
        """The frame of an event's reasoning and content; None when it carries neither."""
        if event.reasoning or event.content:
            return self(event.index, event.reasoning, event.content)
        return None


class CompletionFrames(_TextFrames):
    """Completions: ``sse(CompletionResponse(choices=[CompletionChoice(index=..., text=...)]))`` (no ``usage``
    field: the specification's completion object does not allow null there)."""

    def __init__(self, chunk_id: str, created: int, model: str) -> None:
        super().__init__("text_completion", chunk_id, created, model, include_usage=False)

    def __call__(self, index: int, text: str) -> str:
        return f'{self._prefix}{index},"text":{_json_text(text)}{self._suffix}'

    def of(self, event: ChoiceEvent) -> str | None:
        """The frame of an event's raw text; None when it carries none."""
        return self(event.index, event.text) if event.text else None


DONE = sse("[DONE]")
