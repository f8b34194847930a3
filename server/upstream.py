"""Upstream backend: any OpenAI-compatible server over HTTP (httpx). The only module that speaks HTTP upstream.

Every generation is a streaming request with ``n=1`` and ``return_token_ids`` (vLLM >= 0.10), so each chunk
brings its token ids and the first brings the prompt's: a continuation after a stop can then be sent as a
token-id prompt to ``/v1/completions`` and reuse the upstream's prefix cache. Closing the HTTP stream is the
abort: vLLM's server sees the disconnect and stops decoding.

With a reasoning parser upstream, thinking arrives in ``reasoning`` (vLLM >= 0.32) or ``reasoning_content``
(older) and the answer in ``content``; :class:`RawTextRebuilder` puts the thinking tags back so the controller
sees the model's raw text either way. Without a parser the tags are already inside ``content``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from controller.delimiters import Delimiters, delimiters_for
from server.backend import BackendError, ChatPrompt, Chunk, Prompt, Sampling, TextPrompt
from server.settings import Settings

log = logging.getLogger(__name__)


class RawTextRebuilder:
    """Turns parsed chat deltas (reasoning / content) back into raw model text with thinking tags.

    Invariant: for a parser-split stream the output is ``[start] reasoning end content`` (start only when the
    thinking does not start implicitly); raw content without reasoning fields passes through unchanged, minus
    a leading start tag when thinking starts implicitly (the prompt already opened it).
    """

    def __init__(self, delimiters: Delimiters) -> None:
        self.delimiters = delimiters
        self._in_reasoning = False
        self._closed = False
        self._at_start = True

    def feed(self, reasoning: str | None, content: str | None) -> str:
        text = ""
        if reasoning:
            if not self._in_reasoning and not self._closed:
                self._in_reasoning = True
                if not self.delimiters.implicit_start:
                    text += self.delimiters.start
            text += reasoning
        if content:
            if self._in_reasoning and not self._closed:
                self._closed = True
                text += self.delimiters.end
            elif self._at_start and not self._in_reasoning and self.delimiters.implicit_start:
                content = content.removeprefix(self.delimiters.start)
            text += content
        if text:
            self._at_start = False
        return text


class UpstreamGeneration:
    """One streaming request to the upstream; ``abort`` closes the HTTP stream."""

    def __init__(self, backend: UpstreamBackend, path: str, body: dict[str, Any], chat: bool) -> None:
        self._backend = backend
        self._path = path
        self._body = body
        self._chat = chat
        self._response: httpx.Response | None = None
        self._aborted = False
        self.prompt_token_ids: list[int] | None = None
        self.num_cached_tokens: int | None = None

    async def __aiter__(self) -> AsyncGenerator[Chunk, None]:
        client = self._backend.client
        rebuilder = RawTextRebuilder(self._backend.delimiters)
        try:
            async with client.stream("POST", self._path, json=self._body) as response:
                self._response = response
                if response.status_code != 200:
                    await response.aread()
                    raise upstream_error(response)
                async for line in response.aiter_lines():
                    if self._aborted:
                        return
                    data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                    if not data:
                        continue
                    if data == "[DONE]":
                        return
                    chunk = self._parse(json.loads(data), rebuilder)
                    if chunk is not None:
                        yield chunk
        except httpx.HTTPError as error:
            if self._aborted:
                return
            raise BackendError(f"upstream request failed: {type(error).__name__}: {error}") from error

    def _parse(self, event: dict[str, Any], rebuilder: RawTextRebuilder) -> Chunk | None:
        if "error" in event and not event.get("choices"):
            error = event["error"]
            raise BackendError(f"upstream error: {error.get('message') if isinstance(error, dict) else error}")
        if self.prompt_token_ids is None and event.get("prompt_token_ids") is not None:
            self.prompt_token_ids = list(event["prompt_token_ids"])
        choices = event.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        if self.prompt_token_ids is None and choice.get("prompt_token_ids") is not None:
            self.prompt_token_ids = list(choice["prompt_token_ids"])
        if self._chat:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning")
            if reasoning is None:
                reasoning = delta.get("reasoning_content")
            text = rebuilder.feed(reasoning, delta.get("content"))
        else:
            text = choice.get("text") or ""
        token_ids = choice.get("token_ids")
        if token_ids is None:  # not a vLLM upstream: count one token per chunk that carries text
            token_ids = [-1] if text else []
        return Chunk(text, list(token_ids), choice.get("finish_reason"))

    async def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        if self._response is not None:
            await self._response.aclose()


def upstream_error(response: httpx.Response) -> BackendError:
    """A :class:`BackendError` carrying the upstream's own message and a matching status."""
    try:
        detail = response.json()
        message = detail.get("error", {}).get("message") or detail.get("message") or response.text
    except (ValueError, AttributeError):
        message = response.text
    status = response.status_code if 400 <= response.status_code < 500 else 502
    error_type = "BadRequestError" if status == 400 else "UpstreamError"
    return BackendError(f"upstream: {message}", status, error_type)


