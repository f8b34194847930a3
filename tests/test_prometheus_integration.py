"""A real Prometheus scrapes a real ``thinkbrake serve`` after it served stopped, natural, shadow, length and
error requests; then EVERY PromQL expression of the Grafana dashboard is evaluated through Prometheus' HTTP API
and must return data (finite values).

Two scrape targets, told apart by their ``model`` label (the dashboard's ``$model``):

* ``fake-reasoner``: ``thinkbrake serve --upstream`` as a subprocess, in front of the fake OpenAI-compatible
  upstream of ``tests/support/fake_upstream.py`` (written R1/Qwen3/QwQ traces, no model). Real HTTP requests go
  through the real controller, routes and ``/metrics``; the totals in Prometheus must equal what the responses
  reported.
* ``qwen3``: :class:`server.metrics.Metrics` alone on a small FastAPI app, fed hand-made RequestRecords whose
  dashboard numbers are known exactly (agreement 75%, 750 tokens saved per would-be stop, 1 error in 9).

* ``tiny-r1``: ``thinkbrake serve --model`` with a real embedded vLLM engine (the tiny scripted test model), which
  puts vLLM's own ``vllm:`` metrics on the same ``/metrics``; the dashboard's two engine panels are evaluated on it.

Prometheus comes from the Debian package ``prometheus`` (``.ci/install-prometheus.sh``); without it the test is
skipped outside CI and fails in CI (``CI=true``). Run with ``-s`` to see the evaluated expressions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry

from server.metrics import PRIOR_STOP_RATIO, PRIOR_WEIGHT_TOKENS, Metrics, RequestRecord
from tests.support.fake_upstream import FakeUpstream
from tests.support.fixtures import KV_CACHE_BYTES, MAX_MODEL_LEN, SCRIPTED_PROCESSOR_FQCN, free_port, stop_process
from tests.support.serving import scripted_body, thinkbrake_server
from tests.test_deploy_files import dashboard
from tests.test_metrics import ERROR, MODEL, NATURAL, SHADOW, STOPPED

pytestmark = [pytest.mark.prometheus, pytest.mark.engine]

ROOT = Path(__file__).resolve().parent.parent
SERVED_MODEL = "fake-reasoner"
#: Grafana variables and their values for the evaluation: every policy; the windows (``$__rate_interval``,
#: ``$__range``) are not fixed but run from just before the second traffic to the query (``Prometheus.window``):
#: a fixed 1m window would lose the second traffic's increase on a machine slow enough that sending it (the
#: embedded engine's request included) and the queries take more than a minute.
SUBSTITUTIONS = {"$policy": ".*"}
WINDOWS = ("$__rate_interval", "$__range")
#: a guard against a hang, not a speed requirement: each wait ends as soon as its condition holds
TIMEOUT = 600.0

#: Chat requests to the real server, one of each kind (the fake upstream's traces 0-2 are math, 3+ are not).
REAL_TRAFFIC: list[dict[str, Any]] = [
    {"fake_trace": 0, "thinkbrake": {"policy": "fcs_reflection"}},  # stopped by fcs_reflection ("confirmed")
    # the default probe_fcs: sends answer probes (stops wherever its probes answer); paced, so they come back while
    # it streams (unpaced, the trace can end first and its probes are cancelled unanswered)
    {"fake_trace": 0, "fake_token_rate": 100},
    {"fake_trace": 2, "thinkbrake": {"policy": "first_answer"}},  # stopped at the first answer
    {"fake_trace": 3},  # natural: thinking without answers
    # shadow: runs on, records where it would have stopped (the text rule: at a fixed point)
    {"fake_trace": 1, "thinkbrake": {"policy": "fcs_reflection", "shadow": True}},
    {"fake_trace": 0, "thinkbrake": {"policy": "fcs_reflection", "shadow": True}, "stream": True},  # streamed
    {"fake_trace": 4, "max_tokens": 20},  # length
    {"fake_trace": 0, "fake_fault": "status:503"},  # error: the upstream fails
]

#: Records for the metrics-only target: before Prometheus' first scrape, one of each kind.
FIRST_BATCH: list[RequestRecord] = [NATURAL, STOPPED, SHADOW, ERROR]
#: After the first scrapes, so rates see it: 2 natural, 2 stopped, 4 shadow (3 agree), 1 error.
SECOND_BATCH: list[RequestRecord] = [
    NATURAL,
    dataclasses.replace(NATURAL, solutions=1, thinking_tokens=3000),
    STOPPED,
    dataclasses.replace(STOPPED, reason="consistent", stop_position_tokens=700, thinking_tokens=700),
    SHADOW,
    SHADOW,
    SHADOW,
    dataclasses.replace(SHADOW, shadow_agree=False),
    ERROR,
]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- the real server ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class RealServer:
    url: str
    client: httpx.Client
    #: the ``thinkbrake`` object of every successful response
    infos: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: int = 0

    def send(self, requests: list[dict[str, Any]]) -> None:
        for fields in requests:
            body = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Solve it."}], **fields}
            response = self.client.post(f"{self.url}/v1/chat/completions", json=body)
            if response.status_code != 200:
                self.errors += 1
            elif fields.get("stream"):
                self.infos.append(streamed_info(response.text))
            else:
                payload = response.json()
                self.infos.append(payload["choices"][0].get("thinkbrake") or payload["thinkbrake"])


def streamed_info(text: str) -> dict[str, Any]:
    """The ``thinkbrake`` object of a streamed response (it rides on the last chunk that has one)."""
    import json

    infos = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line.removeprefix("data: "))
            for holder in (chunk, *chunk.get("choices", [])):
                if "thinkbrake" in holder:
                    infos.append(holder["thinkbrake"])
    assert infos, f"no thinkbrake object in the stream:\n{text[-2000:]}"
    info: dict[str, Any] = infos[-1]
    return info


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """``thinkbrake serve --upstream`` (the real CLI, in a subprocess) in front of the fake upstream."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(FakeUpstream(model=SERVED_MODEL, record=False))
        output = stack.enter_context(log.open("wb"))
        process = subprocess.Popen(
            [*command, "--upstream", upstream.url], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        stack.callback(stop_process, process)
        client = stack.enter_context(httpx.Client(timeout=30))
        server = RealServer(f"http://127.0.0.1:{port}", client)

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"thinkbrake serve exited {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                return client.get(f"{server.url}/health").status_code == 200
            return False

        wait_for(healthy, "thinkbrake serve to be healthy")
        yield server


# --- the embedded engine -------------------------------------------------------------------------------------

ENGINE_MODEL = "tiny-r1"


@dataclasses.dataclass
class EngineServer:
    url: str
    body: dict[str, Any]

    def send(self) -> None:
        # a guard against a hang, not a speed goal: the scripted request takes seconds, far more on a loaded machine
        response = httpx.post(f"{self.url}/v1/chat/completions", json=self.body, timeout=600)
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def engine_server(
    tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineServer]:
    """``thinkbrake serve --model`` on the tiny scripted model: a real engine with real ``vllm:`` metrics."""
    log = tmp_path_factory.mktemp("engine") / "serve.log"
    args = [
        "--model", str(tiny_model_dir), "--served-model-name", ENGINE_MODEL, "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-bytes", str(KV_CACHE_BYTES), "--enforce-eager", "--logits-processors", SCRIPTED_PROCESSOR_FQCN,
    ]  # fmt: skip
    with thinkbrake_server(*args, log_path=log) as url:
        yield EngineServer(url, {"model": ENGINE_MODEL, **scripted_body(tiny_tokenizer)})


# --- the metrics-only target --------------------------------------------------------------------------------


def metrics_app(metrics: Metrics) -> FastAPI:
    """The service's /metrics endpoint, exactly as the server renders it."""
    app = FastAPI()

    @app.get("/metrics")
    def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, headers={"Content-Type": content_type})

    return app


