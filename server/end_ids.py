"""Where the end-of-thinking delimiter ends inside a multi-token chunk, from token ids.

The backend merges tokens into one chunk when its reader lags, so the tokens after the end tag can arrive in the
same chunk as the tag; the controller counts them as answer tokens when told how many come through the tag.

Invariants: the delimiter's ids are asked of the backend at most once per choice (a backend that cannot encode
is not asked again) and shared by the server's requests once known; a failure to encode is no error (the whole
chunk then counts as thinking).
"""

from __future__ import annotations

import logging

from server.backend import Backend, Chunk, tokens_through

log = logging.getLogger(__name__)


class EndOfThinking:
    """The end delimiter ``end`` of one choice; ``shared``: delimiter -> ids, shared by the server's requests."""

    def __init__(self, backend: Backend, end: str, shared: dict[str, list[int]]) -> None:
        self._backend = backend
        self._end = end
        self._shared = shared
        self._asked = False

    async def through_end(self, chunk: Chunk, generated: list[int]) -> int | None:
        """How many of a multi-token ``chunk``'s tokens, read while the thinking is open, come up to and including
        the delimiter's ids; None when unknown or not there. ``generated``: the ids before the chunk."""
        end = self._end
        if not end or end[-1] not in chunk.text:
            return None
        end_ids = await self._ids()
        return None if end_ids is None else tokens_through(end_ids, generated, chunk.token_ids)

    async def _ids(self) -> list[int] | None:
        shared, end = self._shared, self._end
        if end not in shared and not self._asked:
            self._asked = True
            try:
                encoded = await self._backend.encode(end)
            except Exception:  # noqa: BLE001 - without the ids the whole chunk counts as thinking, as before
                log.debug("encoding the end-of-thinking delimiter failed", exc_info=True)
                encoded = None
            if encoded:
                shared[end] = list(encoded)
        return shared.get(end)
