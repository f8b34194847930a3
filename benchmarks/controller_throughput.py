"""Controller throughput on one core: thinking tokens per second over the dev traces.

Every trace's thinking is tokenized first (not timed), then streamed token by token through a fresh
ThinkingController. The run uses the ``off`` policy so every token of every trace is processed (an answer
policy would stop early and hide the cost of long traces), then repeats with the default policy.
Cost per token is compared between the shortest and the longest quartile of traces: if the controller ever
re-scanned the growing text, the longest quartile would cost many times more per token.

    python benchmarks/controller_throughput.py [TRACES.jsonl.gz] [--limit N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.offline.replay import REPLAY_DELIMITERS, Tokenizers, default_tokenizer_root, load_traces, token_deltas  # noqa: E402
from controller.policies import parse_policy  # noqa: E402
from controller.session import ThinkingController  # noqa: E402
from controller.verify import AnswerComparer  # noqa: E402

DEFAULT_TRACES = ROOT.parent / "shared" / "data" / "traces" / "dev-skyt1.jsonl.gz"


def stream(deltas: list[str], policy: str, comparer: AnswerComparer) -> tuple[int, float]:
    """Tokens processed and seconds spent streaming one trace."""
    controller = ThinkingController(parse_policy({"policy": policy}), REPLAY_DELIMITERS, comparer)
    feed = controller.feed
    started = time.perf_counter()
    processed = 0
    for delta in deltas:
        processed += 1
        if feed(delta, 1).decision is not None:
            break
    else:
        controller.finish()
    return processed, time.perf_counter() - started


def quartile_costs(samples: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """(min length, max length, microseconds per token) for each quartile of traces by length."""
    ordered = sorted(samples)
    size = max(1, len(ordered) // 4)
    rows = []
    for index in range(4):
        chunk = ordered[index * size : (index + 1) * size if index < 3 else len(ordered)]
        tokens = sum(n for _, n, _ in chunk)
        seconds = sum(s for _, _, s in chunk)
        rows.append((chunk[0][0], chunk[-1][0], 1e6 * seconds / tokens))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="?", default=str(DEFAULT_TRACES))
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    traces = list(load_traces([args.traces]))[: args.limit]
    tokenizers = Tokenizers(default_tokenizer_root(args.traces))
    print(f"tokenizing {len(traces)} traces ...", file=sys.stderr)
    all_deltas = [token_deltas(tokenizers.get(trace["tokenizer"]), trace["thinking"]) for trace in traces]
    comparer = AnswerComparer()
    for policy in ("off", "fcs_reflection"):
        samples: list[tuple[int, int, float]] = []
        for deltas in all_deltas:
            processed, seconds = stream(deltas, policy, comparer)
            samples.append((len(deltas), processed, seconds))
        tokens = sum(n for _, n, _ in samples)
        seconds = sum(s for _, _, s in samples)
        print(f"\npolicy={policy}: {tokens:,} tokens in {seconds:.2f} s on one core = {tokens / seconds:,.0f} tokens/s")
        if policy == "off":
            rows = quartile_costs(samples)
            print("| quartile | trace length (tokens) | µs per token |")
            print("|---|---|---|")
            for index, (low, high, cost) in enumerate(rows, 1):
                print(f"| Q{index} | {low:,}–{high:,} | {cost:.2f} |")
            print(f"longest/shortest quartile cost per token: {rows[3][2] / rows[0][2]:.2f}x")
            per_trace = [1e6 * s / n for _, n, s in samples if n]
            print(f"median µs/token per trace: {statistics.median(per_trace):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
