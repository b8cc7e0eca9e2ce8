"""Old module paths that keep working for one release after the package's layout move, with a warning.

``import magpie_hf.task_prompts`` (or ``from magpie_hf.layout import RunLayout``) still works: a finder on
``sys.meta_path`` answers for each path in :data:`MOVED_MODULES`, warns with a ``DeprecationWarning`` that names
the new path, and hands back the module that now lives there (for a module whose contents went to several
places, a read-only view over them). Nothing of the old layout is left as a file.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     import magpie_hf.labels
    >>> import magpie_hf.prompts.labels
    >>> magpie_hf.labels is magpie_hf.prompts.labels
    True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED_MODULES", "install"]

#: old module path -> where its contents live now (the first one is its main home)
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "magpie_hf.runner": ("magpie_hf.executors.runner",),
    "magpie_hf.layout": ("magpie_hf.executors.layout",),
    "magpie_hf.progress": ("magpie_hf.executors.progress",),
    "magpie_hf.constrained": ("magpie_hf.engines.constrained",),
    "magpie_hf.postprocess": ("magpie_hf.steps.postprocess",),
    "magpie_hf.task_prompts": ("magpie_hf.prompts.tasks", "magpie_hf.steps.task_control"),
    "magpie_hf.languages": ("magpie_hf.prompts.languages",),
    "magpie_hf.labels": ("magpie_hf.prompts.labels",),
    "magpie_hf.redaction": ("magpie_hf.utils.redaction",),
    "magpie_hf.embedded": ("magpie_hf.utils.embedded",),
    "magpie_hf.logs": ("magpie_hf.utils.logs",),
    "magpie_hf.config": ("magpie_hf.recipe.arguments", "magpie_hf.recipe.parser"),
    "magpie_hf.cli_config": ("magpie_hf.recipe.parser",),
    "magpie_hf.recipes_cli": ("magpie_hf.cli.recipes",),
    "magpie_hf.hub.cli": ("magpie_hf.cli.push", "magpie_hf.hub.publishing"),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED_MODULES` and loads them as their new modules, warning once per import."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = MOVED_MODULES[spec.name]
        # stacklevel 2 is the importing line: the warnings module skips importlib's own frames
        warnings.warn(
            f"{spec.name} moved to {' and '.join(homes)}; import it from there (the old path goes in the next release).",
            DeprecationWarning,
            stacklevel=2,
        )
        modules = [importlib.import_module(home) for home in homes]
        if len(modules) == 1:
            return modules[0]
        return _View(spec.name, modules)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module was imported under its new path."""

    def get_code(self, fullname: str) -> types.CodeType | None:
        """The new module's code, so that ``python -m OLD.PATH`` still runs it (``runpy`` asks for it); the
        warning is a ``FutureWarning`` there, shown by default, as the command line is a user's, not code's."""
        home = MOVED_MODULES[fullname][0]
        warnings.warn(f"{fullname} moved to {home}: run python -m {home}", FutureWarning, stacklevel=2)
        return importlib.util.find_spec(home).loader.get_code(home)


class _View(types.ModuleType):
    """An old module whose contents went to several new ones: reads a name from the first that has it."""

    def __init__(self, name: str, modules: list[types.ModuleType]) -> None:
        super().__init__(name, f"Moved to {', '.join(m.__name__ for m in modules)}.")
        self.__homes = modules

    def __getattr__(self, name: str) -> Any:
        for module in self.__homes:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({name for module in self.__homes for name in dir(module)})


def install() -> None:
    """Put the finder of old module paths on ``sys.meta_path`` (once; :mod:`magpie_hf` does it on import)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())  # before an editable install's finder, which may see an old checkout
