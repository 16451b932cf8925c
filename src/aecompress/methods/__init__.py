"""Compression methods; importing this package registers them all."""

from aecompress.methods import autoencoder, kronecker, pruning, svd, tucker
from aecompress.methods.base import METHODS, FitContext, Method, MethodOptions, Stored, make_method

__all__ = [
    "METHODS",
    "FitContext",
    "Method",
    "MethodOptions",
    "Stored",
    "autoencoder",
    "kronecker",
    "make_method",
    "pruning",
    "svd",
    "tucker",
]
