"""Build a tiny random-weight Qwen2 chat model with an R1-style chat template.

The model is for the demo and the tests: its weights are random, so its own output is noise;
they steer it with :mod:`server.demo.scripted_logits`. Everything is made
offline in a few seconds and is deterministic (fixed seed, fixed corpus).

Invariants of a built directory:

* ``config.json`` + ``model.safetensors``: ``Qwen2ForCausalLM``, hidden 128,
  4 heads (head_dim 32, the CPU attention minimum), 2 layers, bfloat16, tied
  embeddings; ``vocab_size == len(tokenizer)`` so every id the model can sample
  decodes to text.
* A byte-level BPE tokenizer (any text round-trips through encode/decode) in
  ``tokenizer.json`` + ``tokenizer_config.json``, loadable by
  ``transformers.AutoTokenizer`` and by vLLM.
* ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` are special tokens;
  ``<think>`` and ``</think>`` are added but non-special tokens (like Qwen3), so
  they survive ``skip_special_tokens`` and reasoning parsers find them. Each of
  the five encodes to exactly one id.
* eos is ``<|im_end|>``; the chat template's generation prompt ends with
  ``<|im_start|>assistant\\n<think>\\n`` (the stream starts inside thinking).
* A ``.complete`` marker holding :data:`RECIPE` is written last; a directory
  with a matching marker is reused as is.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
THINK_START = "<think>"
THINK_END = "</think>"

SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
THINK_TOKENS = (THINK_START, THINK_END)

#: Bump when anything below changes, so cached directories get rebuilt.
RECIPE = "thinkbrake-tiny-qwen2-v3"
SEED = 1234
VOCAB_SIZE = 1024
COMPLETE_MARKER = ".complete"
#: The pre-tokenizer split of Qwen2/Qwen3 tokenizers (``transformers.Qwen2Tokenizer``).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- endif -%}"
)

TRAINING_TEXT = """\
Okay, so I need to figure out how many apples are left. Let me start by reading
the problem again. Sarah has 12 apples and gives 5 to her friend. Then she buys
7 more. Hmm, wait, let me check that. 12 - 5 = 7, and 7 + 7 = 14. So the answer
should be 14. But let me verify this step by step to make sure I did not make a
mistake. First, 12 minus 5 is 7. Second, 7 plus 7 is 14. Yes, that seems right.

Alternatively, I could think about it differently. The total change is -5 + 7 = 2,
so 12 + 2 = 14. Both methods give the same result, which is reassuring.

Now let us solve the equation 3x + 4 = 19. Subtract 4 from both sides: 3x = 15.
Divide both sides by 3: x = 5. Let me double-check: 3 * 5 + 4 = 15 + 4 = 19.
Correct. What about x^2 - 5x + 6 = 0? It factors as (x - 2)(x - 3) = 0, so
x = 2 or x = 3. The sum of the roots is 5 and the product is 6, which matches
Vieta's formulas.

Wait, maybe I should consider the edge cases. If the number is negative, the
square root is not a real number. If the denominator is zero, the fraction is
undefined. Therefore the domain excludes those values. I think that covers it.

The area of a circle with radius r is pi * r^2. For r = 3 the area is 9 * pi,
which is about 28.27. The circumference is 2 * pi * r = 6 * pi, about 18.85.
A right triangle with legs 3 and 4 has a hypotenuse of 5, because 9 + 16 = 25.
The probability of rolling two sixes with fair dice is 1/36. The derivative of
x^3 is 3x^2, and the integral of 2x dx is x^2 + C. The limit of 1/n as n goes to
infinity is 0. The greatest common divisor of 48 and 18 is 6, and their least
common multiple is 144. A prime number has exactly two divisors: 1 and itself.
The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47.

So, putting it all together, the final answer is \\boxed{14}. The answer is 42.
Therefore, the result is correct. In summary, we computed the value carefully,
checked each step, and confirmed the answer. I am confident in this solution.

The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
Please explain your reasoning. Think carefully before you answer the question.
You are a helpful assistant. The user asked a question about mathematics and
the assistant answered it with a clear explanation and a short final answer.
Thinking too long wastes time and money; a good reasoner knows when to stop.
def add(a, b):
    return a + b
{"role": "user", "content": "What is 2 + 2?"} -> 4. 0 1 2 3 4 5 6 7 8 9 10 100 1000
"""


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of ``token``, which must be a single token of ``tokenizer``."""
    value = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(value, int):
        raise TypeError(f"{token!r} maps to {value!r}, not one id")
    return value


def is_complete(directory: pathlib.Path) -> bool:
    """True iff ``directory`` holds a finished build of the current :data:`RECIPE`."""
    marker = directory / COMPLETE_MARKER
    return marker.is_file() and marker.read_text() == RECIPE


def build_tiny_model(directory: pathlib.Path) -> pathlib.Path:
    """Make (or reuse) the tiny chat model in ``directory`` and return ``directory``.

    Idempotent and safe against concurrent builders: the model is built in a
    sibling temporary directory and renamed into place; a stale or partial
    ``directory`` is replaced. Output is identical for every call (seeded).
    """
    directory = pathlib.Path(directory)
    if is_complete(directory):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    staging.chmod(0o755)
    try:
        _write_model(staging)
        _install(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _install(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Move a finished build into place unless another builder already did."""
    if directory.exists() and not is_complete(directory):
        shutil.rmtree(directory, ignore_errors=True)
    try:
        os.rename(staging, directory)
    except OSError:
        if not is_complete(directory):
            raise


def _write_model(target: pathlib.Path) -> None:
    """Write tokenizer, weights and configs into ``target``; marker last."""
    tokenizer = _make_tokenizer()
    tokenizer.save_pretrained(target)
    _make_model(tokenizer).save_pretrained(target)
    (target / COMPLETE_MARKER).write_text(RECIPE)


def _train_bpe() -> Tokenizer:
    """Train the byte-level BPE ``tokenizers.Tokenizer`` on :data:`TRAINING_TEXT`.

    The pipeline (NFC normalizer, Qwen2 split regex, byte-level without regex) is
    exactly the one ``transformers.Qwen2Tokenizer`` rebuilds on load, so the raw
    ``tokenizer.json``, ``AutoTokenizer`` and vLLM all produce the same ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(THINK_TOKENS),
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer)
    return tokenizer


def _make_tokenizer() -> PreTrainedTokenizerBase:
    """Wrap the trained BPE as a transformers tokenizer with chat template."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe()
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    for token in SPECIAL_TOKENS + THINK_TOKENS:
        if tokenizer.encode(token, add_special_tokens=False) != [token_id(tokenizer, token)]:
            raise RuntimeError(f"{token!r} is not a single token")
    return tokenizer


def _make_model(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A seeded random-weight ``Qwen2ForCausalLM`` sized for ``tokenizer``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id = token_id(tokenizer, IM_END)
    pad_id = token_id(tokenizer, END_OF_TEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="bfloat16",
    )
    with torch.random.fork_rng():  # seeded without touching the caller's RNG state
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]
    model.bfloat16()
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    return model


def describe(directory: pathlib.Path) -> dict[str, object]:
    """Small summary of a built model (sizes, ids) for logs and debugging."""
    config = json.loads((pathlib.Path(directory) / "config.json").read_text())
    files = {p.name: p.stat().st_size for p in pathlib.Path(directory).iterdir()}
    return {"vocab_size": config["vocab_size"], "files": files}
