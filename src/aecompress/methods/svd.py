"""Truncated SVD and its weighted variants: scale, truncated SVD, unscale.

Every method here stores, for a group of matrices stacked row-wise [K*n, m], one shared
basis B [r, m] and per member the coefficients A_i [n, r] (any scaling is folded into A
and B: nothing else is stored); the width is the rank r, costing K*n*r + r*m numbers.
Each is served as a LowRankLinear / LowRankEmbedding. They differ in the error they
minimise, i.e. in the scaling chosen before the SVD (see linalg.weighted_bases):

  svd            ||W - W_hat||_F                       no scaling
  fwsvd          ||diag(c) (W - W_hat)||_F             rows, c_i = sqrt(sum_j Fisher_ij)
  asvd           ||(W - W_hat) diag(s)||_F             columns, s = mean|x|^alpha
  svdllm         ||(W - W_hat) L||_F = ||(W - W_hat) X^T||_F   L L^T = X^T X (whitening)
  shared-basis   svdllm for a stack of layers: one basis, pooled X^T X, per-layer refit

Embeddings ([vocab, hidden], one row per token): the input of a lookup is one-hot, so its
X^T X is diag(token counts) and an activation-aware scaling weights ROWS: svdllm by
sqrt(counts + ridge), asvd by (counts + ridge)^alpha (the same for alpha 0.5).

With a quantization stage (stage.py) both factors are stored as codes (`b.*` shared,
`a.*` per member). With a gptq stage and the layer's inputs (svdllm, shared-basis), B is
quantized by GPTQ under X^T X, each A_i refitted to its layer's output error given the
quantized B, then quantized by GPTQ under the Gram of its own inputs B_q X (B_q X^T X B_q^T);
otherwise (no input statistics, embeddings, or an rtn stage) both are rounded to nearest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from pydantic import Field
from torch import nn

from aecompress.budget import STORAGE_DTYPES
from aecompress.errors import AecompressError
from aecompress.methods.base import (
    FitContext,
    GroupSpec,
    Method,
    MethodLayout,
    MethodOptions,
    Stored,
    Width,
    register,
    row_weights,
)
from aecompress.methods.linalg import (
    Scaling,
    refit_coefficients,
    summed,
    weighted_svd,
    whitening,
)
from aecompress.methods.quantize import dequantize
from aecompress.methods.stage import (
    QuantizedLayout,
    quantize_matrix,
    store_quantized,
    stored_matrix,
)
from aecompress.modules import LowRankEmbedding, LowRankLinear


def count_weights(context: FitContext, ridge: float) -> torch.Tensor:
    """Token counts + ridge * mean count: the diagonal of an embedding's X^T X (+ ridge)."""
    counts = context.statistic(0, "counts")
    return counts + ridge * counts.mean()


