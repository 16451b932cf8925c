"""The paper's autoencoder (AE) method: rows of a matrix are samples; store codes + decoder.

Each row of the group's row-stacked matrix [L*n, m] is one sample. An encoder maps it to
a code of width x, a decoder maps the code back; with norm enforcement every decoded row
is rescaled to the stored L2 norm of the original row. Stored: the codes of every row
(per member), the decoder's weights and biases (shared by the group) and the row norms
(per member). The encoder is thrown away. The width is x, the largest whose stored size
fits the budget (hidden sizes relative to x make the decoder's cost quadratic in x).

Two trainers: `autoencoder` (the paper: encoder + decoder, codes = encoder output) and
`autodecoder` (decoder only: the codes are parameters optimised directly, initialised
from the SVD projection of the rows). Presets: `fast` (default) and `paper`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from aecompress.errors import AecompressError
from aecompress.methods.autoencoder.options import (
    AutoencoderOptions,
    DataAwareOptions,
    decoder_has_biases,
    decoder_widths,
    encoder_widths,
    layers_numel,
    stored_cost,
)
from aecompress.methods.autoencoder.trainer import OutputMetric, Trainer, threads
from aecompress.methods.base import (
    FitContext,
    GroupSpec,
    Method,
    MethodLayout,
    Stored,
    Width,
    make_method,
    register,
    row_weights,
)
from aecompress.methods.linalg import summed, whitening
from aecompress.modules import DecodedEmbedding, DecodedLinear, DecoderSpec, decode_rows


class DecoderLayout(MethodLayout):
    """How the decoder's layers are joined (the widths are the stored tensors' shapes)."""

    activation: Literal["leaky_relu", "relu", "gelu", "silu", "tanh"]
    negative_slope: float
    output: Literal["tanh", "none"]
    norm: bool

    def spec(self) -> DecoderSpec:
        return DecoderSpec(self.activation, self.negative_slope, self.output, self.norm)


@register
class Autoencoder(Method):
    """The paper's autoencoder (Banaei et al., EACL 2023): per row a code, one decoder per
    group rebuilding the rows; trained on cosine distance + RMSE of the rows."""

    name = "ae"
    Options = AutoencoderOptions
    options: AutoencoderOptions
    Layout = DecoderLayout

    def statistics_needed(self) -> set[str]:
        """Calibration statistics the fit reads from context.statistics."""
        kind = self.options.row_weights
        return set() if kind == "none" else {"counts" if kind == "auto" else kind}

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, int)
        return spec.floats(
            stored_cost(self.options.for_kind(spec.kind), spec.count * spec.rows, spec.cols, width)
        )

    def allocation_proxy(self) -> Method:
        """Its starting point, the (row-weighted) SVD: training is too slow to score sizes."""
        return make_method("svd")

    def max_width(self, spec: GroupSpec) -> int:
        return spec.cols

    def budget_hint(self, spec: GroupSpec) -> str:
        """A non-linear decoder's hidden layers (and skip path) cost a fixed part that a
        small matrix's budget may not hold: say so, and what fits instead."""
        options = self.options.for_kind(spec.kind)
        if not options.decoder:
            return ""
        widths = decoder_widths(options, 1, spec.cols)
        decoder = layers_numel(widths, decoder_has_biases(widths))
        decoder += spec.cols if options.has_skip else 0
        return (
            f"its decoder {widths} stores {spec.floats(decoder)} of them"
            f"{' (skip path included)' if options.has_skip else ''}; a smaller one may fit "
            "(--option 'decoder=[]' is linear), or one decoder shared across layers "
            "(--group layers)"
        )

    def row_weight_kind(self, spec: GroupSpec) -> str:
        """The row weights used: `auto` is token counts for embeddings, else none."""
        kind = self.options.row_weights
        if kind == "auto":
            return "counts" if spec.kind == "embedding" else "none"
        return kind

    def output_metric(self, context: FitContext) -> OutputMetric | None:
        """The output metric the loss is measured in; None: the weights' own."""
        return None

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        assert isinstance(width, int)
        spec, x = context.spec, width
        options = self.options.for_kind(spec.kind)
        stacked = torch.cat([m.detach().float() for m in matrices])
        kind = self.row_weight_kind(spec)
        weights = None if kind == "none" else row_weights(kind, context).float()
        validate = self._validator(context)
        start = time.perf_counter()
        with threads(options.threads):
            trainer = Trainer(
                options, stacked, x, weights, context, validate, self.output_metric(context)
            )
            result = trainer.train()
        best = result["best"]
        norms = trainer.norms.split(spec.rows) if trainer.norms is not None else None
        members: list[dict[str, torch.Tensor]] = []
        for index, part in enumerate(best["codes"].split(spec.rows)):
            member = {"codes": part.clone()}
            if norms is not None:
                member["norms"] = norms[index].clone()
            members.append(member)
        layout = DecoderLayout(
            activation=options.activation,
            negative_slope=options.negative_slope,
            output=options.output,
            norm=options.norm,
        )
        info = {
            "encoder": encoder_widths(options, x, spec.cols),
            "decoder": decoder_widths(options, x, spec.cols),
            "skip": options.has_skip,
            "row_weights": kind,
            "epoch": best["epoch"],
            "selection": options.selection,
            "selection_value": None if math.isinf(best["score"]) else round(best["score"], 6),
            "fit_seconds": round(time.perf_counter() - start, 2),
        }
        return Stored(best["decoder"], members, x, layout, info)

    def _validator(self, context: FitContext) -> Callable[[torch.Tensor], float] | None:
        """Turn the decoded stacked rows into the model's validation metric (if selected)."""
        if self.options.selection != "validation":
            return None
        callback = context.validate
        if callback is None:
            raise AecompressError(
                f"{context.spec.name}: selection: validation needs the model's validation "
                "metric, which this caller does not provide (use selection: reconstruction)"
            )
        rows = context.spec.rows

        def validate(decoded: torch.Tensor) -> float:
            return callback(list(decoded.split(rows)))

        return validate

    # --- run time -----------------------------------------------------------------------

    @staticmethod
    def _spec(stored: Stored) -> DecoderSpec:
        assert isinstance(stored.layout, DecoderLayout)
        return stored.layout.spec()

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        member = stored.members[index]
        return decode_rows(member["codes"], stored.shared, self._spec(stored), member.get("norms"))

    def linear(
        self, stored: Stored, index: int, bias: torch.Tensor | None, *, prefill: bool = False
    ) -> nn.Module:
        if self.options.runtime == "dense":
            return super().linear(stored, index, bias)
        member = stored.members[index]
        return DecodedLinear(
            member["codes"], stored.shared, self._spec(stored), member.get("norms"), bias
        )

    def embedding(self, stored: Stored, index: int, padding_idx: int | None) -> nn.Module:
        if self.options.runtime == "dense":
            return super().embedding(stored, index, padding_idx)
        member = stored.members[index]
        return DecodedEmbedding(
            member["codes"],
            stored.shared,
            self._spec(stored),
            member.get("norms"),
            padding_idx,
        )


