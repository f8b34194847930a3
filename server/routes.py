"""The generation endpoints: ``/v1/chat/completions`` and ``/v1/completions``, streamed (SSE) or not.

Each choice runs in its own task (:class:`server.choice.ChoiceRunner`); their events are merged into one
stream. The first event is awaited before the HTTP response starts, so a request the backend rejects at once
(a prompt too long, bad sampling values) still gets a proper HTTP error; later failures become one SSE error
event followed by ``data: [DONE]``. Cancelling the response (client disconnect) cancels every choice task,
which aborts its backend request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from controller.answers import AnswerComparer
from controller.delimiters import Delimiters
from controller.policies import OffConfig
from server.backend import Backend, BackendError, ChatPrompt, Prompt, Sampling, TextPrompt
from server.choice import ChoiceEvent, ChoiceResult, ChoiceRunner, RunContext
from server.metrics import Metrics
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    GenerationRequest,
    RequestControl,
    ResponseMessage,
    Usage,
    new_id,
    now,
    parse_control,
)
from server.settings import Settings

log = logging.getLogger(__name__)

# Answer comparisons beyond canonical keys (Math-Verify) run inside the controller's feed, on the event loop;
# a short bound keeps one slow comparison from stalling every stream (a timed-out pair counts as different).
COMPARE_TIMEOUT_SECONDS = 0.25


class ModelNotFound(Exception):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")
        self.model = model


def sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


class _TextFrames:
    """SSE frames of one choice's new text, the frame sent per token, built from a fixed prefix and suffix and
    ``json.dumps`` of the text (a few times cheaper than the pydantic round trip). Each frame is the same JSON
    as ``sse()`` of the chunk model (fields in model order, spec-required nulls written: ``logprobs``,
    ``finish_reason``, and ``usage`` when the client asked for ``include_usage``)."""

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
            fields.append('"content":' + json.dumps(content, ensure_ascii=False))
        if reasoning:
            text = json.dumps(reasoning, ensure_ascii=False)
            fields.append(f'"reasoning_content":{text},"reasoning":{text}')
        return f'{self._prefix}{index},"delta":{{{",".join(fields)}}}{self._suffix}'


class CompletionFrames(_TextFrames):
    """Completions: ``sse(CompletionResponse(choices=[CompletionChoice(index=..., text=...)]))`` (no ``usage``
    field: the specification's completion object does not allow null there)."""

    def __init__(self, chunk_id: str, created: int, model: str) -> None:
        super().__init__("text_completion", chunk_id, created, model, include_usage=False)

    def __call__(self, index: int, text: str) -> str:
        return f'{self._prefix}{index},"text":{json.dumps(text, ensure_ascii=False)}{self._suffix}'


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


def summary(results: list[ChoiceResult], control: RequestControl) -> dict[str, Any]:
    """The top-level ``thinkbrake`` object: choice 0's fields, plus every choice's when n > 1."""
    infos = [result.info(control.policy.name, control.shadow) for result in results]
    top = dict(infos[0])
    if len(infos) > 1:
        top["choices"] = infos
    return top


async def merge(runners: list[ChoiceRunner], cleanups: set[asyncio.Future[Any]]) -> AsyncGenerator[ChoiceEvent, None]:
    """Events of all runners in arrival order; cancels every runner when closed early.

    The runners' cleanup (aborting their backend requests) is shielded: when the response is cancelled by a
    client disconnect, starlette's cancel scope keeps cancelling every await of the cancelled task, and a
    cancelled ``gather`` would cancel the runners again in the middle of their abort. ``cleanups`` holds the
    shielded futures until they finish (asyncio keeps only weak references to tasks).
    """
    queue: asyncio.Queue[ChoiceEvent | Exception] = asyncio.Queue()

    async def pump(runner: ChoiceRunner) -> None:
        try:
            async with aclosing(runner.run()) as events:
                async for event in events:
                    await queue.put(event)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which reports it
            await queue.put(error)

    tasks = [asyncio.create_task(pump(runner)) for runner in runners]
    remaining = len(runners)
    try:
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():  # what piled up while the client was being written to
                batch.append(queue.get_nowait())
            for item in coalesce(batch):
                if isinstance(item, Exception):
                    raise item
                if item.result is not None:
                    remaining -= 1
                if not item.empty:
                    yield item
    finally:
        for task in tasks:
            task.cancel()
        cleanup = asyncio.gather(*tasks, return_exceptions=True)
        cleanups.add(cleanup)
        cleanup.add_done_callback(cleanups.discard)
        await asyncio.shield(cleanup)


def coalesce(batch: list[ChoiceEvent | Exception]) -> list[ChoiceEvent | Exception]:
    """Joins consecutive text-only events of the same choice: tokens that arrived together leave in one SSE
    event (under load this is what keeps the cost per client event, not per token). Order is kept."""
    out: list[ChoiceEvent | Exception] = []
    for item in batch:
        last = out[-1] if out else None
        if (
            isinstance(item, ChoiceEvent) and isinstance(last, ChoiceEvent) and item.result is None
            and last.result is None and item.index == last.index
        ):  # fmt: skip
            out[-1] = ChoiceEvent(
                item.index, last.reasoning + item.reasoning, last.content + item.content, last.text + item.text
            )
        else:
            out.append(item)
    return out


class Service:
    """Request handling for one server: validation, choice runners, response shapes."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        # its worker processes start once the backend is up (:meth:`warm_up`): a server whose model fails to load
        # never spawns them, so it exits with its one-line error and nothing else
        self.comparer = AnswerComparer(timeout_seconds=COMPARE_TIMEOUT_SECONDS)
        self.random = random.Random()
        self.cleanups: set[asyncio.Future[Any]] = set()  # aborts still running after a disconnect
        self.end_ids: dict[str, list[int]] = {}  # end-of-thinking delimiter -> its token ids (RunContext)

    def warm_up(self) -> None:
        """Start the comparer's workers (they import Math-Verify) before the first comparison needs them."""
        self.comparer.warm_up()

    def close(self) -> None:
        """Stop the answer comparer's worker process (at shutdown)."""
        self.comparer.close()

    def check_model(self, model: str | None) -> None:
        if not self.backend.ready:
            raise not_serving(self.backend) or BackendError("the model is still loading", 503)
        if model is not None and model not in {self.backend.model_name, self.settings.model}:
            raise ModelNotFound(model)

    def _runners(
        self,
        request: GenerationRequest,
        prompt: Prompt,
        control: RequestControl,
        delimiters: Delimiters,
        raw: bool,
        question: str | None = None,
    ) -> list[ChoiceRunner]:
        context = RunContext(self.backend, self.metrics, self.comparer, self.backend.model_name, self.end_ids)
        extra_args = {**self.settings.default_vllm_xargs, **(request.vllm_xargs or {})} or None
        sampling = Sampling(request.token_limit, request.sampling_options(), extra_args)
        request_id = new_id("tb")
        return [
            ChoiceRunner(context, index, f"{request_id}-{index}", prompt, sampling, control, delimiters, raw, question)
            for index in range(request.n)
        ]

    def check_token_limit(self, request: GenerationRequest) -> None:
        """A 400 naming the limit when ``max_tokens`` (or ``max_completion_tokens``) exceeds the model's context,
        as vLLM's OpenAI server answers (a backend without a known context, e.g. an upstream, checks itself)."""
        context = getattr(self.backend, "max_model_len", None)
        limit = request.token_limit
        if context is not None and limit is not None and limit > context:
            field = request.token_limit_field
            message = (
                f"{field}={limit} cannot be greater than max_model_len={context}. Please request fewer output tokens."
            )
            raise BackendError(message, 400, "invalid_request_error", field)

    async def chat(self, request: ChatCompletionRequest) -> Any:
        self.check_model(request.model)
        self.check_token_limit(request)
        control = parse_control(request.thinkbrake, self.settings, self.random.random())
        messages = [message.model_dump(exclude_none=True) for message in request.messages]
        prompt = ChatPrompt(messages, request.chat_template_kwargs or {})
        runners = self._runners(request, prompt, control, self.backend.delimiters, False, last_user_text(messages))
        events = merge(runners, self.cleanups)
        first = await _first(events)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            body = self._chat_stream(first, events, control, request.n, include_usage)
            return StreamingResponse(body, media_type="text/event-stream")
        return await self._chat_response(first, events, control, request.n)

    async def completions(self, request: CompletionRequest) -> Any:
        self.check_model(request.model)
        self.check_token_limit(request)
        control = parse_control(request.thinkbrake, self.settings, self.random.random())
        prompt = TextPrompt(request.prompt) if isinstance(request.prompt, str) else TextPrompt(token_ids=request.prompt)
        tail = (await self.backend.prompt_tail(prompt)).rstrip()
        start, end = self.backend.delimiters.start, self.backend.delimiters.end
        if tail.endswith(start):
            delimiters = Delimiters(start, end, implicit_start=True)
        else:  # the prompt does not leave the model inside thinking: nothing to stop
            delimiters = Delimiters(start, end, implicit_start=False)
            control = RequestControl(OffConfig(), control.finalize, control.max_answer_tokens, shadow=False)
        question = request.prompt if isinstance(request.prompt, str) else None
        runners = self._runners(request, prompt, control, delimiters, True, question)
        events = merge(runners, self.cleanups)
        first = await _first(events)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            body = self._completion_stream(first, events, control, request.n, include_usage)
            return StreamingResponse(body, media_type="text/event-stream")
        return await self._completion_response(first, events, control, request.n)

    async def _chat_response(
        self, first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None], control: RequestControl, n: int
    ) -> ChatCompletionResponse:
        reasoning, content = [""] * n, [""] * n
        results: list[ChoiceResult | None] = [None] * n
        async for event in _chain(first, events):
            reasoning[event.index] += event.reasoning
            content[event.index] += event.content
            if event.result is not None:
                results[event.index] = event.result
        done = [result for result in results if result is not None]
        choices = [
            ChatChoice(
                index=index,
                message=ResponseMessage(
                    content=content[index] or None,
                    reasoning_content=reasoning[index] or None,
                    reasoning=reasoning[index] or None,
                ),
                finish_reason=result.finish_reason,
                thinkbrake=result.info(control.policy.name, control.shadow),
            )
            for index, result in enumerate(done)
        ]
        return ChatCompletionResponse(
            id=new_id("chatcmpl"), created=now(), model=self.backend.model_name, choices=choices,
            usage=usage_of(done), thinkbrake=summary(done, control),
        )  # fmt: skip

    async def _chat_stream(
        self, first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None], control: RequestControl, n: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        chunk_id, created, model = new_id("chatcmpl"), now(), self.backend.model_name
        usage_field: dict[str, Any] = {"usage": None} if include_usage else {}  # null until the last chunk

        def chunk(choices: list[ChatStreamChoice], **extra: Any) -> str:
            fields = {**usage_field, **extra}
            return sse(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, **fields))

        text_frame = DeltaFrames(chunk_id, created, model, include_usage)
        results: list[ChoiceResult | None] = [None] * n
        try:
            for index in range(n):
                yield chunk([ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])
            async for event in _chain(first, events):
                if event.reasoning or event.content:
                    yield text_frame(event.index, event.reasoning, event.content)
                if event.result is not None:
                    results[event.index] = result = event.result
                    info = result.info(control.policy.name, control.shadow)
                    last = all(item is not None for item in results)
                    extra = {"thinkbrake": summary(_done(results), control)} if last and not include_usage else {}
                    final = ChatStreamChoice(
                        index=event.index, delta=DeltaMessage(), finish_reason=result.finish_reason, thinkbrake=info
                    )
                    yield chunk([final], **extra)
            if include_usage:
                done = _done(results)
                yield chunk([], usage=usage_of(done), thinkbrake=summary(done, control))
        except Exception as error:  # noqa: BLE001 - mid-stream failure: one error event, then [DONE]
            yield sse(error_body(error))  # all four fields, param and code too
        yield sse("[DONE]")

    async def _completion_response(
        self, first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None], control: RequestControl, n: int
    ) -> CompletionResponse:
        texts = [""] * n
        results: list[ChoiceResult | None] = [None] * n
        async for event in _chain(first, events):
            texts[event.index] += event.text
            if event.result is not None:
                results[event.index] = event.result
        done = _done(results)
        choices = [
            CompletionChoice(
                index=index, text=texts[index], finish_reason=result.finish_reason,
                thinkbrake=result.info(control.policy.name, control.shadow),
            )
            for index, result in enumerate(done)
        ]  # fmt: skip
        return CompletionResponse(
            id=new_id("cmpl"), created=now(), model=self.backend.model_name, choices=choices,
            usage=usage_of(done), thinkbrake=summary(done, control),
        )  # fmt: skip

    async def _completion_stream(
        self, first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None], control: RequestControl, n: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        chunk_id, created, model = new_id("cmpl"), now(), self.backend.model_name

        def chunk(choices: list[CompletionChoice], **extra: Any) -> str:
            return sse(CompletionResponse(id=chunk_id, created=created, model=model, choices=choices, **extra))

        text_frame = CompletionFrames(chunk_id, created, model)
        results: list[ChoiceResult | None] = [None] * n
        try:
            async for event in _chain(first, events):
                if event.text:
                    yield text_frame(event.index, event.text)
                if event.result is not None:
                    results[event.index] = result = event.result
                    last = all(item is not None for item in results)
                    extra = {"thinkbrake": summary(_done(results), control)} if last and not include_usage else {}
                    final = CompletionChoice(
                        index=event.index, text="", finish_reason=result.finish_reason,
                        thinkbrake=result.info(control.policy.name, control.shadow),
                    )  # fmt: skip
                    yield chunk([final], **extra)
            if include_usage:
                done = _done(results)
                yield chunk([], usage=usage_of(done), thinkbrake=summary(done, control))
        except Exception as error:  # noqa: BLE001 - mid-stream failure: one error event, then [DONE]
            yield sse(error_body(error))  # all four fields, param and code too
        yield sse("[DONE]")


