"""Test helpers.

The tiny model builder and the scripted logits processor live in the package (``server.tiny_model``,
``server.scripted_logits``) so ``thinkbrake demo`` and the engine's worker import them without ``tests`` on the
path. Their old names, ``tests.support.tiny_model`` and ``tests.support.scripted_logits``, stay importable (also
as ``--logits-processors tests.support.scripted_logits:ScriptedLogitsProcessor``): importing an old name gives
the package's module object itself. The alias is resolved on import only, so importing ``tests.support`` does
not import vLLM.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

MOVED = {f"{__name__}.scripted_logits": "server.scripted_logits", f"{__name__}.tiny_model": "server.tiny_model"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module at its new place (the same object)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        """The module already ran under its new name."""


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
