"""A new user's first run: ``thinkbrake serve`` as a drop-in for ``vllm serve`` (its flags, CPU defaults, quick and
clear failures), ``reasoning_effort`` presets, keep-alive, and the replay table's signs and plot labels.

The engine-free tests run the real CLI in a subprocess; ``test_vllm_flags_*`` import vLLM's parser (no engine);
the engine tests (``thinkbrake demo``, ``thinkbrake serve`` on the CPU default) are in test_demo.py.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.model_source import check_model_source, looks_like_path
from tests.support.fake_upstream import FakeUpstream
from tests.support.fixtures import REPO_ROOT, free_port
from tests.support.servers import thinkbrake_process

IMPORTS_VLLM = (
    "import sys; from server.cli import main; code = main(sys.argv[1:]); print('vllm' in sys.modules); sys.exit(code)"
)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str, str, float]:
    """``thinkbrake ARGS`` in a subprocess; (exit code, stdout, stderr, seconds). stdout's last line says
    whether vLLM was imported."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_VLLM, *args], cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr, time.monotonic() - began


def test_paths_and_repo_ids_are_told_apart() -> None:
    for path in ("/path/to/model", "./model", "../m", "~/models/r1", "models/r1/", "a/b/c", "."):
        assert looks_like_path(path), path
    for repo in ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "gpt2", "Qwen/Qwen3-0.6B"):
        assert not looks_like_path(repo), repo


def test_a_missing_local_path_fails_at_once_without_importing_vllm() -> None:
    code, out, err, seconds = run_cli("serve", "/path/to/a/local/reasoning-model")
    print(f"\nmissing path: exit {code} after {seconds:.2f} s: {err.strip()}")
    assert code == 2
    assert err.strip().splitlines() == [
        "thinkbrake serve: model /path/to/a/local/reasoning-model: no such file or directory; "
        "give the folder that holds config.json and the weights"
    ]
    assert out.strip().splitlines()[-1] == "False"  # decided before vLLM (a 10-20 s import) was loaded
    code, _, err, _ = run_cli("serve", "--port", "8123", "--model", "./no/such/model")
    assert code == 2 and "./no/such/model: no such file or directory" in err


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in Hugging Face hub: ``/api/models/known/model`` exists, everything else is 404."""

    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        type(self).paths.append(self.path)
        status = 200 if self.path == "/api/models/known/model" else 404
        body = json.dumps({"id": "known/model"} if status == 200 else {"error": "not found"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    _Hub.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_hub_fails_after_one_attempt(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""}
    code, out, err, seconds = run_cli("serve", env=env)  # the default model, a hub id
    print(f"\nno hub: exit {code} after {seconds:.2f} s: {err.strip()}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"the Hugging Face hub ({endpoint}) cannot be reached" in err
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in err and "local model folder" in err
    assert out.strip().splitlines()[-1] == "False"
    code, _, err, _ = run_cli("serve", "some/model", env={**env, "HF_HUB_OFFLINE": "1"})
    assert code == 2 and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err


def test_the_hub_is_asked_once(hub: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert check_model_source("known/model") is None
    reason = check_model_source("unknown/model")
    assert reason is not None and "has no model 'unknown/model'" in reason
    assert _Hub.paths == ["/api/models/known/model", "/api/models/unknown/model"]


def test_a_cached_model_is_used_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hub id in the local cache starts with no hub reachable: the engine is told to stay offline."""
    snapshot = tmp_path / "hub" / "models--cached--model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--cached--model" / "refs").mkdir()
    (tmp_path / "hub" / "models--cached--model" / "refs" / "main").write_text("abc")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert check_model_source("cached/model") is None
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --- vLLM's own flags ----------------------------------------------------------------------------------------


def parse_serve(*argv: str) -> Any:
    from server.engine_config import unset_namespace
    from server.serve_cli import build_parser, load_settings

    parser, dests = build_parser(engine=True)
    return load_settings(parser.parse_args(list(argv), unset_namespace(dests)), dests)