def send_records(metrics: Metrics, records: list[RequestRecord]) -> None:
    for record in records:
        metrics.observe_request(record)
        metrics.observe_controller(0.0004, 40, record.model, record.policy)
    metrics.count_controller_error(NATURAL.model, NATURAL.policy)


@pytest.fixture(scope="module")
def records_server() -> Iterator[tuple[Metrics, str]]:
    """A fresh Metrics on its own app (uvicorn in a thread, loopback); yields it and its host:port."""
    metrics = Metrics(CollectorRegistry())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(metrics_app(metrics), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "uvicorn to start")
        yield metrics, f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# --- Prometheus ---------------------------------------------------------------------------------------------


class Prometheus:
    """A real Prometheus process scraping its targets every second; query helpers over its HTTP API."""

    def __init__(self, binary: str, targets: dict[str, str], workdir: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api/v1"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        command = [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(timeout=60)
        self.since: float | None = None  # wall-clock start of the evaluation windows (set before the second traffic)
        #: the records target's scrapes the exact ratios are read between: its last one before the second batch,
        #: and its first one that holds all of it (Prometheus timestamps, in seconds)
        self.records_scrapes: tuple[float, float] | None = None

    def window(self) -> str:
        """The evaluation window: from :attr:`since` (2 s earlier, for the time between building a query and
        evaluating it) to now, in whole seconds; at least 2 flat scrapes come before the second traffic."""
        assert self.since is not None, "the evaluation window starts before the second traffic"
        return f"{math.ceil(time.time() - self.since) + 2}s"

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited {self.process.returncode}:\n{self.log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            return self.client.get(f"http://127.0.0.1:{self.port}/-/ready").status_code == 200
        return False

    def exact_window(self) -> tuple[str, float]:
        """A window and an evaluation time that put the records target's two scrapes (:attr:`records_scrapes`) at
        the window's ends: ``rate`` then has nothing to extrapolate (one millisecond at the start, where a range
        is open), so its ratios are the ratios of the increases, whenever the queries run."""
        assert self.records_scrapes is not None
        first, last = self.records_scrapes
        return f"{round((last - first) * 1000) + 1}ms", last

    def last_scrape(self, selector: str) -> float:
        """The timestamp of the latest sample of the series ``selector`` selects."""
        at = self.scalar(f"max(timestamp({selector}))")
        assert at is not None, selector
        return at

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        payload = self.client.get(f"{self.api}/query", params=params).json()
        assert payload["status"] == "success", f"{expr}: {payload}"
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, metric: str) -> list[str]:
        response = self.client.get(f"{self.api}/label/{label}/values", params={"match[]": metric})
        values: list[str] = response.json()["data"]
        return values

    def stop(self) -> None:
        self.client.close()
        stop_process(self.process)


@pytest.fixture(scope="module")
def scraped(
    real_server: RealServer,
    records_server: tuple[Metrics, str],
    engine_server: EngineServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    """Prometheus after it scraped the first traffic a few times, then the second traffic once.

    A few flat scrapes first keep ``rate``'s extrapolation towards a counter's zero point out of the window, so
    ratios of rates over the second traffic equal ratios of its increases.
    """
    # .ci/install-prometheus.sh links it into the environment's bin folder (.venv/bin), which may not be on PATH
    binary = shutil.which("prometheus", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if binary is None:
        message = "prometheus not found: install it with .ci/install-prometheus.sh (Debian package prometheus)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    metrics, records_target = records_server
    real_server.send(REAL_TRAFFIC)
    send_records(metrics, FIRST_BATCH)
    engine_server.send()
    targets = {
        "thinkbrake": real_server.url.removeprefix("http://"),
        "records": records_target,
        "engine": engine_server.url.removeprefix("http://"),
    }
    prometheus = Prometheus(binary, targets, tmp_path_factory.mktemp("prometheus"))
    try:
        wait_for(prometheus.ready, "prometheus to be ready")
        wait_for(lambda: requests_seen(prometheus) == (len(REAL_TRAFFIC), len(FIRST_BATCH)), "the first scrape")
        samples = 'min(count_over_time(thinkbrake_requests_total{outcome="natural"}[1m]))'
        wait_for(lambda: (prometheus.scalar(samples) or 0) >= 5, "five scrapes")
        prometheus.since = time.time()  # the windows start here: flat scrapes, then the second traffic
        flat = 'min(count_over_time(thinkbrake_requests_total{{outcome="natural"}}[{}]))'
        wait_for(lambda: (prometheus.scalar(flat.format(prometheus.window())) or 0) >= 2, "two scrapes in the window")
        records = f'thinkbrake_requests_total{{model="{MODEL}"}}'
        flat_scrape = prometheus.last_scrape(records)
        real_server.send(REAL_TRAFFIC)
        send_records(metrics, SECOND_BATCH)
        engine_server.send()
        expected = (2 * len(REAL_TRAFFIC), len(FIRST_BATCH) + len(SECOND_BATCH))
        wait_for(lambda: requests_seen(prometheus) == expected, "a scrape of the second traffic")
        prometheus.records_scrapes = (flat_scrape, prometheus.last_scrape(records))
        yield prometheus
    finally:
        prometheus.stop()


def requests_seen(prometheus: Prometheus) -> tuple[float | None, float | None]:
    return tuple(  # type: ignore[return-value]
        prometheus.scalar(f'sum(thinkbrake_requests_total{{model="{model}"}})') for model in (SERVED_MODEL, MODEL)
    )


def substitute(expr: str, model: str, window: str) -> str:
    for variable, value in {**SUBSTITUTIONS, **dict.fromkeys(WINDOWS, window), "$model": model}.items():
        expr = expr.replace(variable, value)
    return expr


def panel_queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


# --- tests --------------------------------------------------------------------------------------------------


def test_every_dashboard_query_returns_data(scraped: Prometheus) -> None:
    """Every panel query: thinkbrake's on the proxy's series ($model = fake-reasoner), the engine's (vllm:) on
    the embedded engine's series ($model = its vLLM model_name)."""
    evaluated = 0
    engine_models = scraped.label_values("model_name", "vllm:generation_tokens_total")
    assert len(engine_models) == 1, engine_models
    print(f"\n{len(panel_queries())} dashboard queries, {SUBSTITUTIONS}:")
    for title, expr in panel_queries():
        model = engine_models[0] if "vllm:" in expr else SERVED_MODEL
        result = scraped.query(substitute(expr, model, scraped.window()))
        values = [float(series["value"][1]) for series in result]
        print(f"  {len(result)} series  {', '.join(f'{v:.6g}' for v in values):<28} {title} [$model={model}]: {expr}")
        assert result, f"no data: {title}: {expr}"
        assert all(math.isfinite(value) for value in values), f"{title}: {expr} -> {values}"
        evaluated += 1
    print(f"{evaluated} of {len(panel_queries())} evaluated, every one returned data")

    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC{SELECTOR}, LABEL)
            series, label = variable["query"].removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
            label_values = scraped.label_values(label, substitute(series, SERVED_MODEL, scraped.window()))
            print(f"  variable ${variable['name']}: {label_values}  ({variable['query']})")
            assert SERVED_MODEL in label_values if label == "model" else label_values, variable["query"]
    assert evaluated == len(panel_queries())


def test_real_server_totals_match_its_responses(scraped: Prometheus, real_server: RealServer) -> None:
    """What Prometheus holds equals what the server's responses reported, request by request."""
    infos, selector = real_server.infos, f'{{model="{SERVED_MODEL}"}}'

    def total(metric: str, labels: str = "") -> float | None:
        return scraped.scalar(f'sum({metric}{{model="{SERVED_MODEL}"{labels}}})')

    shadows = [info for info in infos if "shadow" in info]
    assert len(shadows) == 4 and all(info["shadow"]["would_stop"] for info in shadows)
    assert total("thinkbrake_thinking_tokens_total") == sum(info["thinking_tokens"] for info in infos)
    assert total("thinkbrake_answer_tokens_total") == sum(info["answer_tokens"] for info in infos)
    assert total("thinkbrake_requests_total", ', outcome="stopped"') == sum(info["stopped"] for info in infos)
    assert total("thinkbrake_requests_total", ', outcome="server_error"') == real_server.errors == 2
    assert total("thinkbrake_requests_total", ', outcome="client_error"') == 0
    assert total("thinkbrake_requests_total", ', outcome="length"') == 2
    assert total("thinkbrake_tokens_saved_measured_total") == sum(
        info["thinking_tokens"] - info["shadow"]["stop_tokens"] for info in shadows
    )
    assert total("thinkbrake_shadow_agree_total") == sum(info["shadow"]["agree"] is True for info in shadows)
    assert (total("thinkbrake_tokens_saved_estimated_total") or 0) > 0
    assert scraped.query(f"thinkbrake_e2e_request_latency_seconds_count{selector}")


def test_dashboard_numbers_on_known_records(scraped: Prometheus) -> None:
    """Exact values through the scrape, and the dashboard's ratios over the second batch (rates ignore what came
    before the first scrape): 3 of its 4 shadow answers agree, each shadow request would have saved 1000 - 250
    thinking tokens, 1 of its 9 requests failed."""
    f_first = PRIOR_STOP_RATIO  # no shadow data yet when the first batch's stop ends
    f_second = (PRIOR_STOP_RATIO * PRIOR_WEIGHT_TOKENS + 250) / (PRIOR_WEIGHT_TOKENS + 1000)  # after its shadow
    estimated = 400 * (1 / f_first - 1) + (400 + 700) * (1 / f_second - 1)
    selector = f'{{model="{MODEL}"}}'
    assert scraped.scalar(f"sum(thinkbrake_tokens_saved_estimated_total{selector})") == pytest.approx(estimated)
    assert scraped.scalar(f"sum(thinkbrake_tokens_saved_measured_total{selector})") == 5 * 750
    agreement = f"sum(thinkbrake_shadow_agree_total{selector}) / sum(thinkbrake_shadow_compared_total{selector})"
    assert scraped.scalar(agreement) == 4 / 5

    queries: dict[str, list[str]] = {}
    window, at = scraped.exact_window()
    for title, expr in panel_queries():
        queries.setdefault(title, []).append(substitute(expr, MODEL, window))
    print(f"\nwindow {window} ending at {at}: {queries['Shadow agreement (%)'][0]}")
    assert scraped.scalar(queries["Shadow agreement (%)"][0], at) == pytest.approx(75.0)
    assert scraped.scalar(queries["Error rate (%)"][0], at) == pytest.approx(100 / len(SECOND_BATCH))
    per_stop = queries["Measured vs estimated savings per stop"]
    measured_per_stop, estimated_per_stop = (scraped.scalar(expr, at) for expr in per_stop)
    assert measured_per_stop == pytest.approx(750.0)
    # rate() extrapolates a series that started at 0 differently from one that did not: close, not exact.
    assert estimated_per_stop == pytest.approx((400 + 700) / 2 * (1 / f_second - 1), rel=0.1)
