"""``thinkbrake demo``: watch thinkbrake stop an overthinking model, offline, with no weights to download.

It builds a tiny random-weight chat model (:mod:`server.demo.tiny_model`, a few seconds, cached), serves it on the
embedded vLLM engine with the scripted logits processor (:mod:`server.demo.scripted_logits`) that makes the model
"think" a written trace: it reaches 42, confirms it, then goes on re-checking for hundreds of tokens. One
streamed request with the ``openai`` client shows the stop, the answer the model writes after it, and how many
of the trace's thinking tokens were never decoded. ``--keep-serving`` leaves the server up afterwards.

The server gives every request the trace (its ``default_vllm_xargs`` carry the script) and the text rule
``fcs_reflection`` as its default policy, so a plain OpenAI request, with no thinkbrake-specific field, shows
the stop: the demo's own request is one, and so is any client's while ``--keep-serving`` runs.

Invariant: everything printed comes from the real stream (the ``thinkbrake`` object and usage of its last
chunks); the only number known beforehand is the length of the scripted thinking.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

MODEL_NAME = "tiny-r1"
PROCESSOR = "server.demo.scripted_logits:ScriptedLogitsProcessor"
QUESTION = "What is 6 * 7? Think it through, then give the answer."
THINKING = """Okay, so I need to multiply 6 by 7. Let me think. 6 * 7 means adding 6 seven times: 6 + 6 = 12, \
12 + 6 = 18, 18 + 6 = 24, 24 + 6 = 30, 30 + 6 = 36, 36 + 6 = 42. So 6 * 7 = 42.

So the answer is 42.

Wait, let me double-check this another way. 7 * 6 is 7 * 5 + 7 = 35 + 7 = 42. Yes, that gives 42 again, so the \
answer is 42.

Hmm, but let me verify once more, just to be completely sure. I could count in sevens: 7, 14, 21, 28, 35, 42. \
That is six sevens, and it ends at 42. Or I could use 6 * 7 = 6 * 10 - 6 * 3 = 60 - 18 = 42. Again 42.

Alternatively, maybe I should think about it with a rectangle of 6 rows and 7 columns. The first 5 rows hold \
35 squares, and one more row of 7 makes 42 squares. Let me also check with halves: 3 * 7 = 21, and doubling \
21 gives 42.

But wait, did I read the question right? It asks for 6 * 7, not 6 + 7 or 6 ^ 7. 6 + 7 would be 13, and that \
is not what is asked. So the product is what matters, and the product is 42.

Let me go over the addition once more, slowly: 6 + 6 is 12, plus 6 is 18, plus 6 is 24, plus 6 is 30, plus 6 \
is 36, plus 6 is 42. Seven sixes. Yes. And 7 + 7 + 7 + 7 + 7 + 7 is 14, 21, 28, 35, 42. Six sevens, 42 again.

Hmm, maybe I should also check it modulo 9: 6 * 7 = 42, and 4 + 2 = 6, while 6 * 7 = 42 means 6 * 7 mod 9 = \
42 mod 9 = 6. Consistent. Let me check modulo 5 as well: 6 mod 5 = 1, 7 mod 5 = 2, 1 * 2 = 2, and 42 mod 5 = \
2. Consistent again.
"""
ANSWER = "The product of 6 and 7 is **42**.\n\n\\boxed{42}"


def add_parser(commands: Any) -> None:
    """List ``demo`` in ``thinkbrake --help``; :func:`main` parses its arguments (see :mod:`server.cli`)."""
    commands.add_parser(
        "demo", help="see a stop in a minute: a tiny scripted model, offline, no weights", add_help=False
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinkbrake demo",
        description="Serve a tiny scripted model on the embedded vLLM engine (offline, no weights), send it one "
        "streamed question with the openai client and show where thinkbrake stopped the thinking.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--model-dir", type=pathlib.Path, default=pathlib.Path.home() / ".cache" / "thinkbrake" / "demo-model",
        help="where the tiny model is built (reused when it is there; default ~/.cache/thinkbrake/demo-model)",
    )  # fmt: skip
    parser.add_argument("--keep-serving", action="store_true", help="leave the server up after the demo request")
    parser.add_argument("--verbose", action="store_true", help="show the server's and vLLM's own log")
    return parser


def script_ids(tokenizer: Any) -> tuple[list[int], int, int]:
    """(the scripted output: thinking, ``</think>``, answer, eos), the ``</think>`` id, the thinking length."""
    from server.demo.tiny_model import THINK_END, token_id

    thinking = tokenizer.encode(THINKING, add_special_tokens=False)
    think_end = token_id(tokenizer, THINK_END)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    eos = token_id(tokenizer, str(tokenizer.eos_token))
    return [*thinking, think_end, *answer, eos], think_end, len(thinking)


def ask(base_url: str, out: Callable[[str], None]) -> dict[str, Any]:
    """Stream the demo question as any OpenAI client would (no thinkbrake-specific field); print thinking and
    answer as they arrive; return the final figures."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
    )
    info: dict[str, Any] = {}
    usage: Any = None
    answer = []
    section = ""
    for chunk in stream:
        extra = chunk.model_extra or {}
        if extra.get("thinkbrake"):
            info = extra["thinkbrake"]
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning = getattr(choice.delta, "reasoning_content", None) or ""
            if reasoning:
                if section != "thinking":
                    out("\n--- thinking (streamed) ---\n")
                    section = "thinking"
                out(reasoning)
            if choice.delta.content:
                if section != "answer":
                    out("\n--- answer ---\n")
                    section = "answer"
                out(choice.delta.content)
                answer.append(choice.delta.content)
    out("\n")
    return {"thinkbrake": info, "usage": usage, "answer": "".join(answer)}