def test_vllm_flags_mean_what_they_mean_in_vllm_serve(tmp_path: Path) -> None:
    """The engine arguments thinkbrake builds equal those ``vllm serve`` builds from the same flags."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from server.engine import EmbeddedBackend

    flags = [
        "--gpu-memory-utilization", "0.3", "--max-model-len", "4k", "--tensor-parallel-size", "1",
        "--kv-cache-memory-bytes", "1G", "--no-enable-prefix-caching", "--reasoning-parser", "deepseek_r1",
        "--max-num-seqs", "4", "--enforce-eager", "--served-model-name", "r1", "--logits-processors", "a.b:C",
        "--block-size", "32", "--dtype", "bfloat16",
    ]  # fmt: skip
    settings = parse_serve(str(tmp_path), *flags, "--policy", "consistency", "--policy-arg", "k=2")
    assert settings.model == str(tmp_path) and settings.policy == "consistency"
    assert settings.max_model_len == 4000 and settings.kv_cache_bytes == 1 << 30 and settings.served_model_name == "r1"
    ours = EmbeddedBackend(settings).engine_kwargs()
    vllm_args = make_arg_parser(FlexibleArgumentParser()).parse_args([str(tmp_path), *flags])
    vllm_args.model = vllm_args.model_tag
    theirs = AsyncEngineArgs.from_cli_args(vllm_args)
    names = ["gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "kv_cache_memory_bytes",
             "enable_prefix_caching", "reasoning_parser", "max_num_seqs", "enforce_eager", "logits_processors",
             "block_size", "dtype", "model"]  # fmt: skip
    assert {name: ours[name] for name in names} == {name: getattr(theirs, name) for name in names}
    assert ours["served_model_name"] == "r1" and theirs.served_model_name == ["r1"]
    AsyncEngineArgs(**ours)  # a valid set of engine arguments


def test_thinkbrake_defaults_and_variables_with_vllm_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engine import EmbeddedBackend

    monkeypatch.setenv("THINKBRAKE_MAX_MODEL_LEN", "2048")
    monkeypatch.setenv("THINKBRAKE_LOGITS_PROCESSORS", "x.y:Z")
    settings = parse_serve("--model", str(tmp_path), "--kv-cache-bytes", "64M", "--log-level", "DEBUG")
    kwargs = EmbeddedBackend(settings).engine_kwargs()
    assert kwargs["max_model_len"] == 2048 and kwargs["logits_processors"] == ["x.y:Z"]
    assert kwargs["kv_cache_memory_bytes"] == 64 << 20 and settings.log_level == "debug"
    assert kwargs["enable_prefix_caching"] is True and settings.engine_args == {}
    assert parse_serve(str(tmp_path), "--max-model-len", "1024").max_model_len == 1024  # a flag wins


def test_cpu_default_kv_cache_and_context(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.engine_config import GiB, cpu_default_kv_bytes, cpu_kv_cache_bytes, fit_context, kv_bytes_per_token

    assert cpu_kv_cache_bytes(8 * GiB) == 2 * GiB and cpu_kv_cache_bytes(64 * GiB) == 4 * GiB
    assert cpu_kv_cache_bytes(10 << 20) == 64 << 20
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert cpu_default_kv_bytes({"model": "m"}) is not None  # this machine's platform is CPU
    assert cpu_default_kv_bytes({"model": "m", "gpu_memory_utilization": 0.5}) is None
    assert cpu_default_kv_bytes({"model": "m", "kv_cache_memory_bytes": 1 << 30}) is None
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert cpu_default_kv_bytes({"model": "m"}) is None
    config = AsyncEngineArgs(model=str(tiny_model_dir), enforce_eager=True).create_engine_config()
    per_token = kv_bytes_per_token(config)
    assert per_token == 2 * 2 * 2 * 32 * 2  # layers x (key, value) x kv heads x head_dim x bf16
    assert fit_context(64 << 20, config) is None  # 4096 tokens fit in 64 MiB
    assert fit_context(per_token * 2500, config) == 2048  # the model's 4096 do not: a multiple of 1024 that fits


def test_too_much_memory_is_one_clear_line(tiny_model_dir: Path) -> None:
    code, out, err, seconds = run_cli(
        "serve", str(tiny_model_dir), "--gpu-memory-utilization", "0.99", "--port", str(free_port()), timeout=300
    )
    lines = err.strip().splitlines()
    print(f"\nexit {code} after {seconds:.1f} s: {lines[-1]}")
    assert code == 1
    assert lines[-1].startswith("thinkbrake serve: not enough free memory")
    assert "lower --gpu-memory-utilization" in lines[-1] and "--kv-cache-memory-bytes" in lines[-1]
    assert "Traceback" not in err


def test_serve_help_lists_thinkbrake_and_vllm_flags() -> None:
    code, out, _, _ = run_cli("serve", "--help")
    assert code == 0
    for flag in ("--upstream", "--policy", "--keep-alive-timeout", "--kv-cache-bytes", "CacheConfig", "--help=all"):
        assert flag in out, flag
    code, out, _, _ = run_cli("serve", "--help=gpu-memory")
    assert code == 0 and "--gpu-memory-utilization" in out


# --- reasoning_effort -----------------------------------------------------------------------------------------


def test_reasoning_effort_presets_and_the_explicit_object_wins() -> None:
    from pydantic import ValidationError

    from server.protocol import REASONING_EFFORT_PRESETS, ChatCompletionRequest, parse_control
    from server.settings import Settings

    def control(**fields: Any) -> Any:
        request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)
        return parse_control(request.thinkbrake, Settings(upstream="http://u"), 0.5).policy

    assert control().name == "probe_fcs"
    low = control(reasoning_effort="low")
    assert low.name == "fcs_reflection" and low.max_thinking_tokens == 2048
    assert control(reasoning_effort="medium") == control()
    assert control(reasoning_effort="high").name == "off"
    assert control(reasoning_effort="high", thinkbrake={"policy": "consistency"}).name == "consistency"
    merged = control(reasoning_effort="low", thinkbrake={"max_thinking_tokens": 4096})
    assert merged.name == "fcs_reflection" and merged.max_thinking_tokens == 4096
    assert set(REASONING_EFFORT_PRESETS) == {"low", "medium", "high"}
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], reasoning_effort="extreme")


def test_reasoning_effort_over_http() -> None:
    import httpx

    with FakeUpstream() as upstream, thinkbrake_process(upstream.url) as (url, _):
        body = {"model": "fake-reasoner", "messages": [{"role": "user", "content": "q"}], "fake_trace": 0}
        infos = {}
        for effort in ("low", "high"):
            response = httpx.post(f"{url}/v1/chat/completions", json={**body, "reasoning_effort": effort}, timeout=30)
            assert response.status_code == 200, response.text
            infos[effort] = response.json()["thinkbrake"]
        assert infos["low"]["policy"] == "fcs_reflection" and infos["low"]["stopped"]
        assert infos["high"]["policy"] == "off" and not infos["high"]["stopped"]
        assert all(r.body.get("reasoning_effort") in ("low", "high") for r in upstream.generation_requests()[:1])
        bad = httpx.post(f"{url}/v1/chat/completions", json={**body, "reasoning_effort": "extreme"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"


# --- connections under load -----------------------------------------------------------------------------------


def _request(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head


def test_not_ready_is_a_503_with_retry_after() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    import httpx

    with thinkbrake_process(nowhere, wait=False) as (url, process):
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        deadline = time.monotonic() + 120
        while True:
            try:
                response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "upstream_unavailable" and nowhere.removeprefix("http://") in error["message"]


def test_an_idle_connection_outlives_the_clients_keep_alive() -> None:
    """httpx (the openai client) keeps an idle connection 5 s; the server must keep it longer, or a client may
    send its next request just as the server closes the connection: a reset (``httpcore.ReadError``)."""
    with FakeUpstream() as upstream, thinkbrake_process(upstream.url) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert _request(sock, "/health").startswith(b"HTTP/1.1 200")
            time.sleep(6.5)
            assert _request(sock, "/v1/models").startswith(b"HTTP/1.1 200")


# --- replay table and plot ------------------------------------------------------------------------------------


def _report() -> dict[str, Any]:
    from controller.offline.report import COLUMNS

    row: dict[str, Any] = {key: 1.0 for key, _ in COLUMNS}
    row["reasons"] = {}
    deltas = {"a": 0.19, "b": -49.25, "c": 0.0}
    policies = {name: {**row, "policy": name, "acc_delta": delta} for name, delta in deltas.items()}
    return {"policies": list(policies), "groups": {"ALL": policies}}


def test_replay_table_signs_the_difference() -> None:
    from controller.offline.report import COLUMNS, markdown_table

    column = [key for key, _ in COLUMNS].index("acc_delta")
    rows = markdown_table(_report()).splitlines()[2:]
    assert [row.strip("| ").split(" | ")[column] for row in rows] == ["+0.19", "-49.25", "0.0"]


def test_replay_plot_names_each_policy_in_a_legend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Policies close together on the plot used to get overlapping text labels; a legend cannot overlap."""
    import matplotlib.figure

    from controller.offline.report import plot

    figures: list[Any] = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))
    )
    plot(_report(), str(tmp_path / "plot.png"))
    axes = figures[0].axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["a", "b", "c", "full-trace accuracy"]
    assert not axes.texts  # no free-floating labels
