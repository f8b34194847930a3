"""What thinkbrake costs in front of an upstream: direct vs through thinkbrake (policy off, default policy).

One run starts a fast fake OpenAI-compatible upstream (``tests/support/fake_upstream.py``, a process of its own,
replaying the dev reasoning traces as SSE, one event per token) and ``thinkbrake serve --upstream`` (a process of
its own, so its CPU and memory can be read with psutil). Then, for each concurrency C, C streaming clients loop
for ``--duration`` seconds (after ``--warmup``) in three phases: straight to the upstream ("direct"), through
thinkbrake with ``{"thinkbrake": {"policy": "off"}}`` ("off"), and through thinkbrake with its default policy
("default"). With ``--record DIR`` a second ``thinkbrake serve --upstream ... --record DIR`` runs too, and a fourth
phase streams through it with the default policy ("recorded": every request recorded, with its dense probes), so
recording's cost is the ratio of "recorded" to "default". It prints one markdown table per C:

- tokens/s received by all clients, and the ratio to direct. Direct, every SSE event is one token; thinkbrake
  may forward tokens that arrive together in one event, so its tokens/s is its streamed characters/s divided
  by the direct phase's characters per token (events/s is shown too);
- TTFT and inter-token latency (ITL, the gap between consecutive text-carrying events of a stream), p50 and
  p99, and what thinkbrake adds to them (the percentile through thinkbrake minus the direct one);
- thinkbrake's CPU (% of one core) and its CPU per 1,000 forwarded tokens (milliseconds: CPU seconds / tokens
  received by the clients, x 1e6; the same figure as microseconds per token), both over the measured window,
  workers included, and RSS at the end of the phase (MiB). ``--thinkbrake-arg=--workers=2`` runs thinkbrake
  with two worker processes.

A second table per C says what the answer probes did in each phase through thinkbrake, from thinkbrake's own
``/metrics`` (counter and histogram deltas over the measured window): probes sent per second, answered, failed,
tokens the probes decoded per second, probe latency (thinkbrake's ``thinkbrake_probe_latency_seconds``: from
sending a probe to having its answer, as the policy sees it; the mean is exact, p50 / p99 are the upper bounds of
the histogram buckets that hold them, 10, 25, 50, 100, 250 ms ...), early stops decided (by reason), and where the
fake upstream took the answers from (its ``GET /fake/stats``). The default policy (``probe_fcs``) probes at each
"Wait"; against the default traces the fake answers every probe with the trace's final answer at confidence
~1, which is not how a model answers mid-thinking. ``--probe-traces`` replays ``dev-probes`` instead (64
traces spread over the file: both models, every dataset): the thinking is streamed as usual and each probe is
answered with the model's own recorded probe answer at the nearest recorded position at or before the probe's
(``wait_probes`` with their recorded confidence for the wait suffix, ``probes`` for the dense one; see
``FakeUpstream._recorded_answer``), so the policy sends, reads and stops on real probe traffic.
``--probe-delay S`` makes the fake upstream take S seconds per probe, as an engine's prefill + short decode does.

The clients are a lean hand-written HTTP/1.1 SSE reader (one ``json.loads`` per event, no SDK), so the client
is cheap next to the servers. ``--token-rate R`` paces the upstream at R tokens/s per stream, like a real decoding engine;
0 (default) streams as fast as it can, which measures capacity (then every process competes for the same
cores and the ratio says how much CPU thinkbrake needs per token relative to upstream + client).

    python benchmarks/proxy_overhead.py                      # C = 1, 16, 64, 256; a few minutes
    python benchmarks/proxy_overhead.py --token-rate 50 --duration 5 --concurrency 64
    python benchmarks/proxy_overhead.py --token-rate 50 --concurrency 64 --max-tokens 256 --duration 20 --record /tmp/tb-traces
    python benchmarks/proxy_overhead.py --probe-traces --token-rate 50 --concurrency 16,64 --duration 10 --warmup 2
    python benchmarks/proxy_overhead.py --probe-traces --probe-delay 0.05 --token-rate 50 --concurrency 64 --modes default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_TRACES = ROOT.parent / "shared" / "data" / "traces" / "dev-skyt1.jsonl.gz"
DEFAULT_PROBE_TRACES = ROOT.parent / "shared" / "data" / "traces" / "dev-probes.jsonl.gz"
MODES = ("direct", "off", "default")
RECORDED = "recorded"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def process(command: list[str], ready_url: str, name: str, log: pathlib.Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process and wait until ``ready_url`` answers 200; terminate it (only it) at the end."""
    import urllib.request

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as output:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"{name} exited with {child.returncode}; see {log}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready; see {log}")
            time.sleep(0.1)
        yield child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@dataclass
