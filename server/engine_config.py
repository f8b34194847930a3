"""vLLM engine arguments for ``thinkbrake serve``: vLLM's own flag definitions, CPU defaults, clear start errors.

* :func:`add_vllm_arguments` adds every flag ``vllm serve`` takes for its engine (``AsyncEngineArgs.add_cli_args``,
  so ``--gpu-memory-utilization``, ``--max-model-len``, ``--tensor-parallel-size``, ``--kv-cache-memory-bytes``,
  ``--enable-prefix-caching``, ``--reasoning-parser``, ``--help=CacheConfig``... behave as they do there) and
  returns their destinations. :func:`given_engine_args` returns only the ones given on the command line.
* :func:`cpu_kv_cache_bytes`: on the CPU platform, unless ``--kv-cache-memory-bytes``, ``--gpu-memory-utilization``
  or ``VLLM_CPU_KVCACHE_SPACE`` says otherwise, the KV cache is sized from free memory (a quarter of it, at most
  4 GiB) instead of vLLM's "92% of all memory", which fails on any machine that runs anything else; and without
  ``--max-model-len`` the context is cut to what that cache holds.
* :func:`explain_start_failure`: one line naming the cause and the flag to change.

Only this module and :mod:`server.engine` import vLLM, and only when the embedded engine is used.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)

GiB = 1 << 30
CPU_KV_FRACTION = 0.25
CPU_KV_MAX_BYTES = 4 * GiB
CPU_KV_MIN_BYTES = 64 << 20
#: vLLM flags thinkbrake defines itself (same meaning, but its own defaults and THINKBRAKE_* variables)
OWN_FLAGS = ("--model", "--log-level")
#: vLLM destinations that map onto thinkbrake settings (so THINKBRAKE_* variables keep working for them)
SETTING_DESTS = {
    "served_model_name": "served_model_name",
    "max_model_len": "max_model_len",
    "kv_cache_memory_bytes": "kv_cache_bytes",
    "logits_processors": "logits_processors",
    "enforce_eager": "enforce_eager",
}


class Unset:
    """Marks a vLLM flag that was not given (argparse leaves a namespace attribute alone if it exists)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET = Unset()


def add_vllm_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Add vLLM's engine flags to ``parser`` (before thinkbrake's own); return their destinations."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    before = {id(action) for action in parser._actions}
    AsyncEngineArgs.add_cli_args(parser)  # type: ignore[arg-type]
    dests = []
    for action in parser._actions:
        if id(action) in before or action.dest in (argparse.SUPPRESS, "help"):
            continue
        if any(flag in OWN_FLAGS for flag in action.option_strings):
            continue
        dests.append(action.dest)
    return dests


def unset_namespace(dests: list[str]) -> argparse.Namespace:
    """A namespace on which argparse records only the flags actually given."""
    return argparse.Namespace(**dict.fromkeys(dests, UNSET))


def given_engine_args(namespace: argparse.Namespace, dests: list[str]) -> dict[str, Any]:
    """The vLLM engine arguments given on the command line, by destination."""
    values = {dest: getattr(namespace, dest, UNSET) for dest in dests}
    return {dest: value for dest, value in values.items() if value is not UNSET}


def cpu_kv_cache_bytes(available_bytes: int) -> int:
    """The default KV cache on CPU: a quarter of the free memory, between 64 MiB and 4 GiB."""
    return int(max(CPU_KV_MIN_BYTES, min(CPU_KV_MAX_BYTES, available_bytes * CPU_KV_FRACTION)))