class UpstreamBackend:
    """Proxy to an OpenAI-compatible server; becomes ready once ``/v1/models`` answers."""

    def __init__(self, settings: Settings) -> None:
        assert settings.upstream is not None
        self.settings = settings
        family = settings.delimiters
        self.delimiters = delimiters_for("think-implicit" if family == "auto" else family)
        self.think_end_text = f"\n{self.delimiters.end}\n\n"
        self.model_name = settings.served_model_name or ""
        self.upstream_model = ""
        headers = {"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
        timeout = httpx.Timeout(settings.request_timeout, connect=10.0)
        self.client = httpx.AsyncClient(base_url=settings.upstream, headers=headers, timeout=timeout)
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Wait until the upstream lists its models; remember the first one."""
        while True:
            try:
                response = await self.client.get("/v1/models")
                if response.status_code == 200:
                    models = [item["id"] for item in response.json().get("data", [])]
                    if models:
                        break
            except httpx.HTTPError as error:
                log.info("waiting for upstream %s: %s", self.settings.upstream, error)
            await asyncio.sleep(1.0)
        self.upstream_model = models[0]
        self.model_name = self.model_name or self.upstream_model
        self._ready = True
        log.info("upstream %s ready: model %s", self.settings.upstream, self.upstream_model)

    async def shutdown(self) -> None:
        await self.client.aclose()

    def _body(self, sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {key: value for key, value in sampling.options.items() if value is not None}
        body.update(model=self.upstream_model, stream=True, n=1, return_token_ids=True)
        body.pop("stream_options", None)
        if sampling.max_tokens is not None:
            body["max_tokens"] = sampling.max_tokens
        if sampling.extra_args:
            body["vllm_xargs"] = dict(sampling.extra_args)
        return body

    def generate(self, prompt: Prompt, sampling: Sampling, request_id: str) -> UpstreamGeneration:
        body = self._body(sampling)
        if isinstance(prompt, ChatPrompt):
            body["messages"] = prompt.messages
            if prompt.template_kwargs:
                body["chat_template_kwargs"] = dict(prompt.template_kwargs)
            return UpstreamGeneration(self, "/v1/chat/completions", body, chat=True)
        body["prompt"] = prompt.token_ids if prompt.token_ids is not None else prompt.text
        return UpstreamGeneration(self, "/v1/completions", body, chat=False)

    def continue_tokens(self, token_ids: list[int], sampling: Sampling, request_id: str) -> UpstreamGeneration:
        return self.generate(TextPrompt(token_ids=list(token_ids)), sampling, request_id)

    async def encode(self, text: str) -> list[int] | None:
        body = {"model": self.upstream_model, "prompt": text, "add_special_tokens": False}
        try:
            response = await self.client.post("/tokenize", json=body)
            return list(response.json()["tokens"]) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    async def prompt_tail(self, prompt: TextPrompt) -> str:
        if prompt.token_ids is None:
            return (prompt.text or "")[-64:]
        body = {"model": self.upstream_model, "tokens": prompt.token_ids[-16:]}
        try:
            response = await self.client.post("/detokenize", json=body)
            return str(response.json()["prompt"]) if response.status_code == 200 else ""
        except (httpx.HTTPError, ValueError, KeyError):
            return ""