class Sample:
    """What the clients saw during the measured window of one phase."""

    tokens: int = 0  # token events (SSE events carrying text)
    chars: int = 0  # characters of streamed text (reasoning + content)
    requests: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


def text_length(event: bytes) -> int:
    """Characters of generated text in one SSE event (0 for the role chunk, the final chunk or ``[DONE]``).

    Parsed like any client would; ``reasoning`` and its ``reasoning_content`` twin count once.
    """
    if not event.startswith(b"data: {"):
        return 0
    length = 0
    for choice in json.loads(event[6:]).get("choices") or ():
        delta = choice.get("delta") or {}
        length += len(delta.get("reasoning") or delta.get("reasoning_content") or "")
        length += len(delta.get("content") or "")
    return length


class Client:
    """One keep-alive HTTP/1.1 connection that posts a streaming request and reads the SSE events."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def stream(self, body: bytes, sample: Sample, measuring: list[bool]) -> None:
        reader, writer = await self._connect()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sent = time.perf_counter()
        writer.write(head.encode() + body)
        status = (await reader.readuntil(b"\r\n\r\n")).split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}")
        last: float | None = None
        buffer = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            now = time.perf_counter()
            buffer += data[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if b'"error"' in event and b"data: {" in event and b'"choices"' not in event:
                    raise RuntimeError(event.decode(errors="replace")[:200])
                length = text_length(event)
                if not length:
                    continue
                if measuring[0]:
                    sample.tokens += 1
                    sample.chars += length
                    if last is None:
                        sample.ttft.append(now - sent)
                    else:
                        sample.gaps.append(now - last)
                last = now
        if measuring[0]:
            sample.requests += 1


async def run_phase(
    host: str,
    port: int,
    body: bytes,
    concurrency: int,
    warmup: float,
    duration: float,
    snapshot: Callable[[], Snapshot] | None = None,
) -> tuple[Sample, float, tuple[Snapshot, Snapshot] | None]:
    """``concurrency`` clients stream back to back; returns what was measured after the warm-up, its length, and
    ``snapshot()`` taken (in a thread, the clients go on) as the measured window opens and as it closes."""
    sample = Sample()
    measuring = [False]
    clients = [Client(host, port) for _ in range(concurrency)]

    async def worker(client: Client) -> None:
        await asyncio.sleep(random.uniform(0, warmup))  # clients do not arrive in lockstep
        while True:
            try:
                await client.stream(body, sample, measuring)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - counted; the benchmark goes on
                if measuring[0]:
                    sample.errors += 1
                    if sample.errors <= 3:
                        progress(f"  client error: {type(error).__name__}: {error}")
                client.close()
                await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(worker(client)) for client in clients]
    await asyncio.sleep(warmup)
    first = await asyncio.to_thread(snapshot) if snapshot else None
    measuring[0] = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    measuring[0] = False
    elapsed = time.perf_counter() - started
    last = await asyncio.to_thread(snapshot) if snapshot else None
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        client.close()
    return sample, elapsed, (first, last) if first and last else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass
class Snapshot:
    """A server's state at one instant: CPU seconds, thinkbrake's metrics, the fake upstream's probe counts."""

    at: float
    cpu: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    answers: dict[str, float] = field(default_factory=dict)


