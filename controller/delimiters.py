"""Thinking delimiters per model family.

A :class:`Delimiters` says which text opens and closes the thinking section and whether the stream starts
inside thinking (R1-distill chat templates put ``<think>\\n`` in the prompt, so the model never emits it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Delimiters:
    """Begin/end markers of the thinking section.

    Invariant: ``start`` and ``end`` are non-empty and differ.
    """

    start: str = "<think>"
    end: str = "</think>"
    implicit_start: bool = False

    def __post_init__(self) -> None:
        if not self.start or not self.end or self.start == self.end:
            raise ValueError("thinking delimiters must be two different non-empty strings")


FAMILIES: dict[str, Delimiters] = {
    "think": Delimiters("<think>", "</think>", implicit_start=False),
    "think-implicit": Delimiters("<think>", "</think>", implicit_start=True),
    "sky-t1": Delimiters("<|begin_of_thought|>", "<|end_of_thought|>", implicit_start=False),
}


def delimiters_for(family: str) -> Delimiters:
    """Return the delimiters of a named family (``think``, ``think-implicit``, ``sky-t1``)."""
    try:
        return FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown thinking delimiter family {family!r}; known: {known}") from None


def infer_delimiters(chat_template: str | None, generation_prompt_tail: str = "") -> Delimiters:
    """Guess the delimiters from a chat template and the tail of a rendered generation prompt.

    If the rendered prompt ends inside an opened thinking section, thinking starts implicitly.
    """
    template = chat_template or ""
    for delims in (FAMILIES["sky-t1"], FAMILIES["think"]):
        if delims.start in template or delims.start in generation_prompt_tail:
            tail = generation_prompt_tail.rstrip()
            implicit = tail.endswith(delims.start)
            return Delimiters(delims.start, delims.end, implicit_start=implicit)
    return FAMILIES["think"]
