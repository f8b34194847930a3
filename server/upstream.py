"""Upstream backend: any OpenAI-compatible server over HTTP. The streamed generations and the answer probes go
through :mod:`server.upstream_http` (aiohttp: the per-token and per-probe path); the model list and the tokenizer
through httpx (:func:`rare_requests_client`). No other module speaks HTTP upstream.

Every generation is a streaming request with ``n=1`` and ``return_token_ids`` (vLLM >= 0.10), so each chunk
brings its token ids and the first brings the prompt's: a continuation after a stop can then be sent as a
token-id prompt to ``/v1/completions`` and reuse the upstream's prefix cache. Closing the HTTP stream is the
abort: vLLM's server sees the disconnect and stops decoding.

With a reasoning parser upstream, thinking arrives in ``reasoning`` (vLLM >= 0.32) or ``reasoning_content``
(older) and the answer in ``content``; :class:`RawTextRebuilder` puts the thinking tags back so the controller
sees the model's raw text either way. Without a parser the tags are already inside ``content``.

An answer probe is one non-streamed ``/v1/completions`` request with a token-id prompt (prompt ids + generated
ids + the suffix's ids from ``/tokenize``), ``temperature: 0``, ``max_tokens`` and ``logprobs: 1``. An upstream
that refuses it (a 4xx) raises :class:`ProbeRejected`: the choice falls back to text-only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson

from controller.delimiters import Delimiters, delimiters_for
from controller.probes import ProbeSpec
from server.backend import (
    BackendError,
    ChatPrompt,
    ChoiceMemory,
    Chunk,
    ProbeOutput,
    ProbeRejected,
    Prompt,
    Sampling,
    TextPrompt,
    choice_of,
    tokens_through,
)
from server.settings import Settings
from server.token_texts import TokenSplitter, load_tokenizer, per_token
from server.upstream_health import CONNECT_ERRORS, UNAVAILABLE_CODE, UpstreamHealth, backoff, describe
from server.upstream_http import UpstreamResponse, UpstreamSession

log = logging.getLogger(__name__)

#: seconds a new connection to the upstream may take
CONNECT_SECONDS = 10.0
#: attempts after a connect that failed (httpx transport retries; it sent nothing)
CONNECT_RETRIES = 2


#: the delta fields that carry text (a delta with token ids and none of them is a token the parser swallowed)
_TEXT_FIELDS = frozenset({"reasoning", "reasoning_content", "content"})


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

    def close_thinking(self) -> str:
        """A token the parser swallowed while in the thinking (vLLM sends it as a delta without any text field):
        the end-of-thinking token. Returns the end tag, so the controller sees it with that token, as the
        embedded engine streams it (the tokens after it are then answer tokens)."""
        if not self._in_reasoning or self._closed:
            return ""
        self._closed = True
        return self.delimiters.end

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

    def __init__(
        self, backend: UpstreamBackend, path: str, body: dict[str, Any], chat: bool, request_id: str = "",
    ) -> None:  # fmt: skip
        self._backend = backend
        self._path = path
        self._body = body
        self._chat = chat
        self._request_id = request_id
        self._response: UpstreamResponse | None = None
        self._aborted = False
        self.prompt_token_ids: list[int] | None = None
        self.num_cached_tokens: int | None = None

    def __aiter__(self) -> AsyncGenerator[Chunk, None]:
        """One :class:`Chunk` per body chunk received: SSE events that arrive in one HTTP chunk are merged into
        one chunk (vLLM sends one event per chunk, so there nothing changes). The stream itself, not a wrapper
        around it: every token passes through each generator layer."""
        return self._stream()

    async def _stream(self) -> AsyncGenerator[Chunk, None]:
        rebuilder = RawTextRebuilder(self._backend.delimiters)
        end_ids = await self._backend.end_ids() if self._chat else None
        try:
            headers = self._backend.affinity(self._request_id)
            response = self._response = await self._backend.session.post(self._path, self._body, headers)
        except CONNECT_ERRORS as error:
            message = self._backend.lost(error, f"POST {self._path}")
            raise BackendError(message, 503, UNAVAILABLE_CODE) from error
        except httpx.HTTPError as error:
            raise BackendError(f"upstream request failed: {type(error).__name__}: {error}") from error
        try:
            self._backend.health.reachable()
            if response.status_code != 200:
                await response.aread()
                raise upstream_error(response, self._backend.settings.upstream_api_key)
            self._backend.echo(self._request_id, response.headers)
            lines = SSELineDecoder()
            splitter = self._backend.splitter(self._body)
            done = False
            async for raw in response.aiter_bytes():
                if self._aborted:
                    return
                if done:  # read to the end, so the connection goes back to the pool instead of being closed
                    continue
                merged, done, failure = self._parse_lines(lines.decode(raw), rebuilder, end_ids)
                if merged is not None:
                    for chunk in per_token(merged, splitter, self.prompt_token_ids):
                        yield chunk
                if failure is not None:
                    raise failure
        except httpx.HTTPError as error:
            if self._aborted:
                return
            raise BackendError(f"upstream request failed: {type(error).__name__}: {error}") from error
        finally:
            await close_response(response)

    def _parse_lines(
        self, lines: list[bytes], rebuilder: RawTextRebuilder, end_ids: list[int] | None = None
    ) -> tuple[Chunk | None, bool, BackendError | None]:
        """The merged chunk of complete SSE lines, whether ``[DONE]`` came, and an error that ends the stream
        (raised after the text before it is forwarded)."""
        merged: Chunk | None = None
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return merged, True, None
            try:
                chunk = self._parse(load_event(data), rebuilder, end_ids)
            except ValueError:
                return merged, True, BackendError("upstream sent a malformed event (not JSON)")
            except BackendError as error:
                return merged, True, error
            if chunk is None:
                continue
            if merged is None:
                merged = chunk
            else:
                merged.text += chunk.text
                merged.token_ids += chunk.token_ids
                merged.finish_reason = chunk.finish_reason or merged.finish_reason
        return merged, False, None

    def _parse(
        self, event: dict[str, Any], rebuilder: RawTextRebuilder, end_ids: list[int] | None = None
    ) -> Chunk | None:
        """One event's chunk (None for an event without a choice). Every token passes here: the common case (a
        delta with text and its token ids) takes the fewest lookups."""
        choices = event.get("choices")
        if not choices and "error" in event:
            error = event["error"]
            raise BackendError(f"upstream error: {error.get('message') if isinstance(error, dict) else error}")
        if self.prompt_token_ids is None:  # (the first event brings them, at the top or in the choice)
            prompt_ids = event.get("prompt_token_ids")
            if prompt_ids is None and choices:
                prompt_ids = choices[0].get("prompt_token_ids")
            if prompt_ids is not None:
                self.prompt_token_ids = list(prompt_ids)
        if not choices:
            return None
        choice = choices[0]
        ids = choice.get("token_ids")
        if self._chat:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning")
            if reasoning is None:
                reasoning = delta.get("reasoning_content")
            content = delta.get("content")
            if ids and reasoning is None and content is None and not _TEXT_FIELDS & delta.keys():
                text = rebuilder.close_thinking()  # a token the parser swallowed: the end of thinking
            else:
                text = rebuilder.feed(reasoning, content)
            if end_ids and ids and end_ids[-1] in ids and tokens_through(end_ids, [], list(ids)) is not None:
                # the end tag came with the last thinking tokens and no answer text yet (the parser then sends
                # reasoning only): close the thinking here, with its tokens, not with the answer's first token
                text += rebuilder.close_thinking()
        else:
            text = choice.get("text") or ""
        if ids is None:  # not a vLLM upstream: count one token per chunk that carries text
            ids = [-1] if text else []
        return Chunk(text, ids if type(ids) is list else list(ids), choice.get("finish_reason"))

    async def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        if self._response is not None:
            await close_response(self._response)


def load_event(data: bytes) -> Any:
    """One SSE event's JSON, parsed by orjson (a token's event in a quarter of the time of ``json``); what orjson
    refuses and ``json`` takes (``NaN``, ``Infinity``) is read by ``json``. The one difference left: an integer past
    64 bits comes out as a float (no field of an OpenAI event holds one). Raises ``ValueError`` for what is not
    JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class SSELineDecoder:
    """Incremental bytes -> complete lines (without line endings). A partial last line waits in a list of
    pieces, joined once its newline arrives: a long line split over many reads is not re-copied per read."""

    def __init__(self) -> None:
        self._pending: list[bytes] = []

    def decode(self, data: bytes) -> list[bytes]:
        lines = data.split(b"\n")
        if len(lines) == 1:
            self._pending.append(data)
            return []
        if self._pending:
            lines[0] = b"".join([*self._pending, lines[0]])
        last = lines.pop()
        self._pending = [last] if last else []
        return [line.rstrip(b"\r") for line in lines]


