"""Request and response shapes (OpenAI chat/completions, vLLM/DeepSeek reasoning fields, ``thinkbrake``).

Requests accept unknown top-level fields (clients send many; the upstream backend forwards them) but validate
the ones the server reads; the ``thinkbrake`` object is strict: an unknown field is an error naming it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

from pydantic import MISSING, BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from controller.policies import PolicyConfig, PolicyError, parse_policy
from server.calibrated import Level
from server.settings import Settings
from server.vocabulary import FINALIZE_MODES, Finalize

SERVER_CONTROL_FIELDS = ("finalize", "max_answer_tokens", "shadow")
#: request fields the server consumes itself; everything else is passed to the backend as sampling options
CONSUMED_FIELDS = frozenset(
    {"model", "messages", "prompt", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
     "vllm_xargs", "thinkbrake", "chat_template_kwargs", "return_token_ids"}
)  # fmt: skip


class ChatMessage(BaseModel):
    """One chat message; ``role`` is one OpenAI's chat API accepts (any other is a 400 naming ``messages.N.role``)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


#: ``reasoning_effort`` (the OpenAI request field) as thinkbrake policies: low stops at the first answer the text
#: confirms and caps thinking at 2048 tokens; medium is the default rule; high never stops thinking early.
REASONING_EFFORT_PRESETS: dict[str, dict[str, Any]] = {
    "low": {"policy": "fcs_reflection", "max_thinking_tokens": 2048},
    "medium": {"policy": "probe_fcs"},
    "high": {"policy": "off"},
}


