"""Training methods and their registry.

``liftkit.methods.get(name)`` returns a method class; ``liftkit.methods.available()`` lists the names.
Each method lives in its own module of this package and registers itself (``@register``) on import; every
module here is imported when the package is, so adding a method is adding a file.
"""

import importlib
import pkgutil

from liftkit.methods.base import (
    LOSSES,
    Method,
    MethodConfig,
    StepStats,
    available,
    evaluate_loss,
    get,
    parse_hparam,
    register,
    targets_for,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "LOSSES",
    "Method",
    "MethodConfig",
    "StepStats",
    "available",
    "evaluate_loss",
    "get",
    "parse_hparam",
    "register",
    "targets_for",
]