def memory() -> tuple[int, int]:
    """(total, available) bytes as vLLM's CPU worker counts them: its memory node, within the cgroup limit."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        node = get_memory_node_info(get_allowed_cpu_list()[0].numa_node)
        return int(node.total_memory), int(node.available_memory)
    except Exception:  # noqa: BLE001 - another vLLM layout: the whole machine's figures
        import psutil

        machine = psutil.virtual_memory()
        return int(machine.total), int(machine.available)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cpu_default_kv_bytes(args: dict[str, Any]) -> int | None:
    """The KV cache size to use on CPU when ``args`` (``AsyncEngineArgs`` keywords) and the environment say
    nothing about memory; None when they do, or on another platform."""
    said = (
        args.get("kv_cache_memory_bytes") is not None
        or "gpu_memory_utilization" in args
        or os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") != ""
    )
    if said or not on_cpu():
        return None
    _, available = memory()
    size = cpu_kv_cache_bytes(available)
    log.info(
        "KV cache: %.2f GiB (CPU default: a quarter of the %.1f GiB free, at most 4 GiB; "
        "--kv-cache-memory-bytes or --gpu-memory-utilization to change)",
        size / GiB,
        available / GiB,
    )
    return size


def check_cpu_memory(args: dict[str, Any]) -> None:
    """Raise the clear error vLLM's CPU worker would raise later (in its own process, inside a long traceback)
    when ``--gpu-memory-utilization`` asks for more memory than is free."""
    fraction = args.get("gpu_memory_utilization")
    if fraction is None or args.get("kv_cache_memory_bytes") is not None or not on_cpu():
        return
    total, available = memory()
    if total * float(fraction) > available:
        raise ValueError(
            f"Available memory on node 0 ({available / GiB:.2f}/{total / GiB:.2f} GiB) is less than "
            f"desired CPU memory utilization ({fraction}); decrease `--gpu-memory-utilization`"
        )


def kv_bytes_per_token(vllm_config: Any) -> int:
    """Bytes of KV cache one token takes (all layers, keys and values), from the model's configuration."""
    import torch

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = model.dtype if cache_dtype in (None, "auto") else torch.uint8 if "fp8" in str(cache_dtype) else model.dtype
    element = torch.tensor([], dtype=dtype).element_size()
    per_layer = 2 * model.get_num_kv_heads(parallel) * model.get_head_size() * element
    return int(per_layer * model.get_num_layers(parallel))


def fit_context(kv_cache_bytes: int, vllm_config: Any) -> int | None:
    """A context length (a multiple of 1024, at least 1024) whose one sequence fits ``kv_cache_bytes``, if the
    model's full context does not; else None. vLLM refuses to start when one full-context sequence does not fit,
    so a smaller default cache comes with a smaller default context."""
    per_token = kv_bytes_per_token(vllm_config)
    fits = kv_cache_bytes // max(per_token, 1)
    current = int(vllm_config.model_config.max_model_len)
    if fits >= current:
        return None
    return max(1024, fits // 1024 * 1024)


def explain_start_failure(error: BaseException, model: str) -> str:
    """One line: what failed and which flag to change (the traceback is logged at debug level)."""
    text = " ".join(str(error).split())
    cause = error.__cause__ or error.__context__
    while cause is not None and not text:
        text = " ".join(str(cause).split())
        cause = cause.__cause__ or cause.__context__
    if "Available memory on node" in text and "--gpu-memory-utilization" in text:
        found = re.search(r"\(([\d.]+)/([\d.]+) GiB\)", text)
        free = f" ({found.group(1)} of {found.group(2)} GiB free)" if found else ""
        return (
            f"not enough free memory{free} for the --gpu-memory-utilization fraction vLLM reserves on CPU: "
            "lower --gpu-memory-utilization (e.g. 0.3), or give the KV cache size with --kv-cache-memory-bytes "
            "(e.g. 2G), or leave both out for the CPU default"
        )
    if "Available memory on node" in text and "kv cache" in text.lower():
        return f"the KV cache does not fit in free memory ({text[:200]}): lower --kv-cache-memory-bytes"
    if "max seq len" in text and "KV cache" in text:
        found = re.search(r"estimated maximum model length is (\d+)", text)
        hint = f" (at most {found.group(1)} fits)" if found else ""
        return (
            f"the KV cache cannot hold one sequence of the model's context: lower --max-model-len{hint} "
            "or raise --kv-cache-memory-bytes"
        )
    if "max_model_len" in text or "max-model-len" in text:
        return f"--max-model-len: {text[:300]}"
    if any(word in text for word in ("Repo id", "huggingface", "HfHub", "does not appear to have", "not a valid")):
        return f"could not load model {model!r}: {text[:300]}; pass a local model folder"
    first = text[:400] or type(error).__name__
    return f"the engine failed to start: {type(error).__name__}: {first} (--log-level debug shows the traceback)"
