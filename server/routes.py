"""The generation endpoints: ``/v1/chat/completions`` and ``/v1/completions``, streamed (SSE) or not.

Both go the same way: validate, build one :class:`server.choice.ChoiceRunner` per choice, merge their events
(:mod:`server.fan_in`) and write them in the endpoint's shape (:mod:`server.shapes`, :mod:`server.writers`).
The first event is awaited before the HTTP response starts, so a request the backend rejects at once (a prompt
too long, bad sampling values) still gets a proper HTTP error; later failures become one SSE error event
followed by ``data: [DONE]``. Cancelling the response (client disconnect) cancels every choice task, which
aborts its backend request.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from fastapi.responses import StreamingResponse

from controller.delimiters import Delimiters
from controller.policies import OffConfig
from server.backend import Backend, BackendError, ChatPrompt, Prompt, Sampling, TextPrompt
from server.calibrated import Level
from server.choice import ChoiceRunner, RunContext
from server.comparisons import Comparisons
from server.errors import ModelNotFound, not_serving
from server.fan_in import first_event, merge
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    RequestControl,
    new_id,
    parse_control,
    requested_risk,
)
from server.settings import Settings
from server.shapes import CHAT, COMPLETION, ResponseShape
from server.writers import write_response, write_stream


class Service:
    """Request handling for one server: validation, choice runners, the response in the endpoint's shape."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        # its worker processes start once the backend is up (:meth:`warm_up`): a server whose model fails to load
        # never spawns them, so it exits with its one-line error and nothing else
        self.comparer = Comparisons()
        self.calibration = settings.served_calibration()
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

    def _control(self, request: GenerationRequest) -> RequestControl:
        self.check_model(request.model)
        self.check_token_limit(request)
        level = self._level(request)
        raw = request.thinkbrake if level is None else request.explicit_thinkbrake  # no effort preset under a level
        return parse_control(raw, self.settings, self.random.random(), level)

    def _level(self, request: GenerationRequest) -> Level | None:
        """The calibrated level the request runs (:mod:`server.calibrated`), None when no calibration applies: none
        served, a request naming its own policy, ``reasoning_effort`` high, or a model the file does not hold."""
        explicit = request.explicit_thinkbrake
        risk = requested_risk(explicit)
        if self.calibration is None or "policy" in explicit:
            return None  # parse_control rejects a risk here: nothing to choose it from
        effort = request.reasoning_effort
        if risk is None and effort == "high":
            return None
        for model in (self.backend.model_name, self.settings.model):
            level = self.calibration.choose(model, risk, effort) if model else None
            if level is not None:
                return level
        return None

    async def chat(self, request: ChatCompletionRequest) -> Any:
        control = self._control(request)
        messages = [message.model_dump(exclude_none=True) for message in request.messages]
        prompt = ChatPrompt(messages, request.chat_template_kwargs or {})
        question = last_user_text(messages)
        return await self._respond(CHAT, request, prompt, control, self.backend.delimiters, question)

    async def completions(self, request: CompletionRequest) -> Any:
        control = self._control(request)
        prompt = TextPrompt(request.prompt) if isinstance(request.prompt, str) else TextPrompt(token_ids=request.prompt)
        tail = (await self.backend.prompt_tail(prompt)).rstrip()
        start, end = self.backend.delimiters.start, self.backend.delimiters.end
        if tail.endswith(start):
            delimiters = Delimiters(start, end, implicit_start=True)
        else:  # the prompt does not leave the model inside thinking: nothing to stop
            delimiters = Delimiters(start, end, implicit_start=False)
            control = RequestControl(OffConfig(), control.finalize, control.max_answer_tokens, shadow=False)
        question = request.prompt if isinstance(request.prompt, str) else None
        return await self._respond(COMPLETION, request, prompt, control, delimiters, question)

    async def _respond(
        self, shape: ResponseShape, request: GenerationRequest, prompt: Prompt, control: RequestControl,
        delimiters: Delimiters, question: str | None,
    ) -> Any:  # fmt: skip
        runners = self._runners(request, prompt, control, delimiters, shape.raw_text, question)
        events = merge(runners, self.cleanups)
        first = await first_event(events)
        model = self.backend.model_name
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            body = write_stream(shape, model, first, events, request.n, include_usage)
            return StreamingResponse(body, media_type="text/event-stream")
        return await write_response(shape, model, first, events, request.n)

    def _runners(
        self, request: GenerationRequest, prompt: Prompt, control: RequestControl, delimiters: Delimiters, raw: bool,
        question: str | None,
    ) -> list[ChoiceRunner]:  # fmt: skip
        context = RunContext(self.backend, self.metrics, self.comparer, self.backend.model_name, self.end_ids)
        extra_args = {**self.settings.default_vllm_xargs, **(request.vllm_xargs or {})} or None
        sampling = Sampling(request.token_limit, request.sampling_options(), extra_args)
        request_id = new_id("tb")
        return [
            ChoiceRunner(context, index, f"{request_id}-{index}", prompt, sampling, control, delimiters, raw, question)
            for index in range(request.n)
        ]


def last_user_text(messages: list[dict[str, Any]]) -> str | None:
    """The question a chat asks: the text of its last user message (text parts joined), or None."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
            return content if isinstance(content, str) and content.strip() else None
    return None