@register
class DataAwareAutoencoder(Autoencoder):
    """The AE trained on the module's output error instead of its weights (our own method).

    Stores exactly what `ae` stores (codes, shared decoder, optional norms, same budget),
    but minimises ||(W - W_hat) L||_F, L L^T = X^T X (+ ridge) of the calibration inputs:
    the error SVD-LLM minimises, so the non-linear decoder spends its capacity where the
    activations are. It starts at SVD-LLM's solution (the skip path holds L^-T V_x, the
    codes W L V_x); training keeps that start unless it lowers the loss. In a stack
    (`--group layers`) each layer's rows are measured in its own X_i^T X_i, the shared
    starting basis comes from the pooled X^T X and each layer's codes are refitted to it.
    Embeddings have one-hot inputs, whose X^T X is diag(token counts): there it is `ae`
    with token-count row weights.
    """

    name = "ae-data"
    Options = DataAwareOptions
    options: DataAwareOptions

    def statistics_needed(self) -> set[str]:
        return super().statistics_needed() | {"xtx", "counts"}

    def allocation_proxy(self) -> Method:
        """Its starting point, SVD-LLM (or Basis Sharing's, for a stack)."""
        return make_method("shared-basis", {"ridge": self.options.ridge})

    def output_metric(self, context: FitContext) -> OutputMetric | None:
        if context.spec.kind == "embedding":
            return None  # embeddings: their row weights (token counts) are the whitening
        ridge = self.options.ridge
        statistics = [context.member_statistics(i) for i in range(context.spec.count)]
        moments = [context.statistic(i, "xtx") for i in range(context.spec.count)]
        factors = [
            whitening(xtx / max(s.tokens, 1), ridge).float()
            for xtx, s in zip(moments, statistics, strict=True)
        ]
        tokens = sum(s.tokens for s in statistics) or 1
        return OutputMetric(factors, whitening(summed(moments) / tokens, ridge).float())
