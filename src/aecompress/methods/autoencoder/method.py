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

With a quantization stage the AE is a learned codec (codec.py): each member's codes are
stored as integer codes (`codes.*`), the decoder's matrices too by default (`w0.*`,
`skip.*`; a linear decoder as its basis `w0t.*` = w0^T; `quantize_decoder: false` keeps
them floats), biases and norms as floats, all in the same bit budget, so the latent width
grows to fill it. Loaded, a quantized group is decoded once into dense weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from aecompress.budget import STORAGE_DTYPES
from aecompress.errors import AecompressError
from aecompress.methods.autoencoder.codec import Codec
from aecompress.methods.autoencoder.options import (
    AutoencoderOptions,
    DataAwareOptions,
    decoder_has_biases,
    decoder_widths,
    encoder_widths,
    group_bits,
    layers_numel,
    rounds_basis,
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
from aecompress.methods.quantize import Quantized, dequantize
from aecompress.methods.stage import (
    QuantizedLayout,
    quantize_matrix,
    store_quantized,
    stored_matrix,
)
from aecompress.modules import DecodedEmbedding, DecodedLinear, DecoderSpec, decode_rows

Tensors = dict[str, torch.Tensor]


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
    quantizable = True
    Options = AutoencoderOptions
    options: AutoencoderOptions
    Layout = DecoderLayout

    def statistics_needed(self) -> set[str]:
        """Calibration statistics the fit reads from context.statistics."""
        kind = self.options.row_weights
        return set() if kind == "none" else {"counts" if kind == "auto" else kind}

    def selects_on_validation(self) -> bool:
        return self.options.selection == "validation"

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, int)
        return group_bits(self.options.for_kind(spec.kind), spec, width)

    def allocation_proxy(self) -> Method:
        """Its starting point, the (row-weighted) SVD: training is too slow to score sizes."""
        return make_method("svd")

    def max_width(self, spec: GroupSpec) -> int:
        """A code no wider than a row or than the rows' count (the rank of the stack)."""
        return min(spec.count * spec.rows, spec.cols)

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
            best = trainer.train()["best"]
            shared, codes, quantized, codec_info = self._stored_form(trainer, best, context)
        if quantized is not None:  # the codec may store a narrower code than the budget's
            x = quantized.cols["codes"]
        norms = trainer.norms.split(spec.rows) if trainer.norms is not None else None
        members: list[dict[str, torch.Tensor]] = []
        for index, member in enumerate(codes):
            if norms is not None:
                member["norms"] = norms[index].clone()
            members.append(member)
        layout = DecoderLayout(
            activation=options.activation,
            negative_slope=options.negative_slope,
            output=options.output,
            norm=options.norm,
            quantize=quantized,
        )
        info = {
            "encoder": encoder_widths(options, x, spec.cols),
            "decoder": decoder_widths(options, x, spec.cols),
            "skip": options.has_skip,
            "row_weights": kind,
            "epoch": best["epoch"],
            "selection": options.selection,
            "selection_value": None if math.isinf(best["score"]) else round(best["score"], 6),
            **codec_info,
            "fit_seconds": round(time.perf_counter() - start, 2),
        }
        return Stored(shared, members, x, layout, info)

    def _stored_form(
        self, trainer: Trainer, best: dict[str, Any], context: FitContext
    ) -> tuple[Tensors, list[Tensors], QuantizedLayout | None, dict[str, Any]]:
        """The decoder's tensors, each member's codes, the stage's record and report
        figures: the float fit's best state, or with a stage the codec's (codec.py)."""
        spec = context.spec
        if spec.quantize is None:
            return (
                best["decoder"],
                [{"codes": p.clone()} for p in best["codes"].split(spec.rows)],
                None,
                {},
            )
        options = self.options.for_kind(spec.kind)
        codec = Codec(spec.quantize, STORAGE_DTYPES[spec.storage_dtype], options.quantize_decoder)
        info: dict[str, Any] = {"float_loss": trainer.stored_loss(best["codes"], best["decoder"])}
        if rounds_basis(options, spec):
            shared, decoder, codes, info["codec_widths"] = self._alternated(
                trainer, best["decoder"]["w0"].T, codec, options, spec.rows
            )
            info["codes_rounding"] = "alternated"
            cols = {"w0t": spec.cols}
        else:
            best = trainer.finetune_quantized(best, codec)
            shared, decoder = self._rounded_decoder(best["decoder"], codec)
            codes, info["codes_rounding"] = self._codes(
                trainer, best["codes"].split(spec.rows), decoder, codec
            )
            cols = {name: decoder[name].shape[1] for name in decoder if f"{name}.codes" in shared}
        info["quantized_loss"] = trainer.stored_loss(_joined(codes), decoder)
        info = {k: round(v, 6) if isinstance(v, float) else v for k, v in info.items()}
        width = codes[0].codes.shape[1]
        layout = QuantizedLayout(stage=spec.quantize, cols={"codes": width} | cols)
        return shared, [store_quantized("codes", q) for q in codes], layout, info

    @staticmethod
    def _rounded_decoder(decoder: Tensors, codec: Codec) -> tuple[Tensors, Tensors]:
        """The decoder's stored tensors (its matrices rounded to nearest when the codec
        quantizes them) and the decoder they rebuild."""
        shared: Tensors = {}
        rebuilt: Tensors = {}
        for name, tensor in decoder.items():
            if codec.decoder and tensor.dim() == 2:
                quantized = codec.quantize(tensor)
                shared |= store_quantized(name, quantized)
                rebuilt[name] = dequantize(quantized)
            else:
                shared[name] = rebuilt[name] = tensor
        return shared, rebuilt

    @classmethod
    def _alternated(
        cls,
        trainer: Trainer,
        basis: torch.Tensor,
        codec: Codec,
        options: AutoencoderOptions,
        member_rows: int,
    ) -> tuple[Tensors, Tensors, list[Quantized], list[tuple[int, float]]]:
        """A linear decoder, rows ~ codes @ B with B = w0^T [x, m], fitted by alternation
        (`_alternation`) from the float fit's basis and, with `narrow_codec`, from the
        linear optimum at narrower widths (x - x/10, x - 2x/10, ...) while that lowers the
        loss. Returns the stored decoder (`w0t`) of the lowest loss, the decoder it
        rebuilds, each member's codes, and each width tried with its loss."""
        rounds = options.codec_rounds
        kept = cls._alternation(trainer, basis, codec, rounds, member_rows)
        x = basis.shape[0]
        losses = [(x, kept[0])]
        if options.narrow_codec:
            optimum = trainer.linear_bases(x)[1]  # [m, x], nested: the first r are rank r's
            step = max(1, round(x / 10))
            for width in range(x - step, 0, -step):
                tried = cls._alternation(trainer, optimum[:, :width].T, codec, rounds, member_rows)
                losses.append((width, tried[0]))
                if tried[0] >= kept[0]:
                    break
                kept = tried
        _, basis_q, codes = kept
        tried_widths = [(width, round(loss, 6)) for width, loss in losses]
        return store_quantized("w0t", basis_q), {"w0": dequantize(basis_q).T}, codes, tried_widths

    @staticmethod
    def _alternation(
        trainer: Trainer, basis: torch.Tensor, codec: Codec, rounds: int, member_rows: int
    ) -> tuple[float, Quantized, list[Quantized]]:
        """Basis B [x, m] and codes rounded in turn for `rounds` rounds: B by GPTQ under
        the members' pooled metric Gram (grouped along a row's columns, as svdllm's basis),
        each member's codes refitted to B_q in its own metric G_i and chosen by GPTQ under
        B_q G_i B_q^T, then B refitted (least squares) to the rounded codes. Returns the
        round of lowest loss: its loss, rounded basis and each member's codes."""
        rows, stage, scale_dtype = trainer.rows, codec.stage, codec.scale_dtype
        parts = rows.split(member_rows)
        grams = _metric_grams(trainer, len(parts), rows.shape[1])
        pooled = summed(grams) if trainer.metric is not None else None
        kept: tuple[float, Quantized, list[Quantized]] | None = None
        for _ in range(rounds):
            basis_q = quantize_matrix(basis, stage, pooled, scale_dtype)
            rebuilt = dequantize(basis_q).double()
            codes = [
                quantize_matrix(
                    _refit(part, rebuilt, gram),
                    stage,
                    rebuilt @ gram @ rebuilt.T,
                    scale_dtype,
                )
                for part, gram in zip(parts, grams, strict=True)
            ]
            joined = _joined(codes)
            loss = trainer.stored_loss(joined, {"w0": rebuilt.T.float()})
            if kept is None or loss < kept[0]:
                kept = (loss, basis_q, codes)
            basis = torch.linalg.lstsq(joined.double(), rows.double()).solution.float()
        assert kept is not None
        return kept

    def _codes(
        self,
        trainer: Trainer,
        parts: Sequence[torch.Tensor],
        decoder: dict[str, torch.Tensor],
        codec: Codec,
    ) -> tuple[list[Quantized], str]:
        """Each member's codes rounded to nearest, or chosen by GPTQ under the Gram of their
        inputs when that is known and lowers the loss: a linear decoder (rows = codes @
        w0^T) measured in each member's output metric L_i (Gram w0^T L_i L_i^T w0)."""
        rounded = [codec.quantize(part) for part in parts]
        metric = trainer.metric
        linear = set(decoder) == {"w0"} and trainer.norms is None
        if codec.stage.method != "gptq" or metric is None or not linear:
            return rounded, "rtn"
        weight = decoder["w0"].double()
        compensated = []
        for part, factor in zip(parts, metric.factors, strict=True):
            inputs = weight.T @ factor.double()  # [x, m]: the codes' inputs, whitened
            gram = inputs @ inputs.T
            compensated.append(quantize_matrix(part, codec.stage, gram, codec.scale_dtype))
        gptq_loss = trainer.stored_loss(_joined(compensated), decoder)
        if gptq_loss < trainer.stored_loss(_joined(rounded), decoder):
            return compensated, "gptq"
        return rounded, "rtn"

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

    @staticmethod
    def _decoder(stored: Stored) -> dict[str, torch.Tensor]:
        """The decoder's tensors, its matrices rebuilt from their codes when quantized (a
        linear decoder's weight from its stored basis `w0t`)."""
        quantized = stored.layout.quantize
        names = {key.partition(".")[0] for key in stored.shared}
        decoder = {name: stored_matrix(stored.shared, name, quantized) for name in names}
        if "w0t" in decoder:
            decoder["w0"] = decoder.pop("w0t").T
        return decoder

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        member = stored.members[index]
        codes = stored_matrix(member, "codes", stored.layout.quantize)
        return decode_rows(codes, self._decoder(stored), self._spec(stored), member.get("norms"))

    def linear(
        self, stored: Stored, index: int, bias: torch.Tensor | None, *, prefill: bool = False
    ) -> nn.Module:
        if self.options.runtime == "dense" or stored.layout.quantize is not None:
            return super().linear(stored, index, bias)
        member = stored.members[index]
        return DecodedLinear(
            member["codes"], stored.shared, self._spec(stored), member.get("norms"), bias
        )

    def embedding(self, stored: Stored, index: int, padding_idx: int | None) -> nn.Module:
        if self.options.runtime == "dense" or stored.layout.quantize is not None:
            return super().embedding(stored, index, padding_idx)
        member = stored.members[index]
        return DecodedEmbedding(
            member["codes"],
            stored.shared,
            self._spec(stored),
            member.get("norms"),
            padding_idx,
        )


def _refit(rows: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Codes [n, x] minimising ||(rows - codes @ basis) L||_F, gram = L L^T: the normal
    equations solved by least squares, so that a basis whose rounding lost rank (few
    bits) still gives codes (the minimum-norm ones)."""
    projected = basis @ gram
    solution = torch.linalg.lstsq(projected @ basis.T, projected @ rows.double().T, driver="gelsd")
    return solution.solution.T.float()


def _metric_grams(trainer: Trainer, count: int, cols: int) -> list[torch.Tensor]:
    """Each of the `count` members' Gram G_i = L_i L_i^T of its output metric (float64;
    the identity for the weights' own metric)."""
    if trainer.metric is None:
        return [torch.eye(cols, dtype=torch.float64, device=trainer.rows.device)] * count
    return [f.double() @ f.double().T for f in trainer.metric.factors]


def _joined(codes: Sequence[Quantized]) -> torch.Tensor:
    """The members' rounded codes, stacked as the trainer's rows are."""
    return torch.cat([dequantize(q) for q in codes])


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
