"""``thinkbrake demo`` and what it runs on: a tiny random-weight chat model (:mod:`server.demo.tiny_model`) that a
vLLM logits processor (:mod:`server.demo.scripted_logits`, loaded by the engine as
``server.demo.scripted_logits:ScriptedLogitsProcessor``) makes "think" a written trace. The tests use the same
model and processor. Nothing here is imported by the serving path.
"""

from server.demo.command import add_parser, main

__all__ = ["add_parser", "main"]
