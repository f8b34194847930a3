"""Pytest fixtures and helpers for tests that drive a real vLLM engine.

Import the fixtures into ``tests/conftest.py`` (``from tests.support.fixtures
import tiny_model_dir, tiny_tokenizer, tiny_engine``). ``tests`` must be
importable: run pytest as ``python -m pytest`` from the repository root, or set
``pythonpath = ["."]`` in the pytest configuration.

Invariants:

* ``tiny_model_dir`` is built once per cache directory (``$THINKBRAKE_TEST_CACHE``
  or ``~/.cache/thinkbrake-tests``) and reused across sessions; see
  :mod:`server.demo.tiny_model`.
* Engines are started with :func:`engine_environment` applied (single-process
  executor, V1 model runner, so the v1 :class:`ScriptedLogitsProcessor` loads)
  and the environment is restored when the fixture ends.
* ``tiny_engine`` is module-scoped and lives on the module's event loop, so
  tests using it must run with ``@pytest.mark.asyncio(loop_scope="module")``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from server.demo.tiny_model import RECIPE, THINK_END, build_tiny_model, token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

CACHE_ENV = "THINKBRAKE_TEST_CACHE"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTED_PROCESSOR_FQCN = "server.demo.scripted_logits:ScriptedLogitsProcessor"
#: vLLM's CPU attention accepts only multiples of 32 (16 fails at engine start).
BLOCK_SIZE = 32
KV_CACHE_BYTES = 64 << 20
MAX_MODEL_LEN = 2048
CPU_BLOCK_SIZE = 128  # vLLM's CPU default, for engines started without a block size; only full blocks are cached


def cache_root() -> pathlib.Path:
    """Directory for cached test artefacts (``$THINKBRAKE_TEST_CACHE`` wins)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return pathlib.Path(configured)
    return pathlib.Path.home() / ".cache" / "thinkbrake-tests"


def engine_environment() -> dict[str, str]:
    """Environment a test engine needs; applied before the engine is built.

    * ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no separate worker process (the
      AsyncLLM engine core still runs in one spawned child process).
    * ``VLLM_USE_V2_MODEL_RUNNER=0``: the v1 logits-processor interface (the CPU
      build picks the V1 runner anyway; this keeps GPU machines consistent).
    """
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_V2_MODEL_RUNNER": "0"}


@pytest.fixture(scope="session")
def tiny_model_dir() -> pathlib.Path:
    """Path of the tiny scripted-test chat model (built on first use, then cached)."""
    return build_tiny_model(cache_root() / RECIPE)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: pathlib.Path) -> PreTrainedTokenizerBase:
    """The tiny model's ``transformers`` tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def think_end_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The single token id of ``</think>``."""
    return token_id(tokenizer, THINK_END)


def script_ids(tokenizer: PreTrainedTokenizerBase, thinking: str, answer: str) -> list[int]:
    """Token ids of a full scripted output: ``thinking``, ``</think>``, ``answer``, eos.

    ``tokenizer.decode(ids[:-1]) == thinking + "</think>" + answer`` for the tiny
    tokenizer (byte-level, lossless for NFC text).
    """
    return [
        *tokenizer.encode(thinking, add_special_tokens=False),
        think_end_id(tokenizer),
        *tokenizer.encode(answer, add_special_tokens=False),
        token_id(tokenizer, str(tokenizer.eos_token)),
    ]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of a one-turn chat prompt ending in ``<|im_start|>assistant\\n<think>\\n``."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer.encode(str(rendered), add_special_tokens=False))


def scripted_extra_args(tokenizer: PreTrainedTokenizerBase, script: list[int]) -> dict[str, Any]:
    """``SamplingParams.extra_args`` (HTTP: ``vllm_xargs``) that turn the script on."""
    return {"script": list(script), "think_end_id": think_end_id(tokenizer)}


