"""Tests of the real-engine test support: tiny model, scripted logits, engine counters.

Tests marked ``engine`` start a real vLLM CPU engine (in process, or the OpenAI
server as a subprocess); the others are fast unit tests of the same helpers.

The fixtures are imported here until ``tests/conftest.py`` loads
``tests.support.fixtures``; F811 is pytest's fixture-argument pattern.
"""
# ruff: noqa: F811

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from server.backend import PROBE_MARKER
from server.demo.scripted_logits import ScriptedLogitsProcessor
from server.demo.tiny_model import (
    COMPLETE_MARKER,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_TOKENS,
    build_tiny_model,
)
from tests.support.engine_metrics import (
    GENERATION_TOKENS,
    PROMPT_TOKENS_CACHED,
    counter_value,
    metrics_text_value,
    wait_for_counter,
)
from tests.support.fixtures import (  # noqa: F401  (pytest fixtures)
    BLOCK_SIZE,
    chat_prompt_ids,
    openai_server,
    script_ids,
    scripted_extra_args,
    think_end_id,
    tiny_engine,
    tiny_model_dir,
    tiny_tokenizer,
)

QUESTION = "What is 17 * 3?"
THINKING = (
    "Okay, so I need to compute 17 * 3. Let me think. 17 * 3 = 51. "
    "Wait, let me double-check: 10 * 3 = 30 and 7 * 3 = 21, so 30 + 21 = 51. Yes.\n"
)
ANSWER = "\n\nThe answer is **51**."
#: A long reasoning trace, so an abort lands well before its end.
LONG_THINKING = THINKING * 25


def engine_test(function):
    """Mark ``function`` as an engine test running on the module's event loop."""
    return pytest.mark.engine(pytest.mark.asyncio(loop_scope="module")(function))


def delta_params(extra_args: dict, max_tokens: int = 1500) -> SamplingParams:
    """Streaming (DELTA) sampling params with the given ``extra_args``."""
    return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, extra_args=extra_args)


async def collect(engine, prompt_ids: list[int], params: SamplingParams, request_id: str):
    """Run one request to the end; return (text, token ids, last RequestOutput)."""
    text, token_ids, last = "", [], None
    async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
        text += output.outputs[0].text
        token_ids += output.outputs[0].token_ids
        last = output
    return text, token_ids, last


async def stream_then_abort(engine, prompt_ids, params, request_id: str, after: int):
    """Stream a request, abort it once ``after`` tokens arrived; return (ids, last output)."""
    token_ids, last = [], None
    async for output in engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
        token_ids += output.outputs[0].token_ids
        last = output
        if len(token_ids) >= after and not output.finished:
            await engine.abort(request_id)
    return token_ids, last


# --- tiny model ------------------------------------------------------------------


def test_tiny_model_tokens_and_template(tiny_model_dir, tiny_tokenizer):
    for token in SPECIAL_TOKENS + THINK_TOKENS:
        ids = tiny_tokenizer.encode(token, add_special_tokens=False)
        assert ids == [tiny_tokenizer.convert_tokens_to_ids(token)], token
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    prompt = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    text = "Ünïcode 🙂, tabs\tand  spaces\n" + THINKING + THINK_END + ANSWER
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text, add_special_tokens=False)) == text
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 2 << 20


def test_build_tiny_model_reuses_complete_directory(tiny_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    assert build_tiny_model(tiny_model_dir) == tiny_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_build_tiny_model_is_deterministic(tmp_path, tiny_model_dir):
    fresh = build_tiny_model(tmp_path / "model")
    assert (fresh / COMPLETE_MARKER).exists()
    for path in tiny_model_dir.iterdir():
        assert (fresh / path.name).read_bytes() == path.read_bytes(), path.name


def test_script_ids_decode_to_script_text(tiny_tokenizer):
    ids = script_ids(tiny_tokenizer, THINKING, ANSWER)
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert ids.count(think_end_id(tiny_tokenizer)) == 1
    assert tiny_tokenizer.decode(ids[:-1]) == THINKING + THINK_END + ANSWER


# --- scripted logits processor, without an engine --------------------------------


def make_processor(eos_id: int = 2) -> ScriptedLogitsProcessor:
    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(eos_token_id=eos_id)))
    return ScriptedLogitsProcessor(config, device="cpu", is_pin_memory=False)


def forced(processor: ScriptedLogitsProcessor, batch_size: int, vocab: int = 16) -> list[int | None]:
    """Forced token per row (None where the row was left untouched)."""
    import torch

    logits = processor.apply(torch.zeros(batch_size, vocab))
    result = []
    for row in logits:
        finite = torch.isfinite(row).nonzero().flatten().tolist()
        result.append(None if len(finite) == vocab else finite[0] if len(finite) == 1 else "bad")
    return result


