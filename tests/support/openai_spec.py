"""Validation of responses against the official OpenAI specification (``openai/openai-openapi``, OpenAPI 3.1,
``../shared/data/openai/openapi.json.gz``), with ``jsonschema`` and every ``$ref`` resolved by ``referencing``.

The file is OpenAPI 3.1 (JSON Schema 2020-12) with some OpenAPI 3.0 ``nullable: true`` left in it; those are
read as "or null" (``{"anyOf": [schema, {"type": "null"}]}``), which is what they mean.

One known flaw of the specification is patched, only for streamed completions (:data:`COMPLETION_CHUNK`):
``CreateCompletionResponse`` is documented as the shape of streamed chunks too, but its ``finish_reason`` is a
non-nullable string, while OpenAI itself sends ``"finish_reason": null`` on every chunk but a choice's last
(the specification's own ``/completions`` streaming example shows it, as does the chat chunk schema, where it is
nullable). There ``finish_reason`` may also be null; everything else is the specification as published.
"""

from __future__ import annotations

import copy
import gzip
import json
import pathlib
from collections.abc import Iterable
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "openai" / "openapi.json.gz"
SPEC_URI = "urn:openai-openapi"
PATCHED_URI = "urn:openai-openapi-stream-patched"

CHAT = "CreateChatCompletionResponse"
CHAT_CHUNK = "CreateChatCompletionStreamResponse"
COMPLETION = "CreateCompletionResponse"
#: a streamed completion chunk: ``CreateCompletionResponse`` with a nullable ``finish_reason`` (see above)
COMPLETION_CHUNK = "CreateCompletionResponse (stream chunk)"
ERROR = "ErrorResponse"
MODELS = "ListModelsResponse"


def read_nullable(node: Any) -> Any:
    """A copy of a schema tree where every ``nullable: true`` object schema accepts null too."""
    if isinstance(node, list):
        return [read_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: read_nullable(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def spec() -> dict[str, Any]:
    """The specification with ``nullable`` read as "or null"."""
    if not SPEC_PATH.is_file():
        raise FileNotFoundError(f"the OpenAI specification is missing: {SPEC_PATH} (../shared/data/openai/)")
    with gzip.open(SPEC_PATH, "rt", encoding="utf-8") as source:
        return dict(read_nullable(json.load(source)))


def stream_patched(document: dict[str, Any]) -> dict[str, Any]:
    """The specification with ``CreateCompletionResponse.choices[].finish_reason`` nullable (the one exception)."""
    patched = copy.deepcopy(document)
    choice = patched["components"]["schemas"][COMPLETION]["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    return patched


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for one component schema of the specification (or :data:`COMPLETION_CHUNK`)."""
    document = spec()
    registry: Registry[Any] = Registry().with_resources(
        [
            (SPEC_URI, Resource.from_contents(document, default_specification=DRAFT202012)),
            (PATCHED_URI, Resource.from_contents(stream_patched(document), default_specification=DRAFT202012)),
        ]
    )
    if name == COMPLETION_CHUNK:
        schema = {"$ref": f"{PATCHED_URI}#/components/schemas/{COMPLETION}"}
    else:
        if name not in document["components"]["schemas"]:
            raise KeyError(f"no schema {name!r} in the specification")
        schema = {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}
    return Draft202012Validator(schema, registry=registry)


def problems(name: str, instance: Any) -> list[str]:
    """Every way ``instance`` breaks schema ``name``: ``path: message``, empty when it is valid."""
    found = []
    for error in validator(name).iter_errors(instance):
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        reasons = sorted({item.message for item in error.context or []})  # why each anyOf branch failed
        found.append(f"{where}: {error.message}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return found


def assert_valid(name: str, instance: Any, what: str = "") -> None:
    found = problems(name, instance)
    assert not found, f"{what or 'response'} is not a valid {name}:\n" + "\n".join(found) + f"\n{instance}"


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body (``data:`` lines), ``[DONE]`` left out; asserts it ends the stream."""
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    assert data and data[-1] == "[DONE]", text[-500:]
    return [json.loads(item) for item in data[:-1]]


def assert_valid_stream(name: str, payloads: Iterable[Any], what: str = "") -> int:
    """Every chunk of a stream is a valid ``name`` (an error event a valid ``ErrorResponse``); returns the count."""
    count = 0
    for index, payload in enumerate(payloads):
        schema = ERROR if "error" in payload and "choices" not in payload else name
        assert_valid(schema, payload, f"{what} chunk {index}")
        count += 1
    return count


def assert_valid_response(response: Any, path: str, stream: bool) -> Any:
    """An ``httpx.Response`` of a generation endpoint, checked whole: an error body against ``ErrorResponse``,
    a body or every SSE chunk against the schema for ``path``; returns the JSON (a list of chunks if streamed)."""
    if response.status_code != 200:
        assert_valid(ERROR, response.json(), f"{path} {response.status_code}")
        return response.json()
    chat = path.endswith("chat/completions")
    if stream:
        chunks = sse_payloads(response.text)
        assert_valid_stream(CHAT_CHUNK if chat else COMPLETION_CHUNK, chunks, path)
        return chunks
    assert_valid(CHAT if chat else COMPLETION, response.json(), path)
    return response.json()
