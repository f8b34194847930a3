"""The text of each token of a multi-token delta, as the engine's detokenizer gives one token at a time.

vLLM merges the outputs of several engine steps into one delta when its reader lags (a loaded machine, a busy
event loop). The controller decides at the end of a delta, so a stop that lands inside a merged delta would keep
the delta's later tokens too, and the same request would stop a token or more later under load. The embedded
backend splits such a delta back into one delta per token with this module, so the controller sees the deltas an
unloaded engine gives, whatever the load.

The split runs tokenizers' ``DecodeStream`` (the incremental decoder vLLM's own detokenizer uses), primed with the
ids just before the delta. A split is used only if its pieces add up to the delta's text exactly; otherwise (stop
strings holding text back, special-token spacing the stream does not reproduce) the delta stays whole, as before.

Invariants: ``"".join(split_text(...)) == text`` whenever the result is not None; the result has one piece per id
(a piece may be empty: a token that ends inside a multi-byte character shows nothing until the next one).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from server.backend import Chunk

log = logging.getLogger(__name__)

#: ids before the delta that prime the decoder (enough to carry a multi-byte character and the spacing of the
#: previous word; the decoder only looks back a few ids)
PRIME_IDS = 8


def split_text(
    tokenizer: Any, before: list[int], token_ids: list[int], text: str, skip_special_tokens: bool = True
) -> list[str] | None:
    """The text of each of ``token_ids`` (a delta whose text is ``text``, after the ids ``before``), or None when
    it cannot be told exactly. ``tokenizer``: a ``transformers`` fast tokenizer (its ``_tokenizer`` decodes) or a
    ``tokenizers.Tokenizer``."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "_tokenizer", None)
    if backend is None or len(token_ids) < 2:
        return None
    try:
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for token in before[-PRIME_IDS:]:  # (stepped, not prefilled: a prefill ending inside a character is kept
            stream.step(backend, token)  # back and shown again with the next id)
        pieces = [stream.step(backend, token) or "" for token in token_ids]
    except Exception:  # noqa: BLE001 - an id the decoder cannot take: the delta stays whole
        log.debug("splitting a delta by token failed", exc_info=True)
        return None
    return pieces if "".join(pieces) == text else None


def tokenizer_file(path: str) -> pathlib.Path:
    """The ``tokenizer.json`` that ``path`` names: the file itself, or the one in the folder ``path``."""
    file = pathlib.Path(path).expanduser()
    return file / "tokenizer.json" if file.is_dir() else file


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer in ``path`` (a ``tokenizer.json``, or a folder holding one); ValueError naming the path."""
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # noqa: BLE001 - a missing or unreadable file: one clear line at start
        raise ValueError(f"--tokenizer {path}: cannot load {file} ({type(error).__name__}: {error})") from None


class TokenSplitter:
    """Splits the merged deltas of one generation per token (see :func:`split_text`), keeping the ids before each.

    Invariant: :meth:`pieces` returns one text per id that join to the delta's text, or None (the delta stays
    whole); the ids before the next delta are kept either way."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._recent: list[int] = []

    def prime(self, prompt_ids: list[int] | None) -> None:
        """The prompt's last ids, before the first delta (once)."""
        if not self._recent and prompt_ids:
            self._recent = list(prompt_ids[-PRIME_IDS:])

    def pieces(self, text: str, token_ids: list[int]) -> list[str] | None:
        """One text per id when the delta splits exactly, else None (the delta stays whole)."""
        before = self._recent
        self._recent = (before + token_ids)[-PRIME_IDS:]
        if len(token_ids) < 2:
            return None
        return split_text(self._tokenizer, before, token_ids, text, self._skip)


def per_token(chunk: Chunk, splitter: TokenSplitter | None, prompt_ids: list[int] | None) -> list[Chunk]:
    """``chunk`` split into one chunk per token (the finish reason on the last) where there is a splitter and its
    text splits exactly (an engine output or upstream event that merged several steps); else ``[chunk]``."""
    if splitter is None:
        return [chunk]
    splitter.prime(prompt_ids)
    pieces = splitter.pieces(chunk.text, chunk.token_ids)
    if pieces is None:
        return [chunk]
    last = len(pieces) - 1
    return [Chunk(piece, [token], chunk.finish_reason if i == last else None)
            for i, (piece, token) in enumerate(zip(pieces, chunk.token_ids, strict=True))]  # fmt: skip