def keep_serving_note(base_url: str, scripted_thinking: int) -> str:
    """What ``--keep-serving`` prints: the server stays up, and how to ask it from your own client."""
    return f"""
still serving model {MODEL_NAME!r} at {base_url}/v1 (Ctrl+C to stop). Every request gets the scripted 6 * 7
thinking ({scripted_thinking} tokens: what a stop at thinking_tokens saves is the rest) and policy fcs_reflection
by default, so any OpenAI client sees the stop, e.g.
  curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "What is 6 * 7?"}}]}}'
  python -c 'from openai import OpenAI; r = OpenAI(base_url="{base_url}/v1", api_key="unused").chat.completions.create(model="{MODEL_NAME}", messages=[{{"role": "user", "content": "What is 6 * 7?"}}]); print(r.choices[0].message.content, r.model_extra["thinkbrake"])'"""


def report(result: dict[str, Any], scripted_thinking: int, seconds: float) -> str:
    """The demo's summary lines."""
    info = result["thinkbrake"]
    if not info.get("stopped"):
        return f"thinkbrake did not stop this request ({info or 'no thinkbrake object'}); nothing was saved"
    thought = int(info["thinking_tokens"])
    saved = max(0, scripted_thinking - thought)
    lines = [
        f"stop: reason {info['reason']!r}, answer {info['answer']!r}, after {info['solutions']} solutions and "
        f"{thought} thinking tokens (policy {info['policy']})",
        f"answer written after the stop: {' '.join(result['answer'].split())}",
        f"tokens saved: {saved} of the trace's {scripted_thinking} thinking tokens were never decoded "
        f"({100 * saved / max(scripted_thinking, 1):.0f}%)",
    ]
    usage = result["usage"]
    if usage is not None:
        lines.append(f"usage: {usage.completion_tokens} completion tokens generated in {seconds:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    # one engine process, V1 model runner (the scripted processor's interface); vLLM quiet unless --verbose
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from server.serve_cli import quiet_vllm

    quiet_vllm(["--verbose"] if args.verbose else [])
    from server.demo.tiny_model import build_tiny_model, is_complete

    began = time.monotonic()
    if is_complete(args.model_dir):
        print(f"using the tiny demo model in {args.model_dir}", flush=True)
    else:
        print(f"building the tiny demo model (random weights, offline) in {args.model_dir} ...", flush=True)
    model_dir = build_tiny_model(args.model_dir)
    from transformers import AutoTokenizer

    script, think_end, scripted_thinking = script_ids(AutoTokenizer.from_pretrained(model_dir))
    from server.serve_cli import run
    from server.settings import Settings

    # every request gets the scripted trace; the text rule is the default policy: the default probe_fcs asks the
    # model itself, and a random-weight model's probe answers carry no confidence (its scripted tokens are forced
    # after vLLM has taken the log-probabilities)
    values: dict[str, Any] = {
        "model": str(model_dir), "served_model_name": MODEL_NAME, "host": args.host, "port": args.port,
        "logits_processors": [PROCESSOR], "kv_cache_bytes": 64 << 20, "max_model_len": 2048, "enforce_eager": True,
        "log_level": "info" if args.verbose else "warning", "policy": "fcs_reflection",
        "default_vllm_xargs": {"script": ",".join(map(str, script)), "think_end_id": think_end},
    }  # fmt: skip
    settings = Settings(**values)
    outcome: dict[str, Any] = {}

    def client(base_url: str, stop: Callable[[], None]) -> None:
        try:
            print(f"serving at {base_url}/v1 (engine ready after {time.monotonic() - began:.0f} s)", flush=True)
            print(f"question: {QUESTION}", flush=True)
            asked = time.monotonic()
            result = ask(base_url, lambda text: print(text, end="", flush=True))
            print(report(result, scripted_thinking, time.monotonic() - asked), flush=True)
            outcome["stopped"] = bool(result["thinkbrake"].get("stopped"))
            if args.keep_serving:
                print(keep_serving_note(base_url, scripted_thinking), flush=True)
                return
        except Exception as error:  # noqa: BLE001 - reported, then the server stops
            print(f"thinkbrake demo: the request failed: {type(error).__name__}: {error}", file=sys.stderr)
            outcome["stopped"] = False
        stop()

    print("starting the embedded vLLM engine (about 20-60 s on a CPU) ...", flush=True)
    code = run(settings, when_ready=client)
    if code:
        return code
    return 0 if outcome.get("stopped") or args.keep_serving else 1
