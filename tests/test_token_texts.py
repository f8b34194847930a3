"""A merged engine output is split back into one chunk per token (server/token_texts.py, server/engine.py).

The reference is what the engine's detokenizer gives one token at a time: tokenizers' ``DecodeStream`` stepped
over the whole sequence. Every way of cutting a text's ids into a merged delta must split back into exactly those
pieces, with byte-level tokens that end inside a multi-byte character (CJK, emoji) among them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from server.engine import EngineGeneration
from server.token_texts import split_text

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEXT = (
    "Okay, so 6 × 7 = 42 — 好的，答案是 42 🙂. Let me check: 7 × 6 = 42 🧮🧮 é.\n\n"
    "Wait, yes. </think>\n\nThe answer is \\boxed{42}."
)


@pytest.fixture(scope="module", params=["qwen3", "qwen2.5"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / request.param)


def one_at_a_time(tokenizer, ids: list[int], skip: bool) -> list[str]:
    stream = DecodeStream(skip_special_tokens=skip)
    return [stream.step(tokenizer._tokenizer, token) or "" for token in ids]


@pytest.mark.parametrize("skip", [False, True])
def test_every_merged_delta_splits_into_the_pieces_of_one_token_at_a_time(tokenizer, skip) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = one_at_a_time(tokenizer, ids, skip)
    assert "".join(pieces) == TEXT and "" in pieces  # (some token ends inside a character)
    for start in range(len(ids)):
        for end in range(start + 2, len(ids) + 1):
            got = split_text(tokenizer, ids[:start], ids[start:end], "".join(pieces[start:end]), skip)
            assert got == pieces[start:end], (start, end)


def test_a_text_the_pieces_do_not_make_leaves_the_delta_whole(tokenizer) -> None:
    ids = tokenizer.encode("So the answer is 42.", add_special_tokens=False)
    held_back = tokenizer.decode(ids)[:-1]  # (what a stop string holding back text gives)
    assert split_text(tokenizer, [], ids, held_back) is None
    assert split_text(tokenizer, [], ids[:1], tokenizer.decode(ids[:1])) is None  # one token: nothing to split
    assert split_text(object(), [], ids, tokenizer.decode(ids)) is None  # no fast tokenizer


def test_the_engine_generation_yields_one_chunk_per_token_whatever_the_engine_merged(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = one_at_a_time(tokenizer, ids, True)
    prompt = tokenizer.encode("What is 6 * 7?", add_special_tokens=False)
    cuts = [0, 1, 4, 5, 9, 17, 18, 30, len(ids)]  # outputs of 1, 3, 1, 4, 8, 1, 12 and the rest of the tokens

    async def generate(_prompt, _params, _request_id):
        for start, end in zip(cuts, cuts[1:], strict=False):
            finish = "stop" if end == len(ids) else None
            completion = SimpleNamespace(
                text="".join(pieces[start:end]), token_ids=ids[start:end], finish_reason=finish
            )
            yield SimpleNamespace(prompt_token_ids=prompt, num_cached_tokens=0, outputs=[completion])

    backend = SimpleNamespace(engine=SimpleNamespace(generate=generate), tokenizer=tokenizer)
    params = SimpleNamespace(skip_special_tokens=True)

    async def chunks():
        return [chunk async for chunk in EngineGeneration(backend, None, params, "r").__aiter__()]

    got = asyncio.run(chunks())
    assert [chunk.token_ids for chunk in got] == [[token] for token in ids]
    assert [chunk.text for chunk in got] == pieces
    assert [chunk.finish_reason for chunk in got] == [None] * (len(ids) - 1) + ["stop"]


def test_an_upstream_event_of_several_tokens_splits_per_token_with_a_tokenizer(tokenizer, tmp_path) -> None:
    """``serve --upstream --tokenizer PATH``: an event that carries several tokens (the upstream merged steps) is
    split like a merged engine output, primed with the prompt's last ids; without a tokenizer it stays whole."""
    from server.backend import Chunk
    from server.token_texts import TokenSplitter, load_tokenizer
    from server.upstream import per_token

    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))  # a folder with tokenizer.json, as --tokenizer takes it
    prompt = tokenizer.encode("Question: what is 6 × 7?", add_special_tokens=False)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    expected = one_at_a_time(tokenizer, prompt + ids, skip=True)[len(prompt) :]
    splitter = TokenSplitter(loaded)
    cut = len(ids) // 3
    chunks = [
        *per_token(Chunk("".join(expected[:cut]), ids[:cut]), splitter, prompt),
        *per_token(Chunk("".join(expected[cut:]), ids[cut:], "stop"), splitter, prompt),
    ]
    assert [chunk.text for chunk in chunks] == expected and [c.token_ids for c in chunks] == [[i] for i in ids]
    assert [chunk.finish_reason for chunk in chunks] == [None] * (len(ids) - 1) + ["stop"]
    whole = Chunk("".join(expected), ids)
    assert per_token(whole, None, prompt) == [whole]
    with pytest.raises(ValueError, match="cannot load"):
        load_tokenizer(str(tmp_path / "nowhere"))
