"""Where the embedded engine's model comes from, checked in well under a second before vLLM is imported.

``check_model_source(model)`` returns ``None`` when the engine can load ``model`` as far as can be told cheaply,
or one line saying why it cannot and what to pass instead:

* a local file or folder that exists: fine;
* something that looks like a path (absolute, ``./``, ``../``, ``~``, a trailing slash, or more than one ``/``:
  a hub repo id has at most one) but does not exist: an error at once, never a hub lookup;
* a hub repo id found in the local Hugging Face cache: fine (and if the hub cannot be reached, ``HF_HUB_OFFLINE``
  is set so the engine does not retry it);
* otherwise the hub is asked exactly once, with a short timeout: no answer (offline, DNS, proxy) or
  ``HF_HUB_OFFLINE`` set means an error naming the cause, instead of a minute of retries inside the engine.
"""

from __future__ import annotations

import os
import pathlib

HUB_TIMEOUT_S = 4.0
ASK_FOR_FOLDER = "pass a local model folder (thinkbrake serve /path/to/model), or run `thinkbrake demo` (no weights)"


def looks_like_path(model: str) -> bool:
    """True if ``model`` can only be meant as a file-system path (a hub repo id is ``name`` or ``owner/name``)."""
    return (
        model.startswith(("/", "./", "../", "~", "\\"))
        or model in (".", "..")
        or model.endswith("/")
        or model.count("/") > 1
        or "\\" in model
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _cached(repo_id: str) -> bool:
    """True if the local Hugging Face cache holds ``repo_id``'s config (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed repo id is simply not cached
        return False
    return isinstance(found, str)


def _ask_hub(repo_id: str) -> str | None:
    """One request to the hub: ``None`` if it answered for ``repo_id``, else why not."""
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    headers = {}
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.get(f"{endpoint}/api/models/{repo_id}", headers=headers, timeout=HUB_TIMEOUT_S)
    except httpx.HTTPError as error:
        reason = str(error) or type(error).__name__
        return f"the Hugging Face hub ({endpoint}) cannot be reached: {reason}"
    if response.status_code == 404:
        return f"the Hugging Face hub ({endpoint}) has no model {repo_id!r}"
    return None  # 200, or 401/403 for a gated model: the engine reports those itself


def check_model_source(model: str) -> str | None:
    """``None`` if ``model`` is loadable as far as a cheap check can tell, else a one-line reason; see module doc."""
    path = pathlib.Path(model).expanduser()
    if path.exists():
        return None
    if looks_like_path(model):
        return f"model {model}: no such file or directory; give the folder that holds config.json and the weights"
    if _cached(model):
        if not _truthy(os.environ.get("HF_HUB_OFFLINE")) and _ask_hub(model) is not None:
            os.environ["HF_HUB_OFFLINE"] = "1"  # use the cached copy without the engine retrying the hub
        return None
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return f"model {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {ASK_FOR_FOLDER}"
    reason = _ask_hub(model)
    if reason is None:
        return None
    return f"model {model}: {reason}, and it is not in the local cache: {ASK_FOR_FOLDER}"
