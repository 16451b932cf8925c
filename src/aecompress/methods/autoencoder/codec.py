"""The AE as a learned codec: with a quantization stage (methods/stage.py) its codes, and
by default its decoder's matrices, are stored as integer codes on a grid.

A linear decoder (ae-data's on a layer: rows = codes @ B, B = w0^T) is stored as its basis
B and rounded in turn with the codes, each refitted to the other in the output metric
(method.py, `_alternated`). Otherwise, after the float fit, `qat_epochs` epochs of
quantization-aware training go on from the best state: the decoded rows are computed from
the tensors rounded to nearest on their grids, the gradient passing straight through the
rounding (straight-through estimation), so codes and decoder learn to sit where rounding
costs least; the best epoch by the trainer's signal measured on the rounded tensors (the
start included) is stored rounded to nearest, or, for a linear decoder kept as floats
whose loss is an output error, its codes chosen by GPTQ when that lowers the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aecompress.methods.quantize import Quantized, dequantize, rtn
from aecompress.methods.stage import QuantStage


@dataclass(frozen=True)
class Codec:
    """How the AE's tensors are rounded: `stage`, scales in `scale_dtype`, and whether the
    decoder's matrices are rounded too (`decoder`; its biases stay floats)."""

    stage: QuantStage
    scale_dtype: torch.dtype
    decoder: bool

    def quantize(self, matrix: torch.Tensor) -> Quantized:
        """`matrix` rounded to nearest on its grid."""
        return rtn(matrix.detach().float(), self.stage.scheme, scale_dtype=self.scale_dtype)

    def round(self, matrix: torch.Tensor) -> torch.Tensor:
        """`matrix` rounded to nearest on its grid, the gradient passing straight through."""
        with torch.no_grad():
            rounded = dequantize(self.quantize(matrix)).to(matrix.dtype)
        return matrix + (rounded - matrix).detach()

    def apply(
        self, codes: torch.Tensor, decoder: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The codes and decoder as stored: rounded codes, rounded decoder matrices (with
        `decoder`), float biases."""
        if self.decoder:
            decoder = {k: self.round(t) if t.dim() == 2 else t for k, t in decoder.items()}
        return self.round(codes), decoder
