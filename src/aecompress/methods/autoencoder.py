"""The paper's autoencoder (AE) method: rows of a matrix are samples; store codes + decoder.

Each row of the group's row-stacked matrix [L*n, m] is one sample. An encoder maps it to
a code of width x, a decoder maps the code back; with norm enforcement every decoded row
is rescaled to the stored L2 norm of the original row. Stored: the codes of every row
(per member), the decoder's weights and biases (shared by the group) and the row norms
(per member). The encoder is thrown away. x is the largest width whose stored size fits
the budget (hidden sizes relative to x make the decoder's cost quadratic in x).

Two trainers: `autoencoder` (the paper: encoder + decoder, codes = encoder output) and
`autodecoder` (decoder only: the codes are parameters optimised directly, initialised
from the SVD projection of the rows). Presets: `fast` (default) and `paper`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal, cast

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from aecompress.budget import solve_width
from aecompress.errors import AecompressError
from aecompress.methods.base import FitContext, Method, MethodOptions, Stored, register
from aecompress.methods.losses import LossConfig, powered_l1_alpha, reconstruction_loss
from aecompress.methods.svd import refit_coefficients, whitening
from aecompress.modules import DecodedEmbedding, DecodedLinear, DecoderSpec, decode_rows

# The reference implementation's settings (PAPER.md), selected by `preset: paper`.
PAPER_PRESET: dict[str, Any] = {
    "trainer": "autoencoder",
    "init": "random",
    "encoder": [8, 4],
    "decoder": [2, 4],
    "epochs": 30,
    "batch_size": 16,
    "lr": 1e-3,
    "schedule": "step",
    "step_size": 10,
    "gamma": 0.8,
    "norm": True,
    "skip": False,
    "row_weights": "none",
    "row_weight_power": 1.0,
    "select_from": 0.0,
}
PRESETS: dict[str, dict[str, Any]] = {"fast": {}, "paper": PAPER_PRESET}


class AutoencoderOptions(MethodOptions):
    """Options of `--method ae`. Field defaults are the `fast` preset; `preset: paper`
    replaces every option not given explicitly by the paper's value (PAPER_PRESET)."""

    preset: Literal["fast", "paper"] = "fast"
    # Architecture. Hidden sizes (empty list: a single Linear, no activation = linear).
    encoder: list[float] = Field(default_factory=lambda: [8.0, 4.0])
    decoder: list[float] = Field(default_factory=lambda: [2.0, 4.0])
    sizes: Literal["relative", "absolute"] = "relative"  # hidden sizes: multiples of x or not
    activation: Literal["leaky_relu", "relu", "gelu", "silu", "tanh"] = "leaky_relu"
    negative_slope: float = Field(0.01, ge=0)
    output: Literal["tanh", "none"] = "tanh"  # after a non-linear decoder's last layer
    # Norm enforcement: store the row norms, rescale decoded rows to them (the paper's
    # default; with row weights it measured worse on MiniLM embeddings, so off here).
    norm: bool = False
    # A linear path from code to row beside a non-linear decoder (costs x*m; ignored for a
    # linear decoder). With init: svd it starts the decoder at the row-weighted SVD.
    skip: bool = True
    # Training.
    trainer: Literal["autoencoder", "autodecoder"] = "autodecoder"
    init: Literal["random", "svd"] = "svd"
    epochs: int = Field(25, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(3e-3, gt=0)
    schedule: Literal["step", "onecycle", "constant"] = "onecycle"
    step_size: int = Field(10, ge=1)  # StepLR, in epochs
    gamma: float = Field(0.8, gt=0)
    loss: LossConfig = Field(default_factory=lambda: LossConfig.model_validate({}))
    # Threads for the fit (None: torch's setting). The fit's matmuls are small: one thread
    # is about as fast, and far faster when other processes share the cores.
    threads: int | None = Field(1, ge=1)
    # Row importance: calibration token counts (embeddings), Fisher or L1 sensitivity;
    # auto = token counts for embeddings, uniform for other matrices. The loss weights
    # are c ** row_weight_power (2: the weighted squared error of the row-weighted SVD).
    row_weights: Literal["auto", "none", "counts", "fisher", "l1"] = "auto"
    row_weight_power: float = Field(2.0, ge=0)
    # Epoch selection: reconstruction loss on the weights, the model's validation metric
    # (context.validate, never the reported split), or simply the last epoch.
    selection: Literal["reconstruction", "validation", "last"] = "reconstruction"
    validate_every: int = Field(1, ge=1)
    # Epochs before this fraction of training are not candidates (their signal is not
    # computed): with a one-cycle schedule the early epochs are never the best.
    select_from: float = Field(0.5, ge=0, lt=1)
    # Run time: decode once into a dense weight, or keep codes + decoder in the module.
    runtime: Literal["dense", "decoder"] = "dense"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> AutoencoderOptions:
        for side in ("encoder", "decoder"):
            sizes = getattr(self, side)
            if any(not s > 0 for s in sizes):
                raise ValueError(f"{side} hidden sizes must be positive (got {sizes})")
            if self.sizes == "absolute" and any(s != int(s) for s in sizes):
                raise ValueError(f"absolute {side} hidden sizes must be whole (got {sizes})")
        if self.trainer == "autoencoder" and self.init == "svd" and (self.encoder or self.decoder):
            raise ValueError("init: svd needs a linear autoencoder (encoder: [], decoder: [])")
        return self

    @property
    def has_skip(self) -> bool:
        """A linear path beside a non-linear decoder (a linear decoder is its own path)."""
        return self.skip and bool(self.decoder)

    def spec(self) -> DecoderSpec:
        return DecoderSpec(self.activation, self.negative_slope, self.output, self.norm)


def hidden_widths(sizes: Sequence[float], x: int, mode: str) -> list[int]:
    """Hidden layer widths: multiples of x (rounded, at least 1) or absolute."""
    if mode == "absolute":
        return [int(s) for s in sizes]
    return [max(1, round(s * x)) for s in sizes]


def decoder_widths(options: AutoencoderOptions, x: int, cols: int) -> list[int]:
    """Widths of the decoder from code to row: [x, hidden..., cols]."""
    return [x, *hidden_widths(options.decoder, x, options.sizes), cols]


def encoder_widths(options: AutoencoderOptions, x: int, cols: int) -> list[int]:
    return [cols, *hidden_widths(options.encoder, x, options.sizes), x]


def layers_numel(widths: Sequence[int]) -> int:
    """Weights and biases of a stack of Linear layers with these widths."""
    return sum(a * b + b for a, b in pairwise(widths))


def stored_cost(options: AutoencoderOptions, rows: int, cols: int, x: int) -> int:
    """Numbers stored for `rows` stacked rows of width `cols` at latent width x."""
    norms = rows if options.norm else 0
    skip = x * cols if options.has_skip else 0
    return rows * x + layers_numel(decoder_widths(options, x, cols)) + skip + norms


def solve_latent_width(
    options: AutoencoderOptions, rows: int, cols: int, budget: float, group: str
) -> int:
    """The largest x in [1, cols] whose codes + decoder + norms fit `budget`."""
    return solve_width(lambda x: stored_cost(options, rows, cols, x), budget, cols, group)


# --- row importance -------------------------------------------------------------------


def _statistic(statistics: Sequence[Any] | None, index: int, name: str, group: str) -> Any:
    stats = None if statistics is None or index >= len(statistics) else statistics[index]
    value = getattr(stats, name, None) if stats is not None else None
    if value is None:
        raise AecompressError(
            f"{group}: row_weights needs '{name}' calibration statistics, which were not "
            "collected for this matrix"
            + (" (token counts exist for embeddings only)" if name == "counts" else "")
        )
    return value


def row_importance(kind: str, statistics: Sequence[Any] | None, rows: int, group: str) -> Any:
    """Per-row importance c_i of each member, concatenated in stacking order (None: uniform).

    counts: sqrt(count + 1) of each token in calibration text (embedding rows);
    fisher: sqrt(sum_j F_ij), F the summed squared gradients of the LM loss;
    l1: sum_j |g_ij|, the summed absolute gradients.
    """
    if kind == "none":
        return None
    count = len(statistics) if statistics is not None else 0
    parts = []
    for index in range(max(count, 1)):
        if kind == "counts":
            counts = torch.as_tensor(_statistic(statistics, index, "counts", group))
            weight = (counts.double() + 1).sqrt()
        elif kind == "fisher":
            fisher = torch.as_tensor(_statistic(statistics, index, "fisher", group))
            weight = fisher.double().sum(dim=1).clamp_min(0).sqrt()
        else:
            weight = torch.as_tensor(_statistic(statistics, index, "l1", group)).double()
            weight = weight.abs().sum(dim=1)
        if weight.shape != (rows,):
            raise AecompressError(
                f"{group}: '{kind}' statistics of member {index} cover {weight.shape[0]} rows, "
                f"the matrix has {rows}"
            )
        parts.append(weight)
    weights = torch.cat(parts)
    if not torch.isfinite(weights).all() or not (weights > 0).any():
        raise AecompressError(f"{group}: '{kind}' row weights are not finite and positive")
    return weights


# --- training -------------------------------------------------------------------------


def _linear_stack(widths: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))


