"""The disconnect guard of the generation endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

log = logging.getLogger(__name__)


async def unless_disconnected(request: Request, work: Awaitable[Any], poll_seconds: float = 0.25) -> Any:
    """Await ``work``; if the client goes away first, cancel it (which aborts the backend requests).

    Starlette cancels a *streaming* response on disconnect by itself; this covers the time before the first
    byte, and whole non-streaming requests.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_seconds)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected; request aborted")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
