"""Embedded backend: a vLLM ``AsyncLLM`` in this process. The only module that imports vLLM (lazily).

Prefix caching is always on: a continuation after a stop is sent as token ids (prompt + generated + the
end-of-thinking ids) so every full KV block of the stopped request is reused. An answer probe is a second
engine request on prompt ids + generated ids + the probe suffix's ids, so the cache serves its prefix too; it
runs in the same batches as the main decode, which does not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from controller.delimiters import Delimiters, delimiters_for, infer_delimiters
from controller.probes import ProbeSpec
from server.backend import (
    BackendError,
    ChatPrompt,
    Chunk,
    ProbeOutput,
    Prompt,
    Sampling,
    TextPrompt,
)
from server.settings import Settings
from server.token_texts import TokenSplitter, per_token

log = logging.getLogger(__name__)

_PROBE_MESSAGES = [{"role": "user", "content": "ping"}]
#: OpenAI/vLLM request fields that map one to one onto ``SamplingParams`` (others, e.g. ``logprobs`` or
#: ``response_format``, are not supported by the embedded backend and are ignored)
_SAMPLING_OPTIONS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
     "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "skip_special_tokens",
     "spaces_between_special_tokens", "include_stop_str_in_output"}
)  # fmt: skip


def _client_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a bad request (a prompt too long, bad sampling values): 400s, not 500s."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # vLLM before its exception hierarchy raised ValueError
        return (ValueError,)
    return (ValueError, VLLMClientError)


class EngineGeneration:
    """One engine request streamed in DELTA mode; ``abort`` stops decoding at once.

    It yields one chunk per token where it can: an engine output that merges several steps (its reader lagged) is
    split again by token (:mod:`server.token_texts`), so the controller sees the same deltas, and a stop lands on
    the same token, however loaded the machine is.
    """

    def __init__(self, backend: EmbeddedBackend, prompt: Any, params: Any, request_id: str) -> None:
        self._backend = backend
        self._prompt = prompt
        self._params = params
        self.request_id = request_id
        self.prompt_token_ids: list[int] | None = None
        self.num_cached_tokens: int | None = None
        self._stream: Any = None
        self._aborted = False
        skip = bool(getattr(params, "skip_special_tokens", True))
        self._splitter = TokenSplitter(backend.tokenizer, skip)  # an output that merged engine steps, per token

    async def __aiter__(self) -> AsyncGenerator[Chunk, None]:
        """One chunk per token: an output that merged several engine steps (a reader that lagged) is split with
        the text each token gives on its own (:mod:`server.token_texts`), or stays whole when its text does not
        split exactly."""
        engine = self._backend.engine
        client_errors = _client_errors()
        self._stream = engine.generate(self._prompt, self._params, self.request_id)
        try:
            async for output in self._stream:
                if self.prompt_token_ids is None and output.prompt_token_ids is not None:
                    self.prompt_token_ids = list(output.prompt_token_ids)
                if output.num_cached_tokens is not None:
                    self.num_cached_tokens = output.num_cached_tokens
                completion = output.outputs[0]
                chunk = Chunk(completion.text, list(completion.token_ids), completion.finish_reason)
                for piece in per_token(chunk, self._splitter, self.prompt_token_ids):
                    yield piece
        except client_errors as error:  # vLLM validates the request when it is added (length, params)
            raise BackendError(str(error), status_code=400) from error

    async def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        await self._backend.engine.abort(self.request_id)
        if self._stream is not None:
            await self._stream.aclose()


class EmbeddedBackend:
    """vLLM ``AsyncLLM`` with the model's own tokenizer and chat template."""

    def __init__(self, settings: Settings) -> None:
        assert settings.model is not None
        self.settings = settings
        self.model_path: str = settings.model
        self.model_name = settings.served_model_name or settings.model
        self.delimiters = Delimiters()
        self.think_end_text = "\n</think>\n\n"
        self.engine: Any = None
        self.tokenizer: Any = None
        #: the context length the engine runs with (known once started)
        self.max_model_len: int | None = None
        self._suffix_ids: dict[str, list[int]] = {}

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    async def start(self) -> None:
        self.engine = await asyncio.to_thread(self._build_engine)
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.delimiters = self._delimiters()
        self.think_end_text = f"\n{self.delimiters.end}\n\n"
        log.info("engine ready: model %s, thinking delimiters %s", self.model_path, self.delimiters)

    def engine_kwargs(self) -> dict[str, Any]:
        """``AsyncEngineArgs`` keywords: thinkbrake's defaults, then the settings, then vLLM flags as given."""
        settings = self.settings
        args: dict[str, Any] = {
            "model": self.model_path,
            "served_model_name": self.model_name,
            "enable_prefix_caching": True,
            "disable_log_stats": False,
            "enforce_eager": settings.enforce_eager,
        }
        if settings.max_model_len:
            args["max_model_len"] = settings.max_model_len
        if settings.kv_cache_bytes:
            args["kv_cache_memory_bytes"] = settings.kv_cache_bytes
        if settings.logits_processors:
            args["logits_processors"] = list(settings.logits_processors)
        return {**args, **settings.engine_args}

    def _build_engine(self) -> Any:
        try:
            return self._start_engine()
        except Exception as error:
            from server.engine_config import explain_start_failure

            log.debug("engine start failed", exc_info=error)
            raise BackendError(explain_start_failure(error, self.model_path), status_code=503) from error

    def _start_engine(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from server.engine_config import check_cpu_memory, cpu_default_kv_bytes, fit_context

        args = self.engine_kwargs()
        check_cpu_memory(args)
        default_kv = cpu_default_kv_bytes(args)
        if default_kv is not None:
            args["kv_cache_memory_bytes"] = default_kv
        engine_args = AsyncEngineArgs(**args)
        vllm_config = engine_args.create_engine_config()
        if default_kv is not None and not args.get("max_model_len"):
            context = fit_context(default_kv, vllm_config)
            if context is not None:
                log.info(
                    "context: %d tokens (the model's %d do not fit the default KV cache; "
                    "--max-model-len or --kv-cache-memory-bytes to change)",
                    context,
                    vllm_config.model_config.max_model_len,
                )
                engine_args = AsyncEngineArgs(**{**args, "max_model_len": context})
                vllm_config = engine_args.create_engine_config()
        return AsyncLLM.from_vllm_config(
            vllm_config,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )

    def _delimiters(self) -> Delimiters:
        family = self.settings.delimiters
        if family != "auto":
            return delimiters_for(family)
        template = getattr(self.tokenizer, "chat_template", None)
        tail = ""
        if template:
            try:
                tail = str(self._render(_PROBE_MESSAGES, {}))[-64:]
            except Exception:  # noqa: BLE001 - a template that needs more context: fall back to the template text
                log.warning("could not render the chat template to infer thinking delimiters", exc_info=True)
        return infer_delimiters(template, tail)

    async def shutdown(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()
            # AsyncLLM.__del__ calls shutdown() again, at interpreter exit when vLLM's modules are torn down, and
            # that call raises ("Exception ignored in ... __del__"). The engine is shut down: make it a no-op.
            engine.shutdown = lambda *args, **kwargs: None

    def _render(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return str(rendered)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, ChatPrompt):
            try:
                text = self._render(prompt.messages, prompt.template_kwargs)
            except Exception as error:  # noqa: BLE001 - jinja/template errors are the client's messages
                raise BackendError(f"chat template: {error}", 400) from error
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        return list(self.tokenizer.encode(prompt.text or ""))

    def _params(self, sampling: Sampling) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        options = {key: value for key, value in sampling.options.items() if key in _SAMPLING_OPTIONS}
        try:
            return SamplingParams(
                n=1,
                max_tokens=sampling.max_tokens,
                output_kind=RequestOutputKind.DELTA,
                extra_args=dict(sampling.extra_args) if sampling.extra_args else None,
                **options,
            )
        except (TypeError, *_client_errors()) as error:
            raise BackendError(str(error), 400) from error

    def generate(self, prompt: Prompt, sampling: Sampling, request_id: str) -> EngineGeneration:
        return self.continue_tokens(self._prompt_ids(prompt), sampling, request_id)

    def continue_tokens(self, token_ids: list[int], sampling: Sampling, request_id: str) -> EngineGeneration:
        from vllm.inputs import TokensPrompt

        if self.engine is None:
            raise BackendError("the engine is not running", 503)
        prompt = TokensPrompt(prompt_token_ids=list(token_ids))
        return EngineGeneration(self, prompt, self._params(sampling), request_id)

    async def encode(self, text: str) -> list[int] | None:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def probe(
        self, token_ids: list[int], spec: ProbeSpec, extra_args: dict[str, Any] | None, request_id: str
    ) -> ProbeOutput:
        """One answer probe: greedy, ``spec.max_tokens`` at most, the sampled tokens' log-probabilities
        (``logprobs=0``: raw model log-probabilities, as vLLM computes them by default). Cancelling aborts it
        (vLLM aborts a request whose generator is cancelled)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self.engine is None:
            raise BackendError("the engine is not running", 503, "ServiceUnavailableError")
        suffix = self._suffix_ids.get(spec.suffix)
        if suffix is None:
            suffix = self._suffix_ids[spec.suffix] = list(self.tokenizer.encode(spec.suffix, add_special_tokens=False))
        prompt_ids = [*token_ids, *suffix]
        params = SamplingParams(
            n=1,
            temperature=0.0,
            max_tokens=spec.max_tokens,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args=dict(extra_args) if extra_args else None,
        )
        final: Any = None
        try:
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
                final = output
        except ValueError as error:  # vLLM validates the request when it is added (e.g. too long)
            raise BackendError(f"probe: {error}", 400, "BadRequestError") from error
        if final is None or not final.outputs:
            raise BackendError("probe: the engine returned no output")
        completion = final.outputs[0]
        token_list = list(completion.token_ids)
        positions = list(completion.logprobs or ())  # one dict per decoded token (the sampled token's entry)
        logprobs = [position[token].logprob for token, position in zip(token_list, positions, strict=False)]
        return ProbeOutput(completion.text, logprobs, len(token_list), len(prompt_ids), final.num_cached_tokens)

    async def prompt_tail(self, prompt: TextPrompt) -> str:
        if prompt.token_ids is not None:
            return str(self.tokenizer.decode(prompt.token_ids[-16:]))
        return (prompt.text or "")[-64:]
