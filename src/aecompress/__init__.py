"""aecompress: offline compression of pretrained transformer language models."""

__version__ = "0.1.0"