def _encode(encoder: nn.ModuleList, rows: torch.Tensor, spec: DecoderSpec) -> torch.Tensor:
    """The paper's encoder: every Linear followed by the activation, the last one included
    (a single-layer encoder is linear)."""
    out = rows
    for layer in encoder:
        out = layer(out)
        if len(encoder) > 1:
            out = spec.hidden(out)
    return out


def _linears(stack: nn.ModuleList) -> list[nn.Linear]:
    return [cast(nn.Linear, layer) for layer in stack]


def _decoder_tensors(decoder: nn.ModuleList, skip: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The decoder as stored: w0, b0, w1, b1, ... (+ skip)."""
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(_linears(decoder)):
        tensors[f"w{index}"], tensors[f"b{index}"] = layer.weight, layer.bias
    if skip is not None:
        tensors["skip"] = skip
    return tensors


def _set_linear(layer: nn.Linear, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight)
    layer.bias.zero_()


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def svd_basis(rows: torch.Tensor, x: int, scale: torch.Tensor | None) -> torch.Tensor:
    """The top-x right singular vectors [m, x] of diag(scale) rows (row-weighted SVD).

    Computed in float64 from the m x m Gram matrix when the matrix is tall (fast)."""
    weighted = rows.double() if scale is None else rows.double() * scale.double().unsqueeze(1)
    if weighted.shape[0] >= weighted.shape[1]:
        _, vectors = torch.linalg.eigh(weighted.T @ weighted)
        return vectors.flip(1)[:, :x].to(rows.dtype).contiguous()
    _, _, vh = torch.linalg.svd(weighted, full_matrices=False)
    return vh[:x].T.to(rows.dtype).contiguous()


def whitened_svd_bases(
    rows: torch.Tensor, x: int, factor: torch.Tensor, inverse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode / decode bases [m, x] of SVD-LLM's optimum: rows L V_x (V_x^T L^-1).

    With W L = U S V^T, codes = W (L V_x) and W_hat = codes (L^-T V_x)^T minimise
    ||(W - W_hat) L||_F at rank x.
    """
    factor, inverse = factor.double(), inverse.double()
    vectors = svd_basis(rows.double() @ factor, x, None).double()
    return (factor @ vectors).to(rows.dtype), (inverse.T @ vectors).to(rows.dtype)


@dataclass(frozen=True)
class OutputMetric:
    """Whitening factors L_i (L_i L_i^T = X_i^T X_i / tokens + ridge), one per member of
    the group, and the pooled (L, L^-1) of the whole stack that picks the starting basis.

    Member i's rows are compared after multiplying by L_i: the loss is each layer's own
    output error ||(W_i - W_hat_i) X_i^T||, even when the layers share one decoder.
    """

    factors: list[torch.Tensor]
    pooled: tuple[torch.Tensor, torch.Tensor]

    def apply(self, rows: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """rows @ L_member for each row (members: the member index of every row)."""
        if len(self.factors) == 1:
            return rows @ self.factors[0]
        out = torch.empty_like(rows)
        for member in members.unique().tolist():
            chosen = members == member
            out[chosen] = rows[chosen] @ self.factors[member]
        return out


class _Trainer:
    """Fits codes and decoder on the stacked rows; keeps the best epoch's state.

    With an output `metric`, the loss compares rows after whitening (OutputMetric), i.e.
    it measures the module's output error ||(w - w_hat) X^T|| instead of the weight error.
    """

    def __init__(
        self,
        options: AutoencoderOptions,
        rows: torch.Tensor,
        x: int,
        weights: torch.Tensor | None,
        context: FitContext,
        validate: Callable[[torch.Tensor], float] | None,
        metric: OutputMetric | None = None,
    ) -> None:
        self.options, self.rows, self.x, self.context = options, rows, x, context
        self.validate = validate
        self.metric = metric
        count = 1 if metric is None else len(metric.factors)
        self.members = torch.arange(rows.shape[0]) // (rows.shape[0] // count)
        self.targets = rows if metric is None else metric.apply(rows, self.members)
        self.spec = options.spec()
        self.loss_weights = None if weights is None else weights.pow(options.row_weight_power)
        self.norms = rows.norm(dim=1) if options.norm else None
        self.generator = torch.Generator().manual_seed(context.seed)
        cols = rows.shape[1]
        torch.manual_seed(context.seed)  # nn.Linear initialisation draws from the global RNG
        self.decoder = _linear_stack(decoder_widths(options, x, cols))
        self.encoder: nn.ModuleList | None = None
        self.codes: nn.Parameter | None = None
        self.skip: nn.Parameter | None = None
        if options.has_skip:
            bound = 1 / math.sqrt(x)
            skip = (torch.rand(cols, x, generator=self.generator) * 2 - 1) * bound
            self.skip = nn.Parameter(skip)
        basis = decode_basis = None
        if options.init == "svd" and metric is not None:
            basis, decode_basis = whitened_svd_bases(rows, x, *metric.pooled)
        elif options.init == "svd":
            scale = None if self.loss_weights is None else self.loss_weights.sqrt()
            basis = decode_basis = svd_basis(
                rows, x, None if scale is None else scale.to(rows.dtype)
            )
        if options.trainer == "autoencoder":
            self.encoder = _linear_stack(encoder_widths(options, x, cols))
            if basis is not None and decode_basis is not None:  # linear AE from the SVD
                with torch.no_grad():
                    _set_linear(_linears(self.encoder)[0], basis.T)
                    _set_linear(_linears(self.decoder)[0], decode_basis)
        else:
            if basis is not None and decode_basis is not None:
                codes = self._start_codes(basis, decode_basis)
                if len(self.decoder) == 1:
                    with torch.no_grad():
                        _set_linear(_linears(self.decoder)[0], decode_basis)
                elif self.skip is not None:  # start from the SVD: linear path + zero MLP
                    with torch.no_grad():
                        self.skip.copy_(decode_basis)
                        last = _linears(self.decoder)[-1]
                        _set_linear(last, torch.zeros_like(last.weight))
                else:  # a non-linear decoder expects codes of unit scale
                    codes = codes / codes.std().clamp_min(1e-12)
            else:
                codes = torch.randn(rows.shape[0], x, generator=self.generator)
            self.codes = nn.Parameter(codes.contiguous())

    def _start_codes(self, basis: torch.Tensor, decode_basis: torch.Tensor) -> torch.Tensor:
        """Codes of the linear start: the projection on the basis, or, for a stack with
        per-layer metrics, each layer's least-squares codes in its own output error."""
        if self.metric is None or len(self.metric.factors) == 1:
            return self.rows @ basis
        parts = []
        for part, factor in zip(
            self.rows.split(self.rows.shape[0] // len(self.metric.factors)),
            self.metric.factors,
            strict=True,
        ):
            gram = factor.double() @ factor.double().T
            parts.append(refit_coefficients(part, decode_basis.T, gram))
        return torch.cat(parts)

    def parameters(self) -> list[nn.Parameter]:
        params = list(self.decoder.parameters())
        if self.encoder is not None:
            params += list(self.encoder.parameters())
        if self.codes is not None:
            params.append(self.codes)
        if self.skip is not None:
            params.append(self.skip)
        return params

    def decoder_tensors(self) -> dict[str, torch.Tensor]:
        return _decoder_tensors(self.decoder, self.skip)

    def batch_codes(self, index: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            return _encode(self.encoder, self.rows[index], self.spec)
        assert self.codes is not None
        return self.codes[index]

    @torch.no_grad()
    def all_codes(self) -> torch.Tensor:
        if self.encoder is not None:
            return torch.cat(
                [_encode(self.encoder, part, self.spec) for part in self.rows.split(8192)]
            )
        assert self.codes is not None
        return self.codes.detach().clone()

    def decode(self, codes: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        norms = None
        if self.norms is not None:
            norms = self.norms if index is None else self.norms[index]
        return decode_rows(codes, self.decoder_tensors(), self.spec, norms)

    def loss(self, decoded: torch.Tensor, index: torch.Tensor | None, alpha: float) -> torch.Tensor:
        """The loss of decoded rows (all rows, or those of `index`), in the trainer's metric."""
        targets = self.targets if index is None else self.targets[index]
        weights = self.loss_weights
        if weights is not None and index is not None:
            weights = weights[index]
        members = self.members if index is None else self.members[index]
        measured = decoded if self.metric is None else self.metric.apply(decoded, members)
        return reconstruction_loss(targets, measured, self.options.loss, weights, alpha)

    @torch.no_grad()
    def full_loss(self, codes: torch.Tensor, alpha: float) -> float:
        return self.loss(self.decode(codes), None, alpha).item()

    def train(self) -> dict[str, Any]:
        options, rows = self.options, self.rows
        count = rows.shape[0]
        batch = min(options.batch_size, count)
        steps = math.ceil(count / batch)
        optimiser = torch.optim.Adam(self.parameters(), lr=options.lr)
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if options.schedule == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimiser, options.step_size, options.gamma)
        elif options.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimiser, max_lr=options.lr, total_steps=options.epochs * steps
            )
        best: dict[str, Any] = {"score": math.inf}
        if options.init == "svd" and options.selection != "last":
            best = self._candidate(0, self.signal())  # training must beat its start
        history = []
        bar = tqdm(
            range(options.epochs),
            desc=f"ae {self.context.group}",
            disable=not self.context.progress,
            leave=False,
        )
        for epoch in bar:
            alpha = powered_l1_alpha(options.loss, epoch, options.epochs)
            order = torch.randperm(count, generator=self.generator)
            total = 0.0
            for index in order.split(batch):
                loss = self.loss(self.decode(self.batch_codes(index), index), index, alpha)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if options.schedule == "onecycle" and scheduler is not None:
                    scheduler.step()
                total += loss.item() * index.numel()
            if options.schedule == "step" and scheduler is not None:
                scheduler.step()
            score = self.score(epoch)
            history.append(round(score, 6))
            bar.set_postfix(loss=f"{total / count:.4f}", select=f"{score:.4f}")
            if options.selection == "last" or score < best["score"]:
                best = self._candidate(epoch + 1, score)
        return {"best": best, "history": history}

    def _candidate(self, epoch: int, score: float) -> dict[str, Any]:
        """A copy of the current state (epoch 0: the starting point)."""
        return {
            "score": score,
            "epoch": epoch,
            "codes": self.all_codes(),
            "decoder": {k: v.detach().clone() for k, v in self.decoder_tensors().items()},
        }

    def score(self, epoch: int) -> float:
        """The selection signal after `epoch` (lower is better; the powered L1 term, if on,
        at its final alpha so that epochs compare)."""
        options = self.options
        last = epoch == options.epochs - 1
        if options.selection == "last":
            return 0.0
        if epoch < int(options.select_from * options.epochs) and not last:
            return math.inf
        if options.selection == "validation" and (epoch + 1) % options.validate_every and not last:
            return math.inf
        return self.signal()

    def signal(self) -> float:
        """The selection signal of the current state: validation metric or training loss."""
        if self.options.selection == "validation":
            assert self.validate is not None
            with torch.no_grad():
                return self.validate(self.decode(self.all_codes()))
        return self.full_loss(self.all_codes(), self.options.loss.l1_alpha_end)


@register
class Autoencoder(Method):
    """The paper's AE (PAPER.md), behind the common interface: see the module docstring."""

    name = "ae"
    Options = AutoencoderOptions
    options: AutoencoderOptions

    def statistics_needed(self) -> set[str]:
        """Calibration statistics the fit reads from context.statistics."""
        kind = self.options.row_weights
        return set() if kind == "none" else {"counts" if kind == "auto" else kind}

    def output_metric(self, context: FitContext) -> OutputMetric | None:
        """The output metric the loss is measured in; None: the weights' own."""
        return None

    def fit(self, matrices: Sequence[torch.Tensor], budget: float, context: FitContext) -> Stored:
        options = self.options
        rows, cols = matrices[0].shape
        stacked = torch.cat([m.detach().float() for m in matrices])
        x = solve_latent_width(options, stacked.shape[0], cols, budget, context.group)
        kind = options.row_weights
        if kind == "auto":  # token counts where there are some (embeddings), else uniform
            stats = context.statistics or []
            has_counts = bool(stats) and all(getattr(s, "counts", None) is not None for s in stats)
            kind = "counts" if has_counts else "none"
        weights = row_importance(kind, context.statistics, rows, context.group)
        if weights is not None and weights.shape[0] != stacked.shape[0]:
            raise AecompressError(
                f"{context.group}: statistics cover {weights.shape[0]} rows, the group "
                f"stacks {stacked.shape[0]}"
            )
        validate = self._validator(matrices, context, rows)
        start = time.perf_counter()
        with _threads(options.threads):
            trainer = _Trainer(
                options,
                stacked,
                x,
                None if weights is None else weights.float(),
                context,
                validate,
                self.output_metric(context),
            )
            result = trainer.train()
        best = result["best"]
        shared: dict[str, torch.Tensor] = best["decoder"]
        members: list[dict[str, torch.Tensor]] = []
        for part, norm in zip(
            best["codes"].split(rows),
            (trainer.norms.split(rows) if trainer.norms is not None else [None] * len(matrices)),
            strict=True,
        ):
            member = {"codes": part.clone()}
            if norm is not None:
                member["norms"] = norm.clone()
            members.append(member)
        meta = {
            "x": x,
            "preset": options.preset,
            "trainer": options.trainer,
            "encoder": encoder_widths(options, x, cols),
            "decoder": decoder_widths(options, x, cols),
            "activation": options.activation,
            "negative_slope": options.negative_slope,
            "output": options.output,
            "norm": options.norm,
            "skip": options.has_skip,
            "row_weights": kind,
            "epochs": options.epochs,
            "epoch": best["epoch"],
            "selection": options.selection,
            "selection_value": None if math.isinf(best["score"]) else round(best["score"], 6),
            "fit_seconds": round(time.perf_counter() - start, 2),
        }
        return Stored(shared, members, meta)

    def _validator(
        self, matrices: Sequence[torch.Tensor], context: FitContext, rows: int
    ) -> Callable[[torch.Tensor], float] | None:
        """Turn the decoded stacked rows into the model's validation metric (if selected)."""
        if self.options.selection != "validation":
            return None
        callback = context.validate
        if callback is None:
            raise AecompressError(
                f"{context.group}: selection: validation needs the model's validation metric, "
                "which this caller does not provide (use selection: reconstruction)"
            )

        def validate(decoded: torch.Tensor) -> float:
            return callback(list(decoded.split(rows)))

        return validate

    # --- run time -----------------------------------------------------------------------

    @staticmethod
    def _spec(stored: Stored) -> DecoderSpec:
        meta = stored.meta
        return DecoderSpec(
            meta.get("activation", "leaky_relu"),
            meta.get("negative_slope", 0.01),
            meta.get("output", "tanh"),
            meta.get("norm", True),
        )

    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        member = stored.members[index]
        with torch.no_grad():
            return decode_rows(
                member["codes"], stored.shared, self._spec(stored), member.get("norms")
            )

    def linear(self, stored: Stored, index: int, bias: torch.Tensor | None) -> nn.Module:
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


class DataAwareOptions(AutoencoderOptions):
    """`ae` options, defaults changed: the loss is the (whitened) squared error alone, which
    is what the output error is; `ridge` is SVD-LLM's (relative to X^T X's mean diagonal)."""

    loss: LossConfig = Field(
        default_factory=lambda: LossConfig.model_validate({"cosine_weight": 0, "rmse_weight": 1})
    )
    ridge: float = Field(1e-4, ge=0)


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

    def output_metric(self, context: FitContext) -> OutputMetric | None:
        statistics = context.statistics or []
        moments = [s.xtx for s in statistics if s.xtx is not None]
        if not statistics or len(moments) < len(statistics):
            return None  # embeddings: their row weights (token counts) are the whitening
        ridge = self.options.ridge
        factors = [
            whitening(xtx / max(s.tokens, 1), ridge)[0].float()
            for xtx, s in zip(moments, statistics, strict=True)
        ]
        pooled = torch.stack(moments).sum(0)
        tokens = sum(s.tokens for s in statistics) or 1
        factor, inverse = whitening(pooled / tokens, ridge)
        return OutputMetric(factors, (factor.float(), inverse.float()))
