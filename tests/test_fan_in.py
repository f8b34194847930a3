"""The hand-off of a request's choice events to its response (``server/fan_in.py``)."""

from __future__ import annotations

import asyncio

from server.events import ChoiceEvent
from server.fan_in import Mailbox, coalesce


async def test_the_mailbox_gives_everything_put_so_far_in_order_and_wakes_its_waiting_consumer() -> None:
    mailbox = Mailbox()
    taken = asyncio.ensure_future(mailbox.take_all())
    await asyncio.sleep(0)
    assert not taken.done()  # nothing put yet: the consumer waits
    first, second, error = ChoiceEvent(0, reasoning="a"), ChoiceEvent(1, content="b"), ValueError("runner failed")
    mailbox.put(first)
    mailbox.put(second)  # before the consumer runs: it gets both at once
    assert await asyncio.wait_for(taken, 10) == [first, second]
    mailbox.put(error)
    assert await mailbox.take_all() == [error]  # something already there: no wait


async def test_a_consumer_cancelled_while_waiting_leaves_the_mailbox_usable() -> None:
    mailbox = Mailbox()
    taken = asyncio.ensure_future(mailbox.take_all())
    await asyncio.sleep(0)
    taken.cancel()
    await asyncio.gather(taken, return_exceptions=True)
    event = ChoiceEvent(0, reasoning="x")
    mailbox.put(event)  # no waiter left to wake, and nothing lost
    assert await mailbox.take_all() == [event]


def test_coalesce_joins_consecutive_text_of_one_choice_only() -> None:
    batch = [ChoiceEvent(0, reasoning="a"), ChoiceEvent(0, reasoning="b", content="c"), ChoiceEvent(1, content="d"),
             ChoiceEvent(1, content="e")]  # fmt: skip
    joined = coalesce(list(batch))
    assert [(event.index, event.reasoning, event.content) for event in joined] == [(0, "ab", "c"), (1, "", "de")]