@dataclass
class ProbeLoad:
    """What the answer probes did over the measured window (thinkbrake's /metrics, fake upstream's /fake/stats)."""

    seconds: float
    sent: float
    answered: float
    errors: float
    tokens: float
    latency_mean: float | None  # seconds (exact: histogram sum / count)
    latency_p50: float | None  # seconds: upper bound of the bucket holding it (inf: above the last bucket)
    latency_p99: float | None
    stops: dict[str, float]  # early stops decided, by reason
    answers: dict[str, float]  # probes the fake upstream answered, by where the answer came from


@dataclass
class Row:
    mode: str
    tokens_per_second: float  # direct: token events/s; through thinkbrake: characters/s / direct chars per token
    events_per_second: float
    chars_per_token: float
    requests: int
    errors: int
    ttft: tuple[float, float]
    itl: tuple[float, float]
    cpu_percent: float | None
    rss_mib: float | None
    cpu_ms_per_1k_tokens: float | None = None
    probes: ProbeLoad | None = None


def tree_cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds of a process and its children (vLLM runs its engine core in a child)."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def tree_rss_mib(process: psutil.Process) -> float:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def get_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def scrape_metrics(port: int) -> dict[str, float]:
    """thinkbrake's ``/metrics``: each sample summed over its labels (``name``), and by ``le`` or ``reason``
    (``name{le=0.01}``, ``name{reason=probe_agreed}``) where it has one."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(get_text(f"http://127.0.0.1:{port}/metrics")):
        for sample in family.samples:
            if not sample.name.startswith("thinkbrake_"):
                continue
            keys = [sample.name] + [
                f"{sample.name}{{{k}={sample.labels[k]}}}" for k in ("le", "reason") if k in sample.labels
            ]
            for key in keys:
                out[key] = out.get(key, 0.0) + sample.value
    return out


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q`` (cumulative counts by bound); None if empty."""
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    return next(bound for bound in sorted(buckets) if buckets[bound] >= q * total)


def probe_load(before: Snapshot, after: Snapshot) -> ProbeLoad:
    """The probe counters and latency histogram between two snapshots of a thinkbrake."""

    def delta(key: str) -> float:
        return after.metrics.get(key, 0.0) - before.metrics.get(key, 0.0)

    latency = "thinkbrake_probe_latency_seconds"
    prefix = f"{latency}_bucket{{le="
    buckets = {float(key[len(prefix) : -1]): delta(key) for key in after.metrics if key.startswith(prefix)}
    count = delta(f"{latency}_count")
    stops_prefix = "thinkbrake_early_stops_total{reason="
    stops = {key[len(stops_prefix) : -1]: delta(key) for key in after.metrics if key.startswith(stops_prefix)}
    answers = {key: after.answers[key] - before.answers.get(key, 0.0) for key in after.answers}
    return ProbeLoad(
        seconds=after.at - before.at,
        sent=delta("thinkbrake_probes_total"),
        answered=count,
        errors=delta("thinkbrake_probe_errors_total"),
        tokens=delta("thinkbrake_probe_tokens_total"),
        latency_mean=delta(f"{latency}_sum") / count if count else None,
        latency_p50=bucket_quantile(buckets, 0.50),
        latency_p99=bucket_quantile(buckets, 0.99),
        stops={reason: value for reason, value in stops.items() if value},
        answers={source: value for source, value in answers.items() if value},
    )


