"""The distillation objectives, one `Objective` subclass each, and their pure loss functions.

Every module of this package is imported here; each `Objective` subclass it defines with a `name` is registered
under that name (the values `AMMConfig.objective` accepts), and the names in its `__all__` (pure tensor functions)
are exported from `amm_trl.objectives`. Adding an objective is adding one module.
"""

import importlib
import pkgutil

from .base import Objective

OBJECTIVES: dict[str, type[Objective]] = {}
__all__ = ["OBJECTIVES", "Objective", "get_objective"]


def _register(module) -> None:
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Objective) and value.__module__ == module.__name__ \
                and value.name:
            if value.name in OBJECTIVES:
                raise ValueError(f"objective {value.name!r} is defined twice ({OBJECTIVES[value.name]} and {value})")
            OBJECTIVES[value.name] = value
    for name in getattr(module, "__all__", ()):
        globals()[name] = getattr(module, name)
        __all__.append(name)


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _register(importlib.import_module(f"{__name__}.{_info.name}"))


def get_objective(args) -> Objective:
    """The objective unit `args.objective` names, reading its settings from `args` (an `AMMConfig`)."""
    return OBJECTIVES[args.objective](args)
