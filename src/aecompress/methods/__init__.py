"""Compression methods; importing this package registers them all."""

from aecompress.methods import autoencoder, svd
from aecompress.methods.base import METHODS, FitContext, Method, MethodOptions, Stored, make_method

__all__ = [
    "METHODS",
    "FitContext",
    "Method",
    "MethodOptions",
    "Stored",
    "autoencoder",
    "make_method",
    "svd",
]
