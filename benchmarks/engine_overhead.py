"""thinkbrake's own overhead on the embedded engine: ``thinkbrake serve --model`` vs vLLM's OpenAI server.

Both run the same ``AsyncLLM`` on the same tiny random-weight test model (``server/demo/tiny_model.py``, built
on first use) with the same engine settings, one after the other, so the difference is what thinkbrake's
server and controller add on top of the engine (vLLM's own server is the baseline a user would otherwise run).
Requests are greedy (``temperature 0``) with ``ignore_eos``, so both servers decode the same tokens. For each
concurrency C it prints one markdown table: vLLM ("direct"), thinkbrake with ``policy=off`` and with the default
policy (random text has no answers, so it is never stopped: this is the cost of watching), with the same columns
as ``proxy_overhead.py``; CPU and RSS are of the whole server (process + engine-core child).

    python benchmarks/engine_overhead.py                    # C = 1, 4, 8
    python benchmarks/engine_overhead.py --concurrency 8 --duration 10
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from contextlib import ExitStack

import psutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from proxy_overhead import Row, free_port, measure, process, progress, request_body, table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated C values (default 1,4,8; max 8)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase (default 2)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request (default 256)")
    parser.add_argument("--logs", default="/tmp/thinkbrake-engine-bench", help="folder for the servers' logs")
    return parser.parse_args(argv)


def engine_flags() -> list[str]:
    """The engine settings of the test fixtures' vLLM server, as ``thinkbrake serve`` flags."""
    from tests.support.fixtures import KV_CACHE_BYTES, MAX_MODEL_LEN

    return ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-bytes", str(KV_CACHE_BYTES), "--enforce-eager"]


def run_server(
    name: str, command: list[str], port: int, modes: list[str], concurrencies: list[int], args: argparse.Namespace,
    model: str, results: dict[int, list[Row]], logs: pathlib.Path,
) -> None:  # fmt: skip
    from tests.support.fixtures import engine_environment

    os.environ.update(engine_environment())
    with ExitStack() as stack:
        server = stack.enter_context(process(command, f"http://127.0.0.1:{port}/health", name, logs / f"{name}.log"))
        watched = psutil.Process(server.pid)
        progress(f"{name} ready (pid {server.pid})")
        for concurrency in concurrencies:
            for mode in modes:
                progress(f"C={concurrency} {mode} ...")
                direct = results.get(concurrency)
                body = request_body(mode, model, args.max_tokens, temperature=0, ignore_eos=True)
                row = measure(mode, ("127.0.0.1", port), concurrency, body, args, watched,
                              direct[0].chars_per_token if direct else None)  # fmt: skip
                progress(f"C={concurrency} {mode}: {row.tokens_per_second:,.0f} tokens/s, {row.errors} errors")
                results.setdefault(concurrency, []).append(row)
                time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    from server.demo.tiny_model import RECIPE, build_tiny_model
    from tests.support.fixtures import SCRIPTED_PROCESSOR_FQCN, cache_root, server_command

    args = parse_args(argv)
    logs = pathlib.Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_model(cache_root() / RECIPE)
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    results: dict[int, list[Row]] = {}
    vllm_port = free_port()
    run_server("vllm", server_command(model_dir, vllm_port), vllm_port, ["direct"], concurrencies, args,
               str(model_dir), results, logs)  # fmt: skip
    tb_port = free_port()
    thinkbrake = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(tb_port),
        "--log-level", "warning", "--logits-processors", SCRIPTED_PROCESSOR_FQCN, *engine_flags(),
    ]  # fmt: skip
    run_server("thinkbrake", thinkbrake, tb_port, ["off", "default"], concurrencies, args, str(model_dir), results,
               logs)  # fmt: skip
    for concurrency in concurrencies:
        print(table(concurrency, results[concurrency], cpu_label="server CPU %") + "\n")
    print(f"Machine: {psutil.cpu_count()} logical CPUs; tiny model {RECIPE}; max_tokens {args.max_tokens}, "
          f"greedy, ignore_eos; {args.duration:g} s measured per phase. direct = vLLM's OpenAI server.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