@register
class SVD(Method):
    """Truncated SVD of the group's row-stacked matrix [K*n, m].

    Stores per member A_i [n, r] (its rows of U_r S_r) and one shared basis B = V_r^T [r, m];
    minimises the Frobenius error of the stacked matrix. Served as a LowRankLinear.
    Subclasses only choose the scaling (see the module docstring).
    """

    name = "svd"
    quantizable = True

    def cost(self, width: Width, spec: GroupSpec) -> int:
        assert isinstance(width, int)
        return spec.count * spec.matrix_bits(spec.rows, width) + spec.matrix_bits(width, spec.cols)

    def max_width(self, spec: GroupSpec) -> int:
        return min(spec.count * spec.rows, spec.cols)

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        """Row weights [K*n] and column scaling of the stacked matrix (None: unscaled)."""
        return None, None

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        assert isinstance(width, int)
        if context.spec.quantize is not None:  # X^T X is read again after the scaling
            context = replace(context, owns_statistics=False)
        row_scale, col_scaling = self.scaling(matrices, context)
        a, b = weighted_svd(torch.cat(list(matrices)), width, row_scale, col_scaling)
        parts = list(a.split(context.spec.rows))
        if context.spec.quantize is not None:
            return self.quantized(matrices, parts, b, context)
        return Stored({"b": b}, [{"a": part} for part in parts], width)

    def stage_runs_gptq(self) -> bool:
        """With the layer's inputs (svdllm, shared-basis): see input_grams."""
        return "xtx" in self.statistics_needed()

    def input_grams(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> list[torch.Tensor] | None:
        """Each member's X^T X when the stage compensates with GPTQ and the method read
        them (module docstring), else None."""
        stage = context.spec.quantize
        if stage is None or stage.method != "gptq" or context.spec.kind == "embedding":
            return None
        if "xtx" not in self.statistics_needed():
            return None
        return [context.statistic(i, "xtx") for i in range(len(matrices))]

    def quantized(
        self,
        matrices: Sequence[torch.Tensor],
        parts: list[torch.Tensor],
        basis: torch.Tensor,
        context: FitContext,
    ) -> Stored:
        """The factors stored quantized: B, then each A_i on B_q's outputs (module docstring)."""
        spec = context.spec
        assert spec.quantize is not None
        stage, scale_dtype = spec.quantize, STORAGE_DTYPES[spec.storage_dtype]
        grams = self.input_grams(matrices, context)
        pooled = summed(grams) if grams else None
        basis_q = quantize_matrix(basis, stage, pooled, scale_dtype)
        rebuilt = dequantize(basis_q).double()
        members = []
        for index, part in enumerate(parts):
            gram = None
            if grams is not None:
                ridged = with_ridge(grams[index])
                part = refit_coefficients(matrices[index].float(), rebuilt, ridged)
                gram = rebuilt @ ridged @ rebuilt.T
            members.append(store_quantized("a", quantize_matrix(part, stage, gram, scale_dtype)))
        width = basis.shape[0]
        layout = MethodLayout(
            quantize=QuantizedLayout(stage=stage, cols={"a": width, "b": spec.cols})
        )
        return Stored(store_quantized("b", basis_q), members, width, layout)

    def factors(self, stored: Stored, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A_index and B, the stored tensors or rebuilt from their codes."""
        quantized = stored.layout.quantize
        a = stored_matrix(stored.members[index], "a", quantized)
        return a, stored_matrix(stored.shared, "b", quantized)

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        a, b = self.factors(stored, index)
        return a @ b

    def linear(
        self, stored: Stored, index: int, bias: torch.Tensor | None, *, prefill: bool = False
    ) -> nn.Module:
        return LowRankLinear(*self.served_factors(stored, index), bias)

    def embedding(self, stored: Stored, index: int, padding_idx: int | None) -> nn.Module:
        return LowRankEmbedding(*self.served_factors(stored, index), padding_idx)

    def served_factors(self, stored: Stored, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors a runtime module holds: the stored ones, or decoded once from their
        codes (frozen: training goes through `reconstruct`)."""
        if stored.layout.quantize is None:
            return self.factors(stored, index)
        with torch.no_grad():
            a, b = self.factors(stored, index)
        return nn.Parameter(a, requires_grad=False), nn.Parameter(b, requires_grad=False)


def with_ridge(xtx: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """X^T X + ridge * mean diagonal * I (a new float64 matrix), invertible for refits."""
    return xtx.double() + ridge * xtx.diagonal().mean() * torch.eye(
        xtx.shape[0], dtype=torch.float64, device=xtx.device
    )


@register
class FWSVD(SVD):
    """Fisher-weighted SVD (Hsu et al. 2022), row-wise: stores A_i, B as svd.

    Minimises ||diag(c) (W - W_hat)||_F with c_i = sqrt(sum_j F_ij), F the Fisher
    information (squared LM-loss gradients over calibration text) of each weight. A stack
    of layers keeps each row's own weight.
    """

    name = "fwsvd"

    def statistics_needed(self) -> set[str]:
        return {"fisher"}

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        return row_weights("fisher", context), None


class ActivationOptions(MethodOptions):
    """`count_ridge`: embeddings only, added to every token's calibration count, relative
    to the mean count, so that tokens unseen in calibration keep some weight."""

    count_ridge: float = Field(0.1, ge=0)


class ASVDOptions(ActivationOptions):
    alpha: float = Field(0.5, ge=0)


@register
class ASVD(SVD):
    """Activation-aware SVD (Yuan et al. 2023): stores A_i, B as svd.

    Minimises ||(W - W_hat) diag(s)||_F with s_j = mean|x_j|^alpha over calibration
    inputs (pooled over the layers of a stack, weighted by their token counts; channels
    never active get 1e-6 of the mean, so S stays invertible). Embeddings weight rows by
    (count + ridge)^alpha instead.
    """

    name = "asvd"
    Options = ASVDOptions
    options: ASVDOptions

    def statistics_needed(self) -> set[str]:
        return {"abs_mean", "counts"}

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        alpha = self.options.alpha
        if context.spec.kind == "embedding":
            return count_weights(context, self.options.count_ridge).pow(alpha), None
        tokens = [context.member_statistics(i).tokens for i in range(len(matrices))]
        pooled = sum(t * context.statistic(i, "abs_mean") for i, t in enumerate(tokens))
        mean = torch.as_tensor(pooled) / max(sum(tokens), 1)
        mean = mean.clamp_min(1e-6 * mean.mean().item() + 1e-30)
        return None, Scaling.diagonal(mean.pow(alpha))


class WhiteningOptions(ActivationOptions):
    """`ridge`: added to X^T X relative to its mean diagonal (see linalg.whitening)."""

    ridge: float = Field(1e-4, ge=0)


@register
class SVDLLM(SVD):
    """SVD-LLM (Wang et al. 2024) truncation-aware whitening: stores A_i, B as svd.

    Minimises the output error ||(W - W_hat) X^T||_F (+ ridge) over calibration inputs X:
    with L the Cholesky factor of X^T X + ridge, the SVD of W L truncated, times L^-1.
    Per matrix only: layers whiten differently, so a stack cannot share one basis this
    way (use `shared-basis`). Embeddings weight rows by sqrt(count + ridge).
    """

    name = "svdllm"
    Options = WhiteningOptions
    options: WhiteningOptions

    def statistics_needed(self) -> set[str]:
        return {"xtx", "counts"}

    def check(self, spec: GroupSpec) -> None:
        if spec.count > 1 and spec.kind != "embedding":
            raise AecompressError(
                f"{spec.name}: svdllm whitens each matrix with its own X^T X, so "
                f"{spec.count} stacked layers cannot share its basis: use --method "
                "shared-basis (one basis, pooled whitening) or --group none"
            )

    def scaling(
        self, matrices: Sequence[torch.Tensor], context: FitContext
    ) -> tuple[torch.Tensor | None, Scaling | None]:
        if context.spec.kind == "embedding":
            return count_weights(context, self.options.count_ridge).sqrt(), None
        pooled = summed([context.statistic(i, "xtx") for i in range(len(matrices))])
        overwrite = context.owns_statistics or len(matrices) > 1  # a sum is a new matrix
        return None, Scaling(whitening(pooled, self.options.ridge, overwrite))


class SharedBasisOptions(WhiteningOptions):
    """`refit`: refit each layer's coefficients to its own whitened error (exact, cheap)."""

    refit: bool = True


@register
class SharedBasis(SVDLLM):
    """Basis Sharing (Wang et al. 2024): one basis B [r, m] for K stacked layers, per-layer
    coefficients A_i [n, r] (stored as svd), for `--group layers` / `layers:K`.

    B comes from the SVD of the stacked [W_1; ...; W_K] L, L the Cholesky factor of the
    pooled sum_i X_i^T X_i; then (refit) each A_i minimises its own layer's output error
    ||(W_i - A_i B) X_i^T||_F given B (least squares). With one member it is svdllm.
    """

    name = "shared-basis"
    Options = SharedBasisOptions
    options: SharedBasisOptions

    def check(self, spec: GroupSpec) -> None:
        """Any stack is fine."""

    def fit(self, matrices: Sequence[torch.Tensor], width: Width, context: FitContext) -> Stored:
        stored = super().fit(matrices, width, context)  # quantized: refitted there
        quantized = context.spec.quantize is not None
        if (
            self.options.refit
            and len(matrices) > 1
            and context.spec.kind != "embedding"
            and not quantized
        ):
            for index, matrix in enumerate(matrices):
                factor = whitening(context.statistic(index, "xtx"), self.options.ridge)
                gram = factor @ factor.T  # X_i^T X_i + ridge
                coefficients = refit_coefficients(matrix, stored.shared["b"], gram)
                stored.members[index]["a"] = coefficients.contiguous()
        return stored