def test_processor_forces_script_then_eos_and_tracks_rows():
    processor = make_processor(eos_id=2)
    out_a, out_b, out_c = [], [], []
    script = SamplingParams(extra_args={"script": [5, 6, 9, 7, 2], "think_end_id": 9})
    processor.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[
                (0, script, [1, 3], out_a),
                (1, SamplingParams(), [1, 3], out_b),
                (2, SamplingParams(extra_args={"script": "7, 8"}), [1, 9], out_c),
            ],
            moved=[],
        )
    )
    assert forced(processor, 3) == [5, None, 7]
    out_a += [5, 6, 9, 7, 2]
    out_c += [7, 8]
    assert forced(processor, 3) == [2, None, 2]  # past the end: eos
    processor.update_state(BatchUpdate(batch_size=2, removed=[2], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert forced(processor, 2) == [None, 2]


def test_processor_continuation_starts_after_think_end():
    processor = make_processor()
    extra = {"script": [5, 6, 9, 7, 8, 2], "think_end_id": 9}
    processor.update_state(
        BatchUpdate(
            batch_size=2,
            removed=[],
            added=[
                (0, SamplingParams(extra_args=extra), [1, 5, 9], []),
                (1, SamplingParams(extra_args={**extra, "script": [5, 6, 2]}), [1, 9], []),
            ],
            moved=[],
        )
    )
    assert forced(processor, 2) == [7, 2]


def test_processor_probe_gets_its_own_script():
    processor = make_processor(eos_id=2)
    extra = {"script": [5, 6, 9, 7, 2], "think_end_id": 9, "probe_script": [11, 12]}
    probe_out: list[int] = []
    processor.update_state(
        BatchUpdate(
            batch_size=3,
            removed=[],
            added=[
                (0, SamplingParams(extra_args=extra), [1, 3], []),
                (1, SamplingParams(extra_args={**extra, PROBE_MARKER: 0}), [1, 3, 5, 6, 13], probe_out),
                (2, SamplingParams(extra_args={"script": [5, 6], PROBE_MARKER: 1}), [1, 3, 5, 13], []),
            ],
            moved=[],
        )
    )
    # the main request follows its script; a probe its probe script; a probe without one ends at once
    assert forced(processor, 3) == [5, 11, 2]
    probe_out += [11, 12]
    assert forced(processor, 3) == [5, 2, 2]


@pytest.mark.parametrize(
    "extra_args",
    [
        {"script": "1,x"},
        {"script": [1, 2.5]},
        {"script": [-1]},
        {"script": 7},
        {"script": [1], "think_end_id": "y"},
        {"script": [1], "probe_script": "1,z"},
    ],
)
def test_processor_rejects_malformed_args(extra_args):
    with pytest.raises(ValueError):
        ScriptedLogitsProcessor.validate_params(SamplingParams(extra_args=extra_args))


# --- real engine, OpenAI server (before the in-process engine starts: lower peak memory) ---


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.engine
def test_openai_server_scripted_via_vllm_xargs(tiny_model_dir, tiny_tokenizer, tmp_path):
    script = script_ids(tiny_tokenizer, LONG_THINKING[:400], ANSWER)
    end = think_end_id(tiny_tokenizer)
    model = str(tiny_model_dir)
    log = tmp_path / "server.log"
    with openai_server(tiny_model_dir, "--reasoning-parser", "deepseek_r1", log_path=log) as url:
        for script_arg in (script, ",".join(map(str, script))):  # JSON list, or scalar string
            body = {
                "model": model,
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 1000,
                "vllm_xargs": {"script": script_arg, "think_end_id": end},
            }
            choice = post_json(f"{url}/v1/chat/completions", body)["choices"][0]
            assert choice["message"]["reasoning"] == LONG_THINKING[:400]
            assert choice["message"]["content"] == ANSWER
        partial = chat_prompt_ids(tiny_tokenizer, QUESTION) + script[: 2 * BLOCK_SIZE] + [end]
        xargs = {"script": script, "think_end_id": end}
        body = {"model": model, "prompt": partial, "max_tokens": 100, "vllm_xargs": xargs}
        assert post_json(f"{url}/v1/completions", body)["choices"][0]["text"] == ANSWER
        with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
            metrics = response.read().decode()
    answer_len = len(script) - script.index(end) - 1
    assert metrics_text_value(metrics, GENERATION_TOKENS) == 2 * len(script) + answer_len
    assert metrics_text_value(metrics, PROMPT_TOKENS_CACHED) >= BLOCK_SIZE


# --- real engine, in process -----------------------------------------------------


@engine_test
async def test_engine_streams_the_script(tiny_engine, tiny_tokenizer):
    script = script_ids(tiny_tokenizer, THINKING, ANSWER)
    params = delta_params(scripted_extra_args(tiny_tokenizer, script))
    prompt = chat_prompt_ids(tiny_tokenizer, QUESTION)
    text, token_ids, last = await collect(tiny_engine, prompt, params, "stream")
    assert token_ids == script
    assert text == THINKING + THINK_END + ANSWER
    assert last.outputs[0].finish_reason == "stop"


@engine_test
async def test_engine_leaves_unscripted_requests_alone(tiny_engine, tiny_tokenizer):
    prompt = chat_prompt_ids(tiny_tokenizer, QUESTION)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    _, token_ids, last = await collect(tiny_engine, prompt, params, "free")
    assert len(token_ids) == 8 and last.outputs[0].finish_reason == "length"


@engine_test
async def test_engine_abort_mid_stream(tiny_engine, tiny_tokenizer):
    script = script_ids(tiny_tokenizer, LONG_THINKING, ANSWER)
    params = delta_params(scripted_extra_args(tiny_tokenizer, script))
    prompt = chat_prompt_ids(tiny_tokenizer, QUESTION)
    token_ids, last = await stream_then_abort(tiny_engine, prompt, params, "abort", after=20)
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert 20 <= len(token_ids) < len(script)
    assert token_ids == script[: len(token_ids)]
    # the engine keeps serving
    tail = delta_params(scripted_extra_args(tiny_tokenizer, script[-3:]))
    _, again, _ = await collect(tiny_engine, prompt, tail, "after-abort")
    assert again == script[-3:]


@engine_test
async def test_engine_continuation_hits_prefix_cache(tiny_engine, tiny_tokenizer):
    script = script_ids(tiny_tokenizer, LONG_THINKING, ANSWER)
    extra = scripted_extra_args(tiny_tokenizer, script)
    prompt = chat_prompt_ids(tiny_tokenizer, "Continue: " + QUESTION)
    params = delta_params(extra)
    generated, _ = await stream_then_abort(tiny_engine, prompt, params, "first", after=3 * BLOCK_SIZE)
    continuation = prompt + generated + [think_end_id(tiny_tokenizer)]
    text, token_ids, last = await collect(tiny_engine, continuation, delta_params(extra), "continue")
    answer_ids = script[script.index(think_end_id(tiny_tokenizer)) + 1 :]
    assert token_ids == answer_ids
    assert text == ANSWER
    assert last.outputs[0].finish_reason == "stop"
    # every full block of prompt + generated tokens whose KV was computed is reused
    computed = len(prompt) + len(generated) - 1
    assert last.num_cached_tokens >= computed // BLOCK_SIZE * BLOCK_SIZE > len(prompt)


@engine_test
async def test_engine_generation_token_counter(tiny_engine, tiny_tokenizer):
    script = script_ids(tiny_tokenizer, THINKING, ANSWER)
    prompt = chat_prompt_ids(tiny_tokenizer, QUESTION)
    params = delta_params(scripted_extra_args(tiny_tokenizer, script))
    before = counter_value(GENERATION_TOKENS)
    _, token_ids, _ = await collect(tiny_engine, prompt, params, "count")
    after = await wait_for_counter(before + len(script))
    assert after - before == len(token_ids) == len(script)

    long_script = script_ids(tiny_tokenizer, LONG_THINKING, ANSWER)
    params = delta_params(scripted_extra_args(tiny_tokenizer, long_script))
    before = counter_value(GENERATION_TOKENS)
    received, _ = await stream_then_abort(tiny_engine, prompt, params, "count-abort", after=10)
    after = await wait_for_counter(before + len(received))
    # counts tokens the engine decoded and delivered before the abort was seen
    assert len(received) <= after - before < len(long_script)


@engine_test
async def test_a_merged_engine_output_reaches_the_server_one_token_at_a_time(tiny_engine, tiny_tokenizer):
    """A reader that lags gets several engine steps merged into one output (vLLM's output collector); the
    embedded backend splits it back into one chunk per token with the text each token gives on its own. The lag is
    made, not hoped for: after the first chunk the reader waits until the engine has decoded 10 tokens past the
    first output."""
    from tokenizers.decoders import DecodeStream

    from server.engine import EngineGeneration

    script = script_ids(tiny_tokenizer, THINKING, ANSWER)
    params = delta_params(scripted_extra_args(tiny_tokenizer, script))
    prompt = chat_prompt_ids(tiny_tokenizer, QUESTION)
    tokenizer = tiny_engine.get_tokenizer()
    raw_sizes: list[int] = []

    def generate(*args):
        async def outputs():
            async for output in tiny_engine.generate(*args):
                raw_sizes.append(len(output.outputs[0].token_ids))
                yield output

        return outputs()

    backend = SimpleNamespace(engine=SimpleNamespace(generate=generate), tokenizer=tokenizer)
    generation = EngineGeneration(backend, TokensPrompt(prompt_token_ids=prompt), params, "merged")
    chunks = []
    before = counter_value(GENERATION_TOKENS)
    async for chunk in generation:
        chunks.append(chunk)
        if len(chunks) == 1:
            # the first output may already carry several tokens (the reader started late): wait for 10 beyond it
            target = before + raw_sizes[0] + 10
            assert await wait_for_counter(target) >= target
    assert max(raw_sizes[1:]) >= 10  # the engine did merge the steps the reader missed
    assert [chunk.token_ids for chunk in chunks] == [[token] for token in script]
    stream = DecodeStream(ids=prompt, skip_special_tokens=params.skip_special_tokens)
    assert [chunk.text for chunk in chunks] == [stream.step(tokenizer._tokenizer, token) or "" for token in script]
    assert "".join(chunk.text for chunk in chunks) == THINKING + THINK_END + ANSWER