def tiny_engine_args(model_dir: pathlib.Path, **overrides: Any) -> AsyncEngineArgs:
    """``AsyncEngineArgs`` for a small, fast CPU test engine with the scripted processor.

    Defaults: prefix caching on, block size 32, 64 MiB KV cache, eager mode
    (skips torch.compile: ~7 s start instead of ~13 s warm / ~37 s cold), stats
    on (so ``vllm:`` Prometheus counters exist), seed 0.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.demo.scripted_logits import ScriptedLogitsProcessor

    settings: dict[str, Any] = {
        "model": str(model_dir),
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": 8,
        "enable_prefix_caching": True,
        "block_size": BLOCK_SIZE,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "enforce_eager": True,
        "disable_log_stats": False,
        "seed": 0,
        "logits_processors": [ScriptedLogitsProcessor],
    }
    settings.update(overrides)
    return AsyncEngineArgs(**settings)


@contextlib.contextmanager
def patched_environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield


@contextlib.asynccontextmanager
async def running_engine(model_dir: pathlib.Path, **overrides: Any) -> AsyncIterator[AsyncLLM]:
    """Start an ``AsyncLLM`` on the current event loop; shut it down on exit."""
    from vllm.v1.engine.async_llm import AsyncLLM

    with patched_environment(engine_environment()):
        engine = AsyncLLM.from_engine_args(tiny_engine_args(model_dir, **overrides))
        try:
            yield engine
        finally:
            engine.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny_engine(tiny_model_dir: pathlib.Path) -> AsyncIterator[AsyncLLM]:
    """A running in-process ``AsyncLLM`` on the tiny model, shared by one module."""
    async with running_engine(tiny_model_dir) as engine:
        yield engine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(model_dir: pathlib.Path, port: int, *extra: str) -> list[str]:
    """Command line of vLLM's OpenAI server on the tiny model with the scripted processor."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--logits-processors", SCRIPTED_PROCESSOR_FQCN,
        "--enforce-eager",
        "--enable-prefix-caching",
        "--block-size", str(BLOCK_SIZE),
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--max-model-len", str(MAX_MODEL_LEN),
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def openai_server(
    model_dir: pathlib.Path, *extra: str, timeout: float = 600.0, log_path: pathlib.Path | None = None
) -> Iterator[str]:
    """Run vLLM's OpenAI server (cwd = repo root) and yield its base URL.

    Waits for ``/health``; terminates the process (and only it) on exit. Its
    output goes to ``log_path`` (default: discarded).
    """
    port = free_port()
    with server_process(server_command(model_dir, port, *extra), engine_environment(), log_path) as process:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url, timeout, process, poll=0.5, name="vLLM server")
        yield base_url


@contextlib.contextmanager
def server_process(
    command: list[str], env: dict[str, str], log_path: pathlib.Path | None = None, stop_timeout: float = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` with cwd and ``PYTHONPATH`` the repository root and ``env`` over the environment, its output
    to ``log_path`` (default: discarded); terminate it (and only it) on exit, killing it after ``stop_timeout``."""
    environment = {**os.environ, **env}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path or os.devnull, "wb"))
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(stop_process, process, stop_timeout)
        yield process


def wait_healthy(
    base_url: str, timeout: float = 120.0, process: subprocess.Popen[bytes] | None = None,
    log: pathlib.Path | None = None, poll: float = 0.05, name: str = "thinkbrake",
) -> None:  # fmt: skip
    """Block until ``GET /health`` answers 200 (or any status but 503: a server that protects ``/health`` answers
    401). Raises if ``process`` exits first (with the tail of its ``log``, if given) or after ``timeout`` seconds;
    the long default deadline only matters on a slow, loaded machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{name} exited with code {process.returncode}\n{tail}".rstrip())
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            if error.code != 503:
                return
        except OSError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"{name} at {base_url} not healthy after {timeout} s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Terminate ``process`` (and only it), killing it if it does not exit within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
