"""Server settings: command-line flags and ``THINKBRAKE_*`` environment variables (pydantic-settings).

Precedence: a flag given on the command line > the environment variable > the default below.
Invariants (checked here, so the rest of the server can rely on them): exactly one backend (``model`` for the
embedded engine, or ``upstream``: one URL or several replicas, each once, without a trailing slash); the default
policy and its arguments parse; ``0 <= shadow_rate <= 1``; a ``calibration`` file loads and validates (``risk``
only with one); a ``record`` folder exists and is writable.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, PrivateAttr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from controller.calibration import CalibrationError
from controller.policies import DEFAULT_POLICY, POLICIES, PolicyConfig, PolicyError, parse_policy
from server.calibrated import ServedCalibration
from server.vocabulary import Finalize

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
DelimiterFamily = Literal["auto", "think", "think-implicit", "sky-t1"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class Flag:
    """How a setting appears among the ``thinkbrake serve`` flags (:mod:`server.serve_cli` makes them from this):
    its help group and text, and what cannot be read off the field's type (bool: a switch; list: repeatable;
    Literal: its values as choices). ``name``: the flag when it is not the field's name; ``own_engine``: only when
    vLLM's engine flags are not there (vLLM's parser has a flag of that name)."""

    group: str
    help: str
    metavar: str | None = None
    name: str | None = None
    choices: tuple[str, ...] | None = None
    lower: bool = False  # the value is lower-cased
    own_engine: bool = False


BACKEND, STOPPING, SERVER, ACCESS, ENGINE = (
    "backend (choose one)", "stopping", "server", "access and limits", "embedded engine"
)  # fmt: skip
RECORDING = "recording traffic"
#: the flag groups of ``serve --help``, in order
FLAG_GROUPS = (BACKEND, STOPPING, SERVER, ACCESS, RECORDING, ENGINE)


def _upstream_list(value: Any) -> Any:
    """``upstream``: one URL, a comma-separated string (environment) or a list (repeated flag); each without a
    trailing slash, and none twice."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        urls = [str(item).strip().rstrip("/") for item in value if str(item).strip()]
        if len(set(urls)) != len(urls):
            raise ValueError(f"an upstream is given twice: {', '.join(urls)}")
        return urls
    return value


def _parse_pairs(value: Any) -> Any:
    """``policy_args``: ``["k=3", ...]`` (flags) or ``"k=3,min_thinking_tokens=10"`` (environment) as well as a dict."""
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


def _record_folder(value: str | None) -> str | None:
    """``--record DIR`` is made if missing and must be writable: a bad folder fails at start, not per trace."""
    if not value:
        return None
    folder = pathlib.Path(value).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--record {value}: cannot make the folder: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--record {value}: the folder is not writable")
    return str(folder)


