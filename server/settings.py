"""Server settings: command-line flags and ``THINKBRAKE_*`` environment variables (pydantic-settings).

Precedence: a flag given on the command line > the environment variable > the default below.
Invariants (checked here, so the rest of the server can rely on them): exactly one backend (``model`` for the
embedded engine, or ``upstream``); the default policy and its arguments parse; ``0 <= shadow_rate <= 1``.
"""

from __future__ import annotations

import pathlib
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from controller.policies import DEFAULT_POLICY, PolicyConfig, PolicyError, parse_policy

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
DelimiterFamily = Literal["auto", "think", "think-implicit", "sky-t1"]
Finalize = Literal["model", "answer", "none"]


class Settings(BaseSettings):
    """Everything ``thinkbrake serve`` is configured with."""

    model_config = SettingsConfigDict(env_prefix="THINKBRAKE_", extra="ignore", protected_namespaces=())

    model: str | None = Field(None, description="model id or local path for the embedded engine")
    upstream: str | None = Field(None, description="base URL of an OpenAI-compatible server to proxy")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    policy: str = DEFAULT_POLICY
    policy_args: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    delimiters: DelimiterFamily = "auto"
    finalize: Finalize = "model"
    max_answer_tokens: int = Field(1024, ge=1)
    shadow_rate: float = Field(0.0, ge=0.0, le=1.0)
    served_model_name: str | None = None
    upstream_api_key: str | None = Field(None, repr=False)
    request_timeout: float = Field(600.0, gt=0)
    upstream_max_connections: int = Field(1024, ge=1, description="concurrent connections to the upstream")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    api_key_file: str | None = None
    protect_health: bool = False
    protect_metrics: bool = False
    max_body_bytes: int = Field(4 << 20, ge=1)
    keep_alive_timeout: float = Field(75.0, gt=0, description="seconds an idle client connection is kept open")
    max_model_len: int | None = Field(None, ge=1)
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV cache size of the embedded engine in bytes")
    logits_processors: Annotated[list[str], NoDecode] = Field(default_factory=list)
    enforce_eager: bool = False
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="more vLLM engine arguments (AsyncEngineArgs keywords), e.g. from flags"
    )
    log_level: str = "info"
    default_vllm_xargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm_xargs every request gets under its own (a request's own keys win); the demo's script",
    )

    @field_validator("upstream")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("policy_args", mode="before")
    @classmethod
    def _parse_pairs(cls, value: Any) -> Any:
        """Accept ``["k=3", ...]`` (flags) or ``"k=3,min_thinking_tokens=10"`` (environment) as well as a dict."""
        if isinstance(value, str):
            value = [item for item in value.split(",") if item.strip()]
        if isinstance(value, list | tuple):
            pairs: dict[str, str] = {}
            for item in value:
                key, sep, raw = str(item).partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"policy argument must be K=V, got {item!r}")
                pairs[key.strip()] = raw.strip()
            return pairs
        return value

    @field_validator("logits_processors", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.model and self.upstream:
            raise ValueError("give either --model (embedded engine) or --upstream (proxy), not both")
        if not self.upstream and not self.model:
            self.model = DEFAULT_MODEL
        if self.api_key_file and not pathlib.Path(self.api_key_file).is_file():
            raise ValueError(f"--api-key-file {self.api_key_file}: no such file")
        try:
            self.default_policy()
        except PolicyError as error:
            raise ValueError(f"default policy: {error}") from None
        return self

    @property
    def mode(self) -> Literal["embedded", "upstream"]:
        return "upstream" if self.upstream else "embedded"

    def default_policy(self) -> PolicyConfig:
        return parse_policy({"policy": self.policy, **self.policy_args})

    def policy_defaults(self, name: str) -> dict[str, Any]:
        """The server's policy arguments that apply to policy ``name`` (all of them if it is the default)."""
        return dict(self.policy_args) if name == self.policy else {}
