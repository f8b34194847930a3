"""``thinkbrake serve``: run the OpenAI-compatible server on an embedded vLLM engine or in front of an upstream."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from controller.policies import POLICIES

SETTING_FLAGS = (
    "model", "upstream", "host", "port", "policy", "policy_args", "delimiters", "finalize", "max_answer_tokens",
    "shadow_rate", "served_model_name", "upstream_api_key", "request_timeout", "max_model_len", "kv_cache_bytes",
    "logits_processors", "enforce_eager", "log_level", "upstream_max_connections", "api_keys", "api_key_file",
    "protect_health", "protect_metrics", "max_body_bytes",
)  # fmt: skip

DESCRIPTION = """\
Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) that
streams the model's thinking through the thinkbrake controller. When the controller sees an answer reached
and confirmed, it aborts decoding, closes the thinking and lets the model write its final answer
(a continuation from the same token ids, so the prefix cache is reused).

Two modes:
  thinkbrake serve --model NAME_OR_PATH     embedded vLLM engine (default; prefix caching on)
  thinkbrake serve --upstream URL           proxy in front of an OpenAI-compatible server (e.g. vllm serve)

Every flag can also be set by an environment variable THINKBRAKE_<FLAG> (e.g. THINKBRAKE_MODEL,
THINKBRAKE_POLICY_ARGS="k=3,min_thinking_tokens=100"); a flag wins over the variable.
Per request, clients override the policy with a "thinkbrake" object in the body, e.g.
  {"thinkbrake": {"policy": "consistency", "k": 3, "finalize": "answer", "max_answer_tokens": 512}}
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server that stops overthinking",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    backend = parser.add_argument_group("backend (choose one)")
    backend.add_argument(
        "--model",
        help="model id or local folder for the embedded vLLM engine (default: "
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B; offline, pass a local folder)",
    )
    backend.add_argument("--upstream", metavar="URL", help="base URL of an OpenAI-compatible server to proxy")
    backend.add_argument(
        "--upstream-api-key",
        help="bearer token thinkbrake sends to the upstream; never taken from or shown to clients "
        "(prefer env THINKBRAKE_UPSTREAM_API_KEY: flags show in the process list)",
    )
    backend.add_argument(
        "--request-timeout", type=float,
        help="seconds the upstream may stay silent (connect, first byte, between chunks) before the request fails "
        "with an error for the client (default 600)",
    )  # fmt: skip
    backend.add_argument(
        "--upstream-max-connections", type=int, metavar="N",
        help="concurrent streams to the upstream; more requests wait for a free connection (default 1024)",
    )  # fmt: skip

    policy = parser.add_argument_group("stopping")
    policy.add_argument("--policy", choices=sorted(POLICIES), help="default stop policy (default probe_fcs)")
    policy.add_argument(
        "--policy-arg", dest="policy_args", action="append", metavar="K=V",
        help="argument of the default policy, repeatable: k=3, min_thinking_tokens=100, max_thinking_tokens=8000",
    )  # fmt: skip
    policy.add_argument(
        "--delimiters", choices=["auto", "think", "think-implicit", "sky-t1"],
        help="thinking tags; auto (default) infers them from the chat template (upstream: think-implicit)",
    )  # fmt: skip
    policy.add_argument(
        "--finalize", choices=["model", "answer", "none"],
        help="after a stop: the model writes its answer (default), a boxed answer is written, or nothing",
    )  # fmt: skip
    policy.add_argument("--max-answer-tokens", type=int, help="token limit of the answer after a stop (default 1024)")
    policy.add_argument(
        "--shadow-rate", type=float, metavar="R",
        help="fraction of requests run in shadow mode: the stop is recorded in metrics but not acted on",
    )  # fmt: skip

    server = parser.add_argument_group("server")
    server.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, help="port (default 8000)")
    server.add_argument("--served-model-name", help="model name clients use (default: the model / upstream's)")
    server.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")

    access = parser.add_argument_group("access and limits")
    access.add_argument(
        "--api-key", dest="api_keys", action="append", metavar="KEY",
        help="accept clients sending 'Authorization: Bearer KEY'; repeatable (env: THINKBRAKE_API_KEYS=k1,k2). "
        "Without any key the API is open",
    )  # fmt: skip
    access.add_argument("--api-key-file", metavar="PATH", help="more keys, one per line ('#' comments allowed)")
    access.add_argument("--protect-health", action="store_true", help="/health needs a key too (default open)")
    access.add_argument("--protect-metrics", action="store_true", help="/metrics needs a key too (default open)")
    access.add_argument(
        "--max-body-bytes", type=int, metavar="N",
        help="larger request bodies get 413 (default 4194304 = 4 MiB)",
    )  # fmt: skip

    engine = parser.add_argument_group("embedded engine")
    engine.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    engine.add_argument("--kv-cache-bytes", type=int, help="KV cache size in bytes (small values for tests)")
    engine.add_argument(
        "--logits-processors", action="append", metavar="MODULE:CLASS",
        help="vLLM v1 logits processor to load, repeatable (enabled per request through vllm_xargs)",
    )  # fmt: skip
    engine.add_argument("--enforce-eager", action="store_true", help="skip graph compilation (faster start)")
    parser.set_defaults(run=run)


def load_settings(args: argparse.Namespace) -> Any:
    from server.settings import Settings

    overrides = {name: getattr(args, name) for name in SETTING_FLAGS if hasattr(args, name)}
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server.app import build_app

    try:
        settings = load_settings(args)
    except ValidationError as error:
        messages = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        print(f"thinkbrake serve: {messages}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.upstream:
        from server.upstream import UpstreamBackend

        backend: Any = UpstreamBackend(settings)
    else:
        from server.engine import EmbeddedBackend

        backend = EmbeddedBackend(settings)
    failures: list[BaseException] = []
    servers: list[uvicorn.Server] = []

    def stop(error: BaseException) -> None:
        failures.append(error)
        for server in servers:
            server.should_exit = True

    app = build_app(settings, backend, on_startup_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level))
    servers.append(server)
    server.run()
    if failures:
        print(f"thinkbrake serve: {failures[0]}", file=sys.stderr)
        return 1
    return 0