class GenerationRequest(BaseModel):
    """Fields shared by chat and completion requests.

    ``reasoning_effort`` selects a preset of :data:`REASONING_EFFORT_PRESETS` as the ``thinkbrake`` object; an
    explicit ``thinkbrake`` object wins: with a ``policy`` it replaces the preset, without one its fields are
    laid over the preset's. The field itself is still passed on to the backend like any sampling option.
    """

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    thinkbrake: dict[str, Any] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    _explicit: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _effort_preset(self) -> GenerationRequest:
        self._explicit = dict(self.thinkbrake or {})
        if self.reasoning_effort is not None:
            explicit = self.thinkbrake or {}
            preset = REASONING_EFFORT_PRESETS[self.reasoning_effort]
            self.thinkbrake = dict(explicit) if "policy" in explicit else {**preset, **explicit}
        return self

    @property
    def explicit_thinkbrake(self) -> dict[str, Any]:
        """The ``thinkbrake`` object as the client sent it (before a ``reasoning_effort`` preset was laid under)."""
        return dict(self._explicit)

    def sampling_options(self) -> dict[str, Any]:
        """Pass-through sampling options (known and unknown fields the server does not consume)."""
        data = self.model_dump(exclude_none=True)
        return {key: value for key, value in data.items() if key not in CONSUMED_FIELDS}

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def token_limit_field(self) -> str:
        """The request field :attr:`token_limit` comes from (``max_completion_tokens`` wins, as in vLLM)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] = Field(min_length=1)


@dataclass(frozen=True)
class RequestControl:
    """How thinkbrake handles one request: the stop policy and what happens after a stop."""

    policy: PolicyConfig
    finalize: Finalize
    max_answer_tokens: int
    shadow: bool
    risk: float | None = None  # the calibrated level the policy comes from (``--calibration``), else None


def parse_control(
    raw: dict[str, Any] | None, settings: Settings, shadow_draw: float, level: Level | None = None
) -> RequestControl:
    """The request's ``thinkbrake`` object merged over the server defaults, or over the calibrated ``level``
    (``--calibration``: its policy, under the request's own policy arguments; ``raw`` then has no ``policy``).

    Raises :class:`PolicyError` whose field is the full request path (``thinkbrake.k``).
    ``shadow_draw`` is a uniform random number in [0, 1) deciding ``--shadow-rate`` sampling.
    """
    raw = dict(raw or {})
    finalize = raw.pop("finalize", settings.finalize)
    if finalize not in FINALIZE_MODES:
        raise PolicyError("thinkbrake.finalize", f"must be one of {', '.join(FINALIZE_MODES)}; got {finalize!r}")
    max_answer = raw.pop("max_answer_tokens", settings.max_answer_tokens)
    if isinstance(max_answer, bool) or not isinstance(max_answer, int) or max_answer < 1:
        raise PolicyError("thinkbrake.max_answer_tokens", f"must be an integer >= 1, got {max_answer!r}")
    shadow = raw.pop("shadow", None)
    if shadow is not None and not isinstance(shadow, bool):
        raise PolicyError("thinkbrake.shadow", f"must be true or false, got {shadow!r}")
    if "risk" in raw and level is None:
        raise PolicyError("thinkbrake.risk", "this server serves no calibration for the model (--calibration FILE)")
    raw.pop("risk", None)
    if level is not None:
        base = dict(level.policy)
    else:
        name = raw.get("policy", settings.policy)
        base = {"policy": name, **settings.policy_defaults(str(name))}
    try:
        policy = parse_policy({**base, **raw})
    except PolicyError as error:
        raise PolicyError(f"thinkbrake.{error.field}", error.message) from None
    if shadow is None:
        shadow = shadow_draw < settings.shadow_rate
    risk = None if level is None else level.risk
    return RequestControl(policy, finalize, max_answer, shadow and policy.name != "off", risk)


def requested_risk(explicit: dict[str, Any]) -> float | None:
    """``thinkbrake.risk`` of a request (None when absent); PolicyError unless a number in (0, 1), or when the
    request also names a ``policy`` (a risk level chooses the policy)."""
    if "risk" not in explicit:
        return None
    risk = explicit["risk"]
    if isinstance(risk, bool) or not isinstance(risk, int | float) or not 0.0 < float(risk) < 1.0:
        raise PolicyError("thinkbrake.risk", f"must be a number in (0, 1), e.g. 0.02; got {risk!r}")
    if "policy" in explicit:
        raise PolicyError("thinkbrake.risk", "give either a policy or a risk level (which chooses the policy)")
    return float(risk)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _is_none(value: Any) -> bool:
    return value is None


def omitted() -> Any:
    """A field left out of the JSON while it is None (fields without it are always written, null included)."""
    return Field(None, exclude_if=_is_none)


# Response shapes follow the OpenAI specification (openai-openapi): every field it requires is written, null
# where there is nothing (``logprobs``, ``refusal``, a stream choice's ``finish_reason``); optional fields
# are left out rather than sent as null where the specification wants an object (``prompt_tokens_details``).
# ``usage`` on chat stream chunks has three states, as OpenAI sends it: absent (no ``include_usage``), null
# (every chunk but the last with ``include_usage``), the counts (the last chunk). On completion chunks it is
# absent or the counts: there the specification does not allow null. The extra ``thinkbrake``,
# ``reasoning_content`` and ``reasoning`` fields are allowed by the specification (no additionalProperties).


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: dict[str, int] | None = omitted()
    prompt_tokens_details: dict[str, int] | None = omitted()


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = omitted()
    content: str | None = omitted()
    reasoning_content: str | None = omitted()
    reasoning: str | None = omitted()


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None
    thinkbrake: dict[str, Any] | None = omitted()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None | MISSING = MISSING
    thinkbrake: dict[str, Any] | None = omitted()


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: None = None
    finish_reason: str
    thinkbrake: dict[str, Any] | None = omitted()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    thinkbrake: dict[str, Any] | None = omitted()


class CompletionChoice(BaseModel):
    """A completion choice; streamed, ``finish_reason`` is null until the choice's last chunk (as OpenAI sends)."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    thinkbrake: dict[str, Any] | None = omitted()


class CompletionResponse(BaseModel):
    """A completion response, and (as in OpenAI's API) also the shape of each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | MISSING = MISSING
    thinkbrake: dict[str, Any] | None = omitted()


#: ``error.code`` by HTTP status where nothing more specific is known
_ERROR_CODES = {
    400: "invalid_request_error", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
    413: "request_too_large", 500: "internal_error", 502: "upstream_error", 503: "service_unavailable",
}  # fmt: skip


def error_type_for(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status: ``invalid_request_error`` (4xx) or ``server_error``."""
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def error_code_for(status: int) -> str:
    """The default ``error.code`` (a string, never the status number) for an HTTP status."""
    known = _ERROR_CODES.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return error_type_for(status)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

    @classmethod
    def of(cls, status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
        """The error body for ``status``: type from the status, ``code`` defaulting to the status's code."""
        detail = ErrorDetail(
            message=message, type=error_type_for(status), param=param, code=code or error_code_for(status)
        )
        return cls(error=detail)
