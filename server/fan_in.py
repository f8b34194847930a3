"""The events of a request's choice runners as one stream.

Invariants: events keep their order within a choice; text that piled up while the client was being written to
leaves in as few events as possible (:func:`coalesce`); closing the stream early cancels every runner, and their
cleanup (aborting backend requests) runs to its end even when the response itself is being cancelled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from server.choice import ChoiceRunner
from server.events import ChoiceEvent


async def merge(runners: list[ChoiceRunner], cleanups: set[asyncio.Future[Any]]) -> AsyncGenerator[ChoiceEvent, None]:
    """Events of all runners in arrival order; cancels every runner when closed early.

    The runners' cleanup (aborting their backend requests) is shielded: when the response is cancelled by a
    client disconnect, starlette's cancel scope keeps cancelling every await of the cancelled task, and a
    cancelled ``gather`` would cancel the runners again in the middle of their abort. ``cleanups`` holds the
    shielded futures until they finish (asyncio keeps only weak references to tasks).
    """
    mailbox = Mailbox()

    async def pump(runner: ChoiceRunner) -> None:
        try:
            async with aclosing(runner.run()) as events:
                async for event in events:
                    mailbox.put(event)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which reports it
            mailbox.put(error)

    tasks = [asyncio.create_task(pump(runner)) for runner in runners]
    remaining = len(runners)
    try:
        while remaining:
            batch = await mailbox.take_all()  # with what piled up while the client was being written to
            for item in coalesce(batch):
                if isinstance(item, Exception):
                    raise item
                if item.result is not None:
                    remaining -= 1
                if not item.empty:
                    yield item
    finally:
        for task in tasks:
            task.cancel()
        cleanup = asyncio.gather(*tasks, return_exceptions=True)
        cleanups.add(cleanup)
        cleanup.add_done_callback(cleanups.discard)
        await asyncio.shield(cleanup)


class Mailbox:
    """The runners' events on their way to the response: kept in order, and the one consumer woken when the first
    arrives. What ``asyncio.Queue`` (unbounded, one consumer) does, without its per-item bookkeeping (every token
    passes here). Invariant: :meth:`take_all` returns every item put so far, in order, and at least one."""

    def __init__(self) -> None:
        self._items: deque[ChoiceEvent | Exception] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: ChoiceEvent | Exception) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take_all(self) -> list[ChoiceEvent | Exception]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items


def coalesce(batch: list[ChoiceEvent | Exception]) -> list[ChoiceEvent | Exception]:
    """Joins consecutive text-only events of the same choice: tokens that arrived together leave in one SSE
    event (under load this is what keeps the cost per client event, not per token). Order is kept."""
    if len(batch) < 2:
        return batch
    out: list[ChoiceEvent | Exception] = []
    for item in batch:
        last = out[-1] if out else None
        if (
            isinstance(item, ChoiceEvent) and isinstance(last, ChoiceEvent) and item.result is None
            and last.result is None and item.index == last.index
        ):  # fmt: skip
            out[-1] = ChoiceEvent(
                item.index, last.reasoning + item.reasoning, last.content + item.content, last.text + item.text
            )
        else:
            out.append(item)
    return out


async def first_event(events: AsyncGenerator[ChoiceEvent, None]) -> ChoiceEvent | None:
    """The first event, so errors raised before any output become ordinary HTTP errors."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await events.aclose()
        raise


async def chain(
    first: ChoiceEvent | None, events: AsyncGenerator[ChoiceEvent, None]
) -> AsyncGenerator[ChoiceEvent, None]:
    """``first`` and then the rest of ``events`` (nothing when there was no first event); closes ``events``."""
    async with aclosing(events) as rest:
        if first is not None:
            yield first
            async for event in rest:
                yield event
