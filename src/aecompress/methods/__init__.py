"""Compression methods; importing this package registers every module in it."""

import importlib
import pkgutil

from aecompress.methods.base import (
    METHODS,
    FitContext,
    GroupSpec,
    Method,
    MethodLayout,
    MethodOptions,
    Stored,
    Width,
    check_stage,
    make_method,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS",
    "FitContext",
    "GroupSpec",
    "Method",
    "MethodLayout",
    "MethodOptions",
    "Stored",
    "Width",
    "check_stage",
    "make_method",
    "register",
]
