"""``thinkbrake demo`` and ``thinkbrake serve MODEL`` on the CPU defaults, as a new user runs them (real engine).

The demo's model and logits processor come from the package (``server.demo.tiny_model``, ``server.demo.scripted_logits``);
the engine's worker imports the processor by its package name.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.fixtures import REPO_ROOT, engine_environment, free_port, stop_process

pytestmark = pytest.mark.engine


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def test_demo_prints_the_stop_and_keeps_serving(tmp_path: Path) -> None:
    """The demo's own request and, while it keeps serving, any OpenAI client's plain request (no thinkbrake field,
    no vllm_xargs) get the scripted trace and are stopped. The cached model is reused, and the demo says so."""
    from server.demo.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "demo-model")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "server.cli", "demo", "--keep-serving", "--port", str(port),
               "--model-dir", str(model_dir)]  # fmt: skip
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while "still serving" not in log.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            text = log.read_text()
            print(text[-800:])
            assert "still serving" in text, text[-3000:]
            assert "stop: reason 'confirmed', answer '42', after 2 solutions" in text
            assert "answer written after the stop: The product of 6 and 7 is **42**. \\boxed{42}" in text
            saved = next(line for line in text.splitlines() if line.startswith("tokens saved: "))
            never, total = int(saved.split()[2]), int(saved.split()[6])
            assert 0 < never < total
            assert "Traceback" not in text
            assert f"using the tiny demo model in {model_dir}" in text and "building" not in text
            assert "Warning" not in text and "Triton" not in text  # vLLM's own log only with --verbose
            base = f"http://127.0.0.1:{port}"
            assert _status(f"{base}/health") == 200
            models = httpx.get(f"{base}/v1/models", timeout=60).json()
            assert [card["id"] for card in models["data"]] == ["tiny-r1"]
            assert_a_plain_client_sees_the_stop(base, never)
        finally:
            stop_process(process)


def assert_a_plain_client_sees_the_stop(base: str, never_decoded: int) -> None:
    """The README's copy-paste calls against ``demo --keep-serving``: the openai client and a bare JSON POST."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    response = client.chat.completions.create(model="tiny-r1", messages=[{"role": "user", "content": "What is 6 * 7?"}])
    info = response.model_extra["thinkbrake"]
    print("openai client:", response.choices[0].message.content, info)
    assert info["stopped"] and info["reason"] == "confirmed" and info["answer"] == "42"
    assert info["policy"] == "fcs_reflection" and info["solutions"] == 2
    assert response.choices[0].message.content.endswith("\\boxed{42}")
    assert response.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="tiny-r1", messages=[{"role": "user", "content": "And 7 * 6?"}], stream=True
    )
    last = [chunk for chunk in streamed][-1]
    assert last.model_extra["thinkbrake"]["stopped"] and last.model_extra["thinkbrake"]["answer"] == "42"
    body = {"model": "tiny-r1", "messages": [{"role": "user", "content": "What is 6 * 7?"}]}
    plain = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).json()
    assert plain["thinkbrake"]["stopped"] and plain["thinkbrake"]["thinking_tokens"] == info["thinking_tokens"]
    assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == info["thinking_tokens"]
    assert never_decoded > 0


def test_serve_starts_on_cpu_defaults_and_says_when_it_is_ready(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No memory flag: the CPU default KV cache. ``/health`` is 503 while loading; the address is printed only
    once the model is loaded, after the "loading" line; uvicorn's early address line is not shown."""
    port = free_port()
    env = {**os.environ, **engine_environment(), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "server.cli", "serve", str(tiny_model_dir), "--port", str(port),
               "--enforce-eager"]  # fmt: skip
    log = tmp_path / "serve.log"
    seen: list[int] = []
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()[-3000:]
                status = _status(f"http://127.0.0.1:{port}/health")
                if status is not None and (not seen or seen[-1] != status):
                    seen.append(status)
                if status == 200:
                    break
                time.sleep(0.05)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1)  # let the ready line reach the log
            text = log.read_text()
            assert seen == [503, 200], (seen, text[-3000:])
            lines = text.splitlines()
            loading = next(i for i, line in enumerate(lines) if f"loading model {tiny_model_dir} ..." in line)
            ready = next(i for i, line in enumerate(lines) if f"ready: serving {tiny_model_dir} at" in line)
            assert loading < ready and f"http://127.0.0.1:{port}/v1" in lines[ready]
            assert "KV cache: " in text and "(CPU default: a quarter of the" in text
            assert "Uvicorn running on" not in text
        finally:
            stop_process(process)
