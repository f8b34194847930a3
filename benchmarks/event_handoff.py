"""The hand-off of a choice's events to its response, alone: CPU per event, in one run, alternating ``--rounds`` times.

A runner yields N events, each after a future that a loop callback completes (as a socket read does). The events
reach a consumer three ways: ``server.fan_in.merge`` (the runner in a task of its own, its events through the
``Mailbox``), the same with ``asyncio.Queue`` in place of the mailbox (how ``merge`` handed events over before),
and the runner iterated in the consumer's own task (no hand-off; what a single choice could do if its cleanup did
not have to survive a cancelled response). Runs on uvloop, as uvicorn does.

    python benchmarks/event_handoff.py                 # 100,000 events, 3 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from server.events import ChoiceEvent  # noqa: E402
from server.fan_in import merge  # noqa: E402


class Runner:
    """Stands for ``ChoiceRunner``: ``run()`` yields ``events`` text events, then the result."""

    def __init__(self, events: int) -> None:
        self.events = events

    async def run(self) -> AsyncGenerator[ChoiceEvent, None]:
        loop = asyncio.get_running_loop()
        for _ in range(self.events):
            ready = loop.create_future()
            loop.call_soon(ready.set_result, None)  # the read that brings the next token
            await ready
            yield ChoiceEvent(0, reasoning=" x")
        yield ChoiceEvent(0, result=object())  # type: ignore[arg-type]


async def through_queue(runner: Runner) -> AsyncGenerator[ChoiceEvent, None]:
    """``merge`` as it was, for one runner: a pump task and an ``asyncio.Queue``."""
    queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()

    async def pump() -> None:
        async with aclosing(runner.run()) as events:
            async for event in events:
                await queue.put(event)

    task = asyncio.create_task(pump())
    while True:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        for event in batch:
            yield event
            if event.result is not None:
                await task
                return


async def direct(runner: Runner) -> AsyncGenerator[ChoiceEvent, None]:
    async with aclosing(runner.run()) as events:
        async for event in events:
            yield event


async def cpu_per_event(events: AsyncIterator[Any], count: int) -> float:
    began = time.process_time()
    received = 0
    async for _ in events:
        received += 1
    assert received == count + 1, received
    return (time.process_time() - began) / count * 1e6


async def main(count: int, rounds: int) -> None:
    ways = {
        "merge (Mailbox)": lambda: merge([Runner(count)], set()),  # type: ignore[list-item]
        "asyncio.Queue": lambda: through_queue(Runner(count)),
        "no hand-off": lambda: direct(Runner(count)),
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    for round_number in range(1, rounds + 1):
        for name, make in ways.items():
            results[name].append(await cpu_per_event(make(), count))
        print(f"round {round_number}/{rounds} done", file=sys.stderr)
    print(f"| hand-off | CPU us per event, {rounds} rounds |")
    print("|---|---|")
    for name, values in results.items():
        print(f"| {name} | {', '.join(f'{value:.2f}' for value in values)} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="events per way and round (default 100,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every way once (default 3)")
    arguments = parser.parse_args()
    uvloop.run(main(arguments.events, arguments.rounds))
