"""Probes and the prefix cache across replicas, with real parts: two vLLM OpenAI servers (CPU engine, the tiny test
model, prefix caching on, block size 32) and nginx from Debian in front of them.

Each request forces the scripted reasoning trace through the model (seven "Wait"s) with probe answers that never
count (``{?}``), so the default rule sends an answer probe at every "Wait" and no stop cuts them short. A probe's
prompt is the choice's prompt and thinking so far plus the probe suffix: on the replica that decoded the choice,
every full KV block of it is in the prefix cache; on the other replica nothing is (every configuration asks its own
question, so no prefix is shared between requests). vLLM reports the cached part in the probe's usage
(``--enable-prompt-tokens-details``), and thinkbrake adds it up per choice in ``thinkbrake.probes``:
``cached_tokens``, ``prompt_tokens`` and ``missed_cache`` (probes served under half from the cache).

- nginx round-robin, no affinity: probes reach the other replica, and miss;
- nginx hashing on ``--affinity-header``: every probe is on its choice's replica, every full block cached;
- thinkbrake's own replicas (``--upstream A --upstream B``): the same, and both replicas serve choices.
"""

from __future__ import annotations

import contextlib
import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from controller.probes import WAIT, probe_spec
from tests.support.engine_metrics import metrics_text_value
from tests.support.fixtures import BLOCK_SIZE, openai_server
from tests.support.load_balancer import nginx_balancer
from tests.support.serving import QUESTION, http_json, scripted_body, thinkbrake_server

pytestmark = pytest.mark.engine

HEADER = "X-Thinkbrake-Session"
UPSTREAM_MODEL = "tiny-up"
#: a probe answer that is no final answer (a question mark): it never counts, so every "Wait" gets a probe
UNSURE = "{?}"
REQUESTS = 3


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory) -> Iterator[list[str]]:
    logs = tmp_path_factory.mktemp("fleet")
    extra = (
        "--reasoning-parser",
        "deepseek_r1",
        "--served-model-name",
        UPSTREAM_MODEL,
        "--enable-prompt-tokens-details",
    )
    with contextlib.ExitStack() as stack:
        urls = [
            stack.enter_context(openai_server(tiny_model_dir, *extra, log_path=logs / f"vllm{i}.log")) for i in (0, 1)
        ]
        yield urls


def served(url: str, tokenizer: Any, tag: str, number: int) -> dict[str, Any]:
    """One scripted request with its own question; its choice's ``thinkbrake`` object."""
    body = scripted_body(
        tokenizer, model="tiny-r1", messages=[{"role": "user", "content": f"[{tag} {number}] {QUESTION}"}]
    )
    body["vllm_xargs"]["probe_script"] = tokenizer.encode(UNSURE, add_special_tokens=False)
    status, data = http_json(f"{url}/v1/chat/completions", body, timeout=900)
    assert status == 200, data
    return data["thinkbrake"]


def run(tokenizer: Any, tag: str, *args: str, log: pathlib.Path) -> list[dict[str, Any]]:
    with thinkbrake_server(*args, "--served-model-name", "tiny-r1", log_path=log) as url:
        return [served(url, tokenizer, tag, number)["probes"] for number in range(REQUESTS)]


def uncached_bound(tokenizer: Any) -> int:
    """Prompt tokens of one probe that the replica holding its prefix still computes: the last, partial KV block of
    the prefix, and the probe suffix."""
    return BLOCK_SIZE + len(tokenizer.encode(probe_spec(WAIT).suffix, add_special_tokens=False))


def summary(tag: str, probes: list[dict[str, Any]]) -> tuple[int, int, int]:
    answered = sum(p["answered"] for p in probes)
    missed = sum(p["missed_cache"] for p in probes)
    cached, prompt = sum(p["cached_tokens"] for p in probes), sum(p["prompt_tokens"] for p in probes)
    failed = sum(p["failed"] for p in probes)
    print(
        f"{tag}: {answered} probes ({failed} failed), {missed} missed the cache; {cached} of {prompt} probe prompt tokens cached"
    )
    return answered, missed, prompt - cached


def assert_every_probe_cached(probes: list[dict[str, Any]], bound: int) -> None:
    for choice in probes:
        assert choice["answered"] >= 3 and choice["failed"] == 0, choice
        assert choice["missed_cache"] == 0, choice
        assert choice["prompt_tokens"] - choice["cached_tokens"] <= choice["answered"] * bound, choice


def test_probes_miss_the_cache_behind_round_robin_and_hit_it_with_affinity(replicas, tiny_tokenizer, tmp_path):
    bound = uncached_bound(tiny_tokenizer)

    with nginx_balancer(replicas) as balancer:
        round_robin = run(tiny_tokenizer, "round-robin", "--upstream", balancer, log=tmp_path / "rr.log")
    answered, missed, uncached = summary("nginx round-robin", round_robin)
    assert answered >= 3 * REQUESTS
    assert missed >= 1 and uncached > answered * bound  # a share of the probes was prefilled again

    with nginx_balancer(replicas, hash_header=HEADER) as balancer:
        hashed = run(
            tiny_tokenizer, "hash", "--upstream", balancer, "--affinity-header", HEADER, log=tmp_path / "h.log"
        )
    summary("nginx hash on --affinity-header", hashed)
    assert_every_probe_cached(hashed, bound)

    before = [replica_requests(url) for url in replicas]
    own = run(tiny_tokenizer, "replicas", "--upstream", replicas[0], "--upstream", replicas[1], log=tmp_path / "r.log")
    summary("thinkbrake --upstream A --upstream B", own)
    assert_every_probe_cached(own, bound)
    served_choices = [replica_requests(url) - was for url, was in zip(replicas, before, strict=True)]
    assert all(count >= 1 for count in served_choices), served_choices  # both replicas took choices


def replica_requests(url: str) -> float:
    """Requests a vLLM server finished (main requests, probes and continuations: with thinkbrake's own replicas,
    a replica gets any of them only if a choice was placed on it)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
        return metrics_text_value(response.read().decode(), "vllm:request_success_total")
