"""Write a copy of a trace file whose questions carry an evaluation harness's instruction line.

The recorded ``question`` of a trace is the bare problem; the model saw it with an instruction line of its
evaluation harness. Replaying the copy shows what the text rule does with the user message as models see it:

    python benchmarks/harness_questions.py ../shared/data/traces/dev-probes.jsonl.gz /tmp/probes-r1.jsonl.gz --harness r1
    thinkbrake replay /tmp/probes-r1.jsonl.gz --tokenizers-root ../shared/tokenizers --split holdout \
        --policy fcs_reflection --jobs 2

Only ``question`` changes; the thinking, the reference and the split (by id) stay as they were.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from controller.offline.replay import load_traces

#: instruction lines of common evaluation harnesses, and whether they come before the question
HARNESSES: dict[str, tuple[str, bool]] = {
    # DeepSeek-R1 / Qwen2.5-Math evaluation prompt
    "r1": ("Please reason step by step, and put your final answer within \\boxed{}.", False),
    # the same with a sample answer, as some harnesses write it
    "example": ("Please reason step by step, and put your final answer within \\boxed{}, e.g., Answer: \\boxed{45}.", False),
    # Sky-T1 / SkyThought system-style prefix
    "skythought": ("Return your final response within \\boxed{}.", True),
    # lm-evaluation-harness style: an answer line to end on
    "answer_line": ("Solve the following math problem step by step. The last line of your response should be of the form "
                    "Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.", True),
}  # fmt: skip


def with_harness(question: str, harness: str) -> str:
    """``question`` as the harness sends it."""
    line, before = HARNESSES[harness]
    return f"{line}\n\n{question}" if before else f"{question}\n{line}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="trace file (.jsonl or .jsonl.gz)")
    parser.add_argument("target", help="where to write the copy (.jsonl.gz)")
    parser.add_argument("--harness", choices=sorted(HARNESSES), default="r1")
    args = parser.parse_args(argv)
    count = 0
    with gzip.open(Path(args.target), "wt", encoding="utf-8") as handle:
        for trace in load_traces([args.source]):
            trace["question"] = with_harness(str(trace.get("question") or ""), args.harness)
            handle.write(json.dumps(trace) + "\n")
            count += 1
    print(f"wrote {count} traces to {args.target} ({args.harness})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