def _split_commas(value: Any) -> Any:
    """A list setting given as one comma-separated string (environment)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything ``thinkbrake serve`` is configured with; fields with a :class:`Flag` are its flags, in this order
    (grouped by ``Flag.group``)."""

    model_config = SettingsConfigDict(env_prefix="THINKBRAKE_", extra="ignore", protected_namespaces=())

    model: Annotated[
        str | None,
        Flag(BACKEND, "model id or local folder for the embedded vLLM engine, same as the MODEL argument (default: "
             "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B; offline, pass a local folder)"),
    ] = Field(None, description="model id or local path for the embedded engine")  # fmt: skip
    upstream: Annotated[
        list[str],
        BeforeValidator(_upstream_list),
        NoDecode,
        Flag(BACKEND, "base URL of an OpenAI-compatible server to proxy; repeat it (env: comma-separated) for replicas "
             "of one model: each request goes to the replica with the fewest in flight, and its answer probes and "
             "continuation to that same replica (its prefix cache); an unreachable replica is left out until it "
             "answers again", "URL"),
    ] = Field(default_factory=list, description="base URLs of OpenAI-compatible servers to proxy")  # fmt: skip
    upstream_api_key: Annotated[
        str | None,
        Flag(BACKEND, "bearer token thinkbrake sends to the upstream; never taken from or shown to clients "
             "(prefer env THINKBRAKE_UPSTREAM_API_KEY: flags show in the process list)"),
    ] = Field(None, repr=False)  # fmt: skip
    request_timeout: Annotated[
        float,
        Flag(BACKEND, "seconds the upstream may stay silent (connect, first byte, between chunks) before the request "
             "fails with an error for the client (default 600)"),
    ] = Field(600.0, gt=0)  # fmt: skip
    upstream_max_connections: Annotated[
        int, Flag(BACKEND, "concurrent streams to the upstream; more requests wait for a free connection (default 1024)", "N")
    ] = Field(1024, ge=1, description="concurrent connections to the upstream")  # fmt: skip
    affinity_header: Annotated[
        str | None,
        Flag(BACKEND, "header sent with one value per choice on its upstream request, its answer probes and its "
             "continuation, so a router that hashes on it (nginx hash, vLLM router --session-key) sends them to the "
             "replica that holds the choice's prefix cache", "NAME"),
    ] = None  # fmt: skip
    tokenizer: Annotated[
        str | None,
        Flag(BACKEND, "upstream mode: a folder (or tokenizer.json) with the model's tokenizer; an upstream event that "
             "carries several tokens (vLLM merges steps when its server lags) is then split per token, so a stop "
             "lands on its token as with the embedded engine", "PATH", own_engine=True),
    ] = None  # fmt: skip
    affinity_echo_header: Annotated[
        str | None,
        Flag(BACKEND, "response header a router sets to name the replica (llm-d's session affinity: x-session-token); "
             "its value on a choice's upstream response is sent back, in the same header, on the choice's answer "
             "probes and continuation", "NAME"),
    ] = None  # fmt: skip
    policy: Annotated[
        str, Flag(STOPPING, "default stop policy (default probe_fcs)", choices=tuple(sorted(POLICIES)))
    ] = DEFAULT_POLICY
    policy_args: Annotated[
        dict[str, str],
        BeforeValidator(_parse_pairs),
        NoDecode,
        Flag(STOPPING, "argument of the default policy, repeatable: k=3, min_thinking_tokens=100, "
             "max_thinking_tokens=8000", "K=V", name="policy_arg"),
    ] = Field(default_factory=dict)  # fmt: skip
    delimiters: Annotated[
        DelimiterFamily,
        Flag(STOPPING, "thinking tags; auto (default) infers them from the chat template (upstream: think-implicit)"),
    ] = "auto"
    finalize: Annotated[
        Finalize,
        Flag(STOPPING, "after a stop: the model writes its answer (default), a boxed answer is written, or nothing"),
    ] = "model"
    max_answer_tokens: Annotated[int, Flag(STOPPING, "token limit of the answer after a stop (default 1024)")] = Field(
        1024, ge=1
    )
    shadow_rate: Annotated[
        float,
        Flag(
            STOPPING, "fraction of requests run in shadow mode: the stop is recorded in metrics but not acted on", "R"
        ),
    ] = Field(0.0, ge=0.0, le=1.0)
    calibration: Annotated[
        str | None,
        Flag(STOPPING, "calibration file from 'thinkbrake calibrate' ('default': the one shipped): the served model's "
             "entry replaces the default policy with the rule certified at a risk level; a request picks a level with "
             "thinkbrake.risk or reasoning_effort low/medium", "FILE"),
    ] = None  # fmt: skip
    risk: Annotated[
        float | None,
        Flag(STOPPING, "with --calibration: the level a request gets when it names none (default: the file's "
             "default_risk)", "A"),
    ] = Field(None, gt=0.0, lt=1.0)  # fmt: skip
    host: Annotated[str, Flag(SERVER, "address to listen on (default 127.0.0.1)")] = "127.0.0.1"
    port: Annotated[int, Flag(SERVER, "port (default 8000)")] = Field(8000, ge=0, le=65535)
    workers: Annotated[
        int,
        Flag(SERVER, "worker processes sharing the port (default 1; upstream mode only): each serves whole requests, "
             "probes and continuations included, and /metrics sums them all", "N"),
    ] = Field(1, ge=1)  # fmt: skip
    keep_alive_timeout: Annotated[
        float,
        Flag(SERVER, "seconds an idle client connection stays open (default 75: longer than clients and load "
             "balancers keep theirs, so a client never reuses a connection the server is closing)", "S"),
    ] = Field(75.0, gt=0, description="seconds an idle client connection is kept open")  # fmt: skip
    log_level: Annotated[
        str,
        Flag(SERVER, "default info; debug also prints the traceback of an engine that fails to start, and vLLM's own "
             "log", choices=LOG_LEVELS, lower=True),
    ] = "info"  # fmt: skip
    served_model_name: Annotated[
        str | None,
        Flag(SERVER, "model name clients use (default: the model / upstream's)", own_engine=True),
    ] = None
    api_keys: Annotated[
        list[str],
        BeforeValidator(_split_commas),
        NoDecode,
        Flag(ACCESS, "accept clients sending 'Authorization: Bearer KEY'; repeatable (env: THINKBRAKE_API_KEYS=k1,k2). "
             "Without any key the API is open", "KEY", name="api_key"),
    ] = Field(default_factory=list, repr=False)  # fmt: skip
    api_key_file: Annotated[str | None, Flag(ACCESS, "more keys, one per line ('#' comments allowed)", "PATH")] = None
    protect_health: Annotated[bool, Flag(ACCESS, "/health needs a key too (default open)")] = False
    protect_metrics: Annotated[bool, Flag(ACCESS, "/metrics needs a key too (default open)")] = False
    max_body_bytes: Annotated[int, Flag(ACCESS, "larger request bodies get 413 (default 4194304 = 4 MiB)", "N")] = (
        Field(4 << 20, ge=1)
    )
    record: Annotated[
        str | None,
        AfterValidator(_record_folder),
        Flag(RECORDING, "write sampled requests to this folder as reasoning traces (JSON lines, the dev-probes format "
             "that replay and calibrate read); they hold the prompt's last user message and the model's output. Each "
             "recorded request runs in shadow mode, to its natural end", "DIR"),
    ] = None  # fmt: skip
    record_rate: Annotated[
        float, Flag(RECORDING, "with --record: fraction of requests recorded (default 1.0: all)", "R")
    ] = Field(1.0, ge=0.0, le=1.0)
    record_probe_every: Annotated[
        int,
        Flag(RECORDING, "with --record: an answer probe every N thinking tokens besides one at each of the first 30 "
             "\"Wait\"s, recorded and never acted on (default 64, as the dev-probes traces; 0: none)", "N"),
    ] = Field(64, ge=0)  # fmt: skip
    record_max_bytes: Annotated[
        int,
        Flag(RECORDING, "with --record: a new file before one would exceed N bytes (default 67108864 = 64 MiB)", "N"),
    ] = Field(64 << 20, ge=1)
    max_model_len: Annotated[int | None, Flag(ENGINE, "context length (default: the model's)", own_engine=True)] = (
        Field(None, ge=1)
    )
    kv_cache_bytes: Annotated[int | None, Flag(ENGINE, "KV cache size in bytes", own_engine=True)] = Field(
        None, ge=1, description="KV cache size of the embedded engine in bytes"
    )
    logits_processors: Annotated[
        list[str],
        BeforeValidator(_split_commas),
        NoDecode,
        Flag(ENGINE, "vLLM v1 logits processor to load, repeatable (enabled per request through vllm_xargs)",
             "MODULE:CLASS", own_engine=True),
    ] = Field(default_factory=list)  # fmt: skip
    enforce_eager: Annotated[bool, Flag(ENGINE, "skip graph compilation (faster start)", own_engine=True)] = False
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="more vLLM engine arguments (AsyncEngineArgs keywords), e.g. from flags"
    )
    default_vllm_xargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm_xargs every request gets under its own (a request's own keys win); the demo's script",
    )

    _served: ServedCalibration | None = PrivateAttr(None)  # the file read by :meth:`served_calibration`

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
        if self.workers > 1 and not self.upstream:
            raise ValueError(
                "--workers needs --upstream: an embedded engine belongs to one process. Scale it with replicas behind "
                "a load balancer, or run vllm serve (--api-server-count N) and thinkbrake --upstream --workers N"
            )
        if self.tokenizer is not None:
            from server.token_texts import tokenizer_file  # (imports tokenizers: only when the flag is given)

            if not tokenizer_file(self.tokenizer).is_file():
                raise ValueError(f"--tokenizer {self.tokenizer}: no tokenizer.json there")
        if self.risk is not None and self.calibration is None:
            raise ValueError("--risk needs --calibration (the file whose levels it chooses among)")
        if self.calibration is not None:
            self.served_calibration()  # a file that cannot be served fails at start, with its reason
        return self

    @property
    def mode(self) -> Literal["embedded", "upstream"]:
        return "upstream" if self.upstream else "embedded"

    def default_policy(self) -> PolicyConfig:
        return parse_policy({"policy": self.policy, **self.policy_args})

    def served_calibration(self) -> ServedCalibration | None:
        """The calibration to serve (None without ``--calibration``), read once (at validation) and kept;
        ValueError naming the file if unusable."""
        if self.calibration is None:
            return None
        if self._served is None or self._served.source != self.calibration or self._served.risk != self.risk:
            try:
                self._served = ServedCalibration.load(self.calibration, self.risk)
            except CalibrationError as error:
                raise ValueError(f"--calibration {self.calibration}: {error}") from None
        return self._served

    def policy_defaults(self, name: str) -> dict[str, Any]:
        """The server's policy arguments that apply to policy ``name`` (all of them if it is the default)."""
        return dict(self.policy_args) if name == self.policy else {}