async def close_response(response: UpstreamResponse) -> None:
    """Close an upstream response, even when the caller is cancelled meanwhile (a client that went away is
    often cancelled twice): an interrupted close would leave the connection checked out of the pool for good,
    and the upstream decoding for nobody."""

    async def close() -> None:
        try:
            await response.aclose()
        except Exception as error:  # noqa: BLE001 - the connection is gone either way
            log.debug("closing the upstream response failed: %s", error)

    await asyncio.shield(asyncio.ensure_future(close()))


#: upstream statuses that are about thinkbrake's own credentials, not the client's request
_GATEWAY_STATUSES = frozenset({401, 403, 407})


def upstream_error(response: httpx.Response | UpstreamResponse, secret: str | None = None) -> BackendError:
    """A :class:`BackendError` carrying the upstream's own message and a matching status.

    The upstream's key never reaches the client: it is cut out of the message (an upstream may quote the key it
    was sent), and an authentication failure upstream is a 502 (the client's own key is not at fault). A client
    error (4xx) keeps the upstream's string ``code`` and ``param``; otherwise the code is ``upstream_error``.
    """
    code = param = None
    try:
        detail = response.json()
        error = detail.get("error", {})
        message = error.get("message") or detail.get("message") or response.text
        code = error.get("code") if isinstance(error.get("code"), str) else None  # vLLM sends the status number
        param = error.get("param") if isinstance(error.get("param"), str) else None
    except (ValueError, AttributeError):
        message = response.text
    if secret:
        message = str(message).replace(secret, "***")
    status = response.status_code
    if not 400 <= status < 500 or status in _GATEWAY_STATUSES:
        status, code, param = 502, None, None
    return BackendError(f"upstream: {message}", status, code or "upstream_error", param)