async def unless_disconnected(request: Request, work: Awaitable[Any], poll_seconds: float = 0.25) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which aborts the backend requests).

    Starlette cancels a *streaming* response on disconnect by itself; this covers the time before the first
    byte, and whole non-streaming requests.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_seconds)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected; request aborted")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _done(results: list[ChoiceResult | None]) -> list[ChoiceResult]:
    return [result for result in results if result is not None]


async def _first(events: AsyncGenerator[ChoiceEvent, None]) -> ChoiceEvent | None:
    """The first event, so errors raised before any output become ordinary HTTP errors."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await events.aclose()
        raise


async def _chain(
    first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None]
) -> AsyncGenerator[ChoiceEvent, None]:
    async with aclosing(events) as rest:
        if first is not None:
            yield first
            async for event in rest:
                yield event


def not_serving(backend: Backend) -> BackendError | None:
    """Why ``backend`` cannot serve now, as a 503, or None. A backend that can tell (the upstream: never reached,
    unreachable, failing) says so through its ``unavailable()``; otherwise a backend is loading until ready."""
    unavailable = getattr(backend, "unavailable", None)
    if unavailable is not None:
        return unavailable()  # type: ignore[no-any-return]
    return None if backend.ready else BackendError("the model is still loading", 503)


def error_body(error: Exception) -> ErrorResponse:
    """The OpenAI error shape for an exception raised while serving a request."""
    if isinstance(error, BackendError):
        return ErrorResponse.of(error.status_code, error.message, error.param, error.code)
    log.exception("request failed", exc_info=error)
    return ErrorResponse.of(500, f"{type(error).__name__}: {error}")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error: ``type`` follows the status, ``code`` is a string (the status's default if None)."""
    return JSONResponse(ErrorResponse.of(status, message, param, code).model_dump(), status_code=status)


def last_user_text(messages: list[dict[str, Any]]) -> str | None:
    """The question a chat asks: the text of its last user message (text parts joined), or None."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
            return content if isinstance(content, str) and content.strip() else None
    return None