def measure(
    mode: str,
    target: tuple[str, int],
    concurrency: int,
    body: dict[str, object],
    args: argparse.Namespace,
    watched: psutil.Process | None,
    chars_per_token: float | None,
    metrics_port: int | None = None,
    upstream_port: int | None = None,
) -> Row:
    """One phase against ``target``. ``watched``: the server process whose CPU and RSS are reported, over the
    measured window. ``chars_per_token`` (from the direct phase, one token per event) converts streamed characters
    to tokens: thinkbrake may forward several tokens in one event when they arrive together. ``metrics_port``: a
    thinkbrake whose probe metrics are read over the window (and ``upstream_port``: the fake upstream's probe
    answers)."""

    def snapshot() -> Snapshot:
        taken = Snapshot(at=0.0)
        if metrics_port is not None:
            taken.metrics = scrape_metrics(metrics_port)
        if upstream_port is not None:
            stats = json.loads(get_text(f"http://127.0.0.1:{upstream_port}/fake/stats"))
            taken.answers = {str(key): float(value) for key, value in stats.get("probe_answers", {}).items()}
        taken.cpu = tree_cpu_seconds(watched) if watched else 0.0  # after the scrapes: their CPU is not counted
        taken.at = time.perf_counter()
        return taken

    sample, elapsed, window = asyncio.run(
        run_phase(target[0], target[1], json.dumps(body).encode(), concurrency, args.warmup, args.duration, snapshot)
    )
    assert window is not None
    before, after = window
    cpu_seconds = after.cpu - before.cpu
    tokens = sample.chars / chars_per_token if chars_per_token else sample.tokens
    return Row(
        mode=mode,
        tokens_per_second=tokens / elapsed,
        events_per_second=sample.tokens / elapsed,
        chars_per_token=sample.chars / max(1, sample.tokens),
        requests=sample.requests,
        errors=sample.errors,
        ttft=(percentile(sample.ttft, 50) * 1e3, percentile(sample.ttft, 99) * 1e3),
        itl=(percentile(sample.gaps, 50) * 1e3, percentile(sample.gaps, 99) * 1e3),
        cpu_percent=cpu_seconds / (after.at - before.at) * 100 if watched else None,
        rss_mib=tree_rss_mib(watched) if watched else None,
        cpu_ms_per_1k_tokens=cpu_seconds / tokens * 1e6 if watched and tokens else None,
        probes=probe_load(before, after) if metrics_port is not None else None,
    )


def request_body(mode: str, model: str, max_tokens: int, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": "Solve the problem."}],
        "stream": True,
        "max_tokens": max_tokens,
        **extra,
    }
    if mode == "off":
        body["thinkbrake"] = {"policy": "off"}
    return body