def rare_requests_client(
    base_url: str, headers: dict[str, str], timeout: httpx.Timeout, max_connections: int, tls: ssl.SSLContext
) -> httpx.AsyncClient:
    """The httpx client of the upstream's rare requests: the model list (start-up and health), ``/tokenize`` (the
    end-of-thinking ids, once) and ``/detokenize`` (a completion prompt given as token ids). Streams and probes go
    through :class:`server.upstream_http.UpstreamSession`. A connect that fails or times out sent nothing, so it is
    retried (twice, the first at once): on a machine busy enough that this process sees a socket's connect complete
    only seconds late, a fresh connection must not fail the request."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=tls, retries=CONNECT_RETRIES)
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)


class UpstreamBackend:
    """Proxy to an OpenAI-compatible server; becomes ready once ``/v1/models`` lists a model.

    Health (:attr:`health`, :mod:`server.upstream_health`): at start the upstream is asked for its models until
    it lists one, with back-off between attempts; a request that cannot connect later marks it unreachable and
    starts the same watch in the background, until it answers again. Requests are never refused for a stale
    state once the upstream was reached: each tries its own connection.
    """

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        """The backend of ``url`` (default: the one ``--upstream``)."""
        url = url or settings.upstream[0]
        self.settings = settings
        family = settings.delimiters
        self.delimiters = delimiters_for("think-implicit" if family == "auto" else family)
        self.think_end_text = f"\n{self.delimiters.end}\n\n"
        self.model_name = settings.served_model_name or ""
        self.upstream_model = ""
        headers = {"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
        timeout = httpx.Timeout(settings.request_timeout, connect=CONNECT_SECONDS)
        tls = httpx.create_ssl_context()  # one for every connection pool: each context holds its own CA store
        self.client = rare_requests_client(url, headers, timeout, settings.upstream_max_connections, tls)
        self.session = UpstreamSession(
            url, headers, settings.request_timeout, CONNECT_SECONDS, settings.upstream_max_connections, tls
        )
        self.health = UpstreamHealth(url, settings.upstream_api_key)
        self._ready = False
        self._watch: asyncio.Task[None] | None = None
        self._suffix_ids: dict[str, list[int]] = {}
        self._end_ids: list[int] | None = None
        self._end_ids_asked = False
        self._echoed: ChoiceMemory[str] = ChoiceMemory()  # --affinity-echo-header values, per choice
        self.tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None  # --tokenizer

    def splitter(self, body: dict[str, Any]) -> TokenSplitter | None:
        """A per-token splitter for one generation (None without ``--tokenizer``)."""
        if self.tokenizer is None:
            return None
        return TokenSplitter(self.tokenizer, bool(body.get("skip_special_tokens", True)))

    async def end_ids(self) -> list[int] | None:
        """The end-of-thinking delimiter's token ids (from ``/tokenize``, asked once; None when the upstream
        cannot tell). A chat stream uses them to close the thinking at the tokens that end it."""
        if not self._end_ids_asked:
            self._end_ids_asked = True  # once: an upstream without /tokenize is not asked on every request
            self._end_ids = await self.encode(self.delimiters.end) or None
        return self._end_ids

    @property
    def ready(self) -> bool:
        """The upstream listed its models once (requests are served from then on)."""
        return self._ready

    def unavailable(self) -> BackendError | None:
        """A 503 saying why the upstream is not serving now (never reached, unreachable, failing), or None."""
        return None if self._ready and self.health.ok else self.health.error()

    async def start(self) -> None:
        """Wait until the upstream lists its models (retrying with back-off); remember the first one."""
        waits = backoff()
        while (models := await self.list_models()) is None:
            log.debug("upstream not serving yet: %s", self.health.reason)
            await asyncio.sleep(next(waits))
        self.upstream_model = models[0]
        self.model_name = self.model_name or self.upstream_model
        self._ready = True
        log.info("upstream %s ready: model %s", self.health.url, self.upstream_model)

    async def list_models(self) -> list[str] | None:
        """The upstream's model ids from ``GET /v1/models``; None (and the health says why) when it gives none."""
        key = self.settings.upstream_api_key
        try:
            response = await self.client.get("/v1/models")
        except CONNECT_ERRORS as error:
            self.health.unreachable(error, "GET /v1/models")
            return None
        except httpx.HTTPError as error:
            self.health.failing(f"did not answer GET /v1/models ({describe(error, key)})")
            return None
        if response.status_code != 200:
            hint = " (check --upstream-api-key)" if response.status_code in _GATEWAY_STATUSES else ""
            self.health.failing(f"answers GET /v1/models with HTTP {response.status_code}{hint}")
            return None
        try:
            models = [str(item["id"]) for item in response.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            self.health.failing("answers GET /v1/models with something that is not a model list")
            return None
        if not models:
            self.health.failing("lists no models on GET /v1/models")
            return None
        self.health.reachable()
        return models

    def lost(self, error: BaseException, path: str) -> str:
        """A request could not connect: mark the upstream unreachable, watch for its return; the client's message."""
        message = self.health.unreachable(error, path)
        if self._ready and (self._watch is None or self._watch.done()):
            self._watch = asyncio.create_task(self._until_reachable())
        return message

    async def _until_reachable(self) -> None:
        waits = backoff()
        while not self.health.ok and await self.list_models() is None:
            log.debug("upstream not serving: %s", self.health.reason)
            await asyncio.sleep(next(waits))

    async def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await asyncio.gather(self.client.aclose(), self.session.aclose())

    def _body(self, sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {key: value for key, value in sampling.options.items() if value is not None}
        body.update(model=self.upstream_model, stream=True, n=1, return_token_ids=True)
        body.pop("stream_options", None)
        if sampling.max_tokens is not None:
            body["max_tokens"] = sampling.max_tokens
        if sampling.extra_args:
            body["vllm_xargs"] = dict(sampling.extra_args)
        return body

    def affinity(self, request_id: str) -> dict[str, str]:
        """The headers that keep a choice on one replica behind a router, on the choice's request and every side
        request of it: ``--affinity-header`` naming the choice (its id), and ``--affinity-echo-header`` with the
        value the router gave the choice's first response. Empty without the settings."""
        headers = {}
        if self.settings.affinity_header:
            headers[self.settings.affinity_header] = choice_of(request_id)
        if self.settings.affinity_echo_header and (echoed := self._echoed.get(request_id)) is not None:
            headers[self.settings.affinity_echo_header] = echoed
        return headers

    def echo(self, request_id: str, headers: httpx.Headers) -> None:
        """Remember ``--affinity-echo-header`` from a choice's upstream response (its first value is kept)."""
        name = self.settings.affinity_echo_header
        if name and self._echoed.get(request_id) is None and (value := headers.get(name)):
            self._echoed.set(request_id, value)

    def generate(self, prompt: Prompt, sampling: Sampling, request_id: str) -> UpstreamGeneration:
        body = self._body(sampling)
        if isinstance(prompt, ChatPrompt):
            body["messages"] = prompt.messages
            if prompt.template_kwargs:
                body["chat_template_kwargs"] = dict(prompt.template_kwargs)
            return UpstreamGeneration(self, "/v1/chat/completions", body, chat=True, request_id=request_id)
        body["prompt"] = prompt.token_ids if prompt.token_ids is not None else prompt.text
        return UpstreamGeneration(self, "/v1/completions", body, chat=False, request_id=request_id)

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

    async def probe(
        self, token_ids: list[int], spec: ProbeSpec, extra_args: dict[str, Any] | None, request_id: str
    ) -> ProbeOutput:
        """One answer probe as a non-streamed token-id ``/v1/completions`` request (see the module docstring).
        Cancelling closes the connection, which aborts the request in vLLM."""
        suffix = self._suffix_ids.get(spec.suffix)
        if suffix is None:
            encoded = await self.encode(spec.suffix)
            if encoded is None:
                raise ProbeRejected("upstream cannot tokenize the probe suffix (no /tokenize)")
            suffix = self._suffix_ids[spec.suffix] = encoded
        prompt = [*token_ids, *suffix]
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "prompt": prompt,
            "max_tokens": spec.max_tokens,
            "temperature": 0,
            "logprobs": 1,
            "stream": False,
        }
        if extra_args:
            body["vllm_xargs"] = dict(extra_args)
        try:
            response = await self.session.post("/v1/completions", body, self.affinity(request_id))
            try:
                await response.aread()
            finally:
                await response.aclose()  # (cancelled mid-read: the connection is dropped, vLLM aborts the probe)
        except CONNECT_ERRORS as error:
            raise BackendError(self.lost(error, "POST /v1/completions (probe)"), 503, UNAVAILABLE_CODE) from error
        except httpx.HTTPError as error:
            raise BackendError(f"upstream probe failed: {type(error).__name__}: {error}") from error
        if response.status_code != 200:
            error = upstream_error(response, self.settings.upstream_api_key)
            if 400 <= response.status_code < 500 and response.status_code not in _GATEWAY_STATUSES:
                raise ProbeRejected(f"upstream rejected a token-id probe: {error.message}")
            raise error
        try:
            return probe_output(response.json(), len(prompt))
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise BackendError(f"upstream sent a malformed probe response ({type(error).__name__})") from error


def probe_output(data: dict[str, Any], prompt_tokens: int) -> ProbeOutput:
    """A non-streamed completion with ``logprobs`` (vLLM / OpenAI legacy shape) as a :class:`ProbeOutput`."""
    choice = data["choices"][0]
    logprobs = [
        float(value) for value in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if value is not None
    ]
    usage = data.get("usage") or {}
    tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return ProbeOutput(
        text=str(choice.get("text") or ""),
        logprobs=logprobs,
        tokens=int(tokens) if tokens is not None else len(logprobs),
        prompt_tokens=int(usage.get("prompt_tokens") or prompt_tokens),
        cached_tokens=None if cached is None else int(cached),
    )
