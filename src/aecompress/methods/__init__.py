"""Compression methods; importing this package registers them all."""

from aecompress.methods import svd
from aecompress.methods.base import METHODS, FitContext, Method, MethodOptions, Stored, make_method

__all__ = ["METHODS", "FitContext", "Method", "MethodOptions", "Stored", "make_method", "svd"]