def table(concurrency: int, rows: list[Row], cpu_label: str = "thinkbrake CPU %") -> str:
    direct = rows[0]
    lines = [
        f"### C = {concurrency}",
        "",
        "| path | tokens/s | ratio | events/s | requests | errors | TTFT p50 / p99 ms | +TTFT p50 / p99 ms "
        f"| ITL p50 / p99 ms | +ITL p50 / p99 ms | {cpu_label} | CPU ms per 1,000 forwarded tokens | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def delta(row: Row, mine: tuple[float, float], base: tuple[float, float]) -> str:
        return f"{mine[0] - base[0]:+.2f} / {mine[1] - base[1]:+.2f}" if row.mode != "direct" else "-"

    for row in rows:
        lines.append(
            f"| {row.mode} | {row.tokens_per_second:,.0f} | {row.tokens_per_second / direct.tokens_per_second:.3f} "
            f"| {row.events_per_second:,.0f} | {row.requests} | {row.errors} | {row.ttft[0]:.2f} / {row.ttft[1]:.2f} | {delta(row, row.ttft, direct.ttft)} "
            f"| {row.itl[0]:.3f} / {row.itl[1]:.3f} | {delta(row, row.itl, direct.itl)} "
            f"| {'-' if row.cpu_percent is None else f'{row.cpu_percent:.0f}'} "
            f"| {'-' if row.cpu_ms_per_1k_tokens is None else f'{row.cpu_ms_per_1k_tokens:.1f}'} "
            f"| {'-' if row.rss_mib is None else f'{row.rss_mib:.0f}'} |"
        )
    return "\n".join(lines)


def probe_table(concurrency: int, rows: list[Row]) -> str:
    """What the answer probes did in each phase through thinkbrake (see the module docstring)."""
    probed = [row for row in rows if row.probes is not None]
    if not probed:
        return ""
    lines = [
        f"Answer probes, C = {concurrency} (thinkbrake's /metrics over the measured window; latency p50 / p99: "
        "upper bound of the histogram bucket)",
        "",
        "| path | probes/s | answered | failed | probe tokens/s | probe latency mean ms | probe latency p50 / p99 ms "
        "| stops decided | stops by reason | upstream answers from | CPU ms per 1,000 forwarded tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def bound(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        return "> 30000" if math.isinf(seconds) else f"≤ {seconds * 1e3:g}"

    def counts(values: dict[str, float]) -> str:
        ordered = sorted(values.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {value:.0f}" for name, value in ordered) or "-"

    for row in probed:
        load = row.probes
        assert load is not None
        seconds = max(load.seconds, 1e-9)
        mean = "-" if load.latency_mean is None else f"{load.latency_mean * 1e3:.2f}"
        cpu = "-" if row.cpu_ms_per_1k_tokens is None else f"{row.cpu_ms_per_1k_tokens:.1f}"
        lines.append(
            f"| {row.mode} | {load.sent / seconds:.2f} | {load.answered:.0f} | {load.errors:.0f} "
            f"| {load.tokens / seconds:.1f} | {mean} | {bound(load.latency_p50)} / {bound(load.latency_p99)} "
            f"| {sum(load.stops.values()):.0f} | {counts(load.stops)} | {counts(load.answers)} | {cpu} |"
        )
    return "\n".join(lines)


def recording_summary(rows: list[Row], port: int, folder: str | None) -> str:
    """The "recorded" phase against "default" (same policy, same traffic), and what the recorder wrote so far."""
    by_mode = {row.mode: row for row in rows}
    if folder is None or RECORDED not in by_mode or "default" not in by_mode:
        return ""
    import urllib.request

    from tests.support.engine_metrics import metrics_text_value

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    written = metrics_text_value(text, "thinkbrake_recorded_traces_total")
    dropped = metrics_text_value(text, "thinkbrake_recording_dropped_traces_total")
    probes = metrics_text_value(text, "thinkbrake_probes_total")
    files = sorted(pathlib.Path(folder).glob("*.jsonl"))
    size = sum(path.stat().st_size for path in files) / 2**20
    ratio = by_mode[RECORDED].tokens_per_second / by_mode["default"].tokens_per_second
    return (
        f"Recording: tokens/s recorded / default = {ratio:.3f}; so far {written:.0f} traces written, {dropped:.0f} "
        f"dropped, {probes:.0f} probes sent by the recording server; {size:.1f} MiB in {len(files)} file(s).\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64,256", help="comma-separated C values (default 1,16,64,256)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase (default 2)")
    parser.add_argument("--token-rate", type=float, default=0.0, help="upstream tokens/s per stream; 0 = unpaced")
    parser.add_argument("--max-tokens", type=int, default=2048, help="max_tokens of every request (default 2048)")
    parser.add_argument("--traces", default=str(DEFAULT_TRACES), help="trace file the upstream replays")
    parser.add_argument(
        "--probe-traces",
        nargs="?",
        const=str(DEFAULT_PROBE_TRACES),
        metavar="FILE",
        help="replay probe traces (default dev-probes.jsonl.gz) instead of --traces, 64 spread over the file: the "
        "upstream answers each probe with the model's recorded probe answer at that position",
    )
    parser.add_argument(
        "--probe-delay", type=float, default=0.0, help="seconds the fake upstream takes per probe (default 0)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="phases to run (default direct,off,default)")
    parser.add_argument("--logs", default="/tmp/thinkbrake-bench", help="folder for the servers' logs")
    parser.add_argument("--thinkbrake-arg", action="append", default=[], help="extra flag for thinkbrake serve")
    parser.add_argument(
        "--record",
        metavar="DIR",
        help="also run a thinkbrake that records every request into DIR and a 'recorded' phase through it",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = pathlib.Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    upstream_port, thinkbrake_port = free_port(), free_port()
    upstream_command = [
        sys.executable, "-m", "tests.support.fake_upstream", "--port", str(upstream_port), "--no-record",
        "--token-rate", str(args.token_rate),
    ]  # fmt: skip
    if args.probe_traces:
        if not pathlib.Path(args.probe_traces).exists():
            raise SystemExit(f"no probe traces at {args.probe_traces}")
        upstream_command += ["--traces", args.probe_traces, "--limit", "64", "--spread"]
    elif args.traces and pathlib.Path(args.traces).exists():
        upstream_command += ["--traces", args.traces, "--limit", "64"]
    if args.probe_delay:
        upstream_command += ["--probe-delay", str(args.probe_delay)]
    upstream_url = f"http://127.0.0.1:{upstream_port}"

    def serve_command(port: int, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "server.cli", "serve", "--upstream", upstream_url, "--port", str(port),
            "--log-level", "warning", *args.thinkbrake_arg, *extra,
        ]  # fmt: skip

    thinkbrake_command = serve_command(thinkbrake_port)
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    modes = [mode for mode in args.modes.split(",") if mode]
    if modes[0] != "direct":
        modes.insert(0, "direct")
    if args.record and RECORDED not in modes:
        modes.append(RECORDED)
    if not args.record and RECORDED in modes:
        modes.remove(RECORDED)
    record_port = free_port()
    record_command = serve_command(record_port, "--record", str(args.record))
    rate = f"{args.token_rate:g} tokens/s per stream" if args.token_rate else "unpaced"
    progress(f"upstream: {rate}; {len(concurrencies)} x {len(modes)} phases of {args.warmup + args.duration:g} s")
    tables: list[str] = []
    with ExitStack() as stack:
        stack.enter_context(process(upstream_command, f"{upstream_url}/health", "fake upstream", logs / "upstream.log"))
        thinkbrake = stack.enter_context(
            process(thinkbrake_command, f"http://127.0.0.1:{thinkbrake_port}/health", "thinkbrake", logs / "tb.log")
        )
        tb_process = psutil.Process(thinkbrake.pid)
        progress(f"thinkbrake pid {thinkbrake.pid}, RSS at start {tb_process.memory_info().rss / 2**20:.0f} MiB")
        ports, watch = {"direct": upstream_port}, {"direct": None}
        if RECORDED in modes:
            recorder = stack.enter_context(
                process(
                    record_command, f"http://127.0.0.1:{record_port}/health", "recording thinkbrake", logs / "rec.log"
                )
            )
            ports[RECORDED], watch[RECORDED] = record_port, psutil.Process(recorder.pid)
        for concurrency in concurrencies:
            rows = []
            for mode in modes:
                target = ("127.0.0.1", ports.get(mode, thinkbrake_port))
                progress(f"C={concurrency} {mode} ...")
                body = request_body(mode, "fake-reasoner", args.max_tokens)
                watched = watch.get(mode, tb_process)
                through = mode != "direct"
                row = measure(
                    mode, target, concurrency, body, args, watched, rows[0].chars_per_token if rows else None,
                    metrics_port=target[1] if through else None, upstream_port=upstream_port if through else None,
                )  # fmt: skip
                probes = f", {row.probes.sent / row.probes.seconds:.1f} probes/s" if row.probes else ""
                progress(
                    f"C={concurrency} {mode}: {row.tokens_per_second:,.0f} tokens/s, {row.requests} requests, "
                    f"{row.errors} errors, ITL p99 {row.itl[1]:.2f} ms{probes}"
                )
                rows.append(row)
                time.sleep(0.5)
            tables.append(table(concurrency, rows))
            print(tables[-1] + "\n", flush=True)
            probes = probe_table(concurrency, rows)
            if probes:
                print(probes + "\n", flush=True)
            if args.record:
                print(recording_summary(rows, record_port, args.record), flush=True)
    cpu = psutil.cpu_count()
    traces = f"probe traces {args.probe_traces}" if args.probe_traces else f"traces {args.traces}"
    delay = f", {args.probe_delay:g} s per probe" if args.probe_delay else ""
    print(f"Machine: {cpu} logical CPUs, load average {os.getloadavg()[0]:.2f}; upstream {rate}{delay}; "
          f"{traces}; max_tokens {args.max_tokens}; {args.duration:g} s measured per phase.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
