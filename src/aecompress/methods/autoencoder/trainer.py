"""Training of the AE: codes (or an encoder) and a decoder fitted to the rows of a group.

Rows of the group's stacked matrix [N, m] are the samples. The loss compares each decoded
row with its original, either directly (the paper's AE) or after multiplying both by the
whitening factor of the row's own member (`OutputMetric`: the output error of the data-
aware AE). The best epoch by the selection signal is kept, the starting point included
when training starts from an SVD. With a quantization stage, quantization-aware training
follows (codec.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, cast

import torch
from torch import nn

from aecompress.methods.autoencoder.codec import Codec
from aecompress.methods.autoencoder.options import (
    AutoencoderOptions,
    decoder_has_biases,
    decoder_widths,
    encoder_widths,
)
from aecompress.methods.base import FitContext
from aecompress.methods.linalg import Scaling, refit_coefficients, weighted_bases
from aecompress.methods.losses import powered_l1_alpha, reconstruction_loss
from aecompress.modules import DecoderSpec, decode_rows
from aecompress.progress import progress_bar


def _linear_stack(widths: list[int], bias: bool = True) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in pairwise(widths))


def _linears(stack: nn.ModuleList) -> list[nn.Linear]:
    return [cast(nn.Linear, layer) for layer in stack]


def _encode(encoder: nn.ModuleList, rows: torch.Tensor, spec: DecoderSpec) -> torch.Tensor:
    """The paper's encoder: every Linear followed by the activation, the last one included
    (a single-layer encoder is linear)."""
    out = rows
    for layer in encoder:
        out = layer(out)
        if len(encoder) > 1:
            out = spec.hidden(out)
    return out


def _set_linear(layer: nn.Linear, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight)
    if layer.bias is not None:
        layer.bias.zero_()


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch threads (None: unchanged)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class OutputMetric:
    """Whitening factors L_i (L_i L_i^T = X_i^T X_i / tokens + ridge), one per member of
    the group, and the pooled L of the whole stack that picks the starting basis.

    Member i's rows are compared after multiplying by L_i: the loss is each layer's own
    output error ||(W_i - W_hat_i) X_i^T||, even when the layers share one decoder.
    """

    factors: list[torch.Tensor]
    pooled: torch.Tensor

    def apply(self, rows: torch.Tensor, member_of_row: torch.Tensor) -> torch.Tensor:
        """rows @ L_member for each row."""
        if len(self.factors) == 1:
            return rows @ self.factors[0]
        out = torch.empty_like(rows)
        for member in member_of_row.unique().tolist():
            chosen = member_of_row == member
            out[chosen] = rows[chosen] @ self.factors[member]
        return out


def starting_bases(
    rows: torch.Tensor,
    x: int,
    metric: OutputMetric | None,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode [m, x] and decoder-weight [m, x] bases of the linear start: the SVD-LLM optimum
    in the pooled output metric, or else the row-weighted SVD (scale: row weights)."""
    if metric is not None:
        encode, decode = weighted_bases(rows, x, None, Scaling(metric.pooled.double()))
    else:
        encode, decode = weighted_bases(rows, x, scale, None)
    return encode.to(rows.dtype).contiguous(), decode.T.to(rows.dtype).contiguous()


class Trainer:
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
        self.codec: Codec | None = None  # set: decoded from rounded tensors (codec.py)
        count = 1 if metric is None else len(metric.factors)
        self.member_of_row = torch.arange(rows.shape[0], device=rows.device) // (
            rows.shape[0] // count
        )
        self.reference = rows if metric is None else metric.apply(rows, self.member_of_row)
        self.spec = options.spec()
        self.loss_weights = None if weights is None else weights.pow(options.row_weight_power)
        self.norms = rows.norm(dim=1) if options.norm else None
        self.generator = torch.Generator().manual_seed(context.seed)
        cols = rows.shape[1]
        torch.manual_seed(context.seed)  # nn.Linear initialisation draws from the global RNG
        widths = decoder_widths(options, x, cols)
        self.decoder = _linear_stack(widths, bias=decoder_has_biases(widths))
        self.encoder: nn.ModuleList | None = None
        self.codes: nn.Parameter | None = None
        self.skip: nn.Parameter | None = None
        if options.has_skip:
            bound = 1 / math.sqrt(x)
            skip = (torch.rand(cols, x, generator=self.generator) * 2 - 1).to(rows.device) * bound
            self.skip = nn.Parameter(skip)
        bases = self.linear_bases(x) if options.init == "svd" else None
        if options.trainer == "autoencoder":
            self.encoder = _linear_stack(encoder_widths(options, x, cols))
            if bases is not None:  # a linear AE from the SVD
                with torch.no_grad():
                    _set_linear(_linears(self.encoder)[0], bases[0].T)
                    _set_linear(_linears(self.decoder)[0], bases[1])
            return
        if bases is None:
            codes = torch.randn(rows.shape[0], x, generator=self.generator).to(rows.device)
        else:
            codes = self._start(*bases)
        self.codes = nn.Parameter(codes.contiguous())

    def linear_bases(self, x: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and decoder-weight bases [m, x] of the linear optimum at width x in the
        trainer's metric (starting_bases; its first columns are the optimum at any
        narrower width)."""
        weights = self.loss_weights
        scale = None if weights is None else weights.sqrt().to(self.rows.dtype)
        return starting_bases(self.rows, x, self.metric, scale)

    def _start(self, encode: torch.Tensor, decode: torch.Tensor) -> torch.Tensor:
        """Put the decoder at the linear start and return the starting codes."""
        codes = self._start_codes(encode, decode)
        with torch.no_grad():
            if len(self.decoder) == 1:
                _set_linear(_linears(self.decoder)[0], decode)
            elif self.skip is not None:  # start from the SVD: linear path + zero MLP
                self.skip.copy_(decode)
                last = _linears(self.decoder)[-1]
                _set_linear(last, torch.zeros_like(last.weight))
            else:  # a non-linear decoder expects codes of unit scale
                codes = codes / codes.std().clamp_min(1e-12)
        return codes

    def _start_codes(self, encode: torch.Tensor, decode: torch.Tensor) -> torch.Tensor:
        """Codes of the linear start: the projection on the basis, or, for a stack with
        per-layer metrics, each layer's least-squares codes in its own output error."""
        if self.metric is None or len(self.metric.factors) == 1:
            return self.rows @ encode
        parts = []
        for part, factor in zip(
            self.rows.split(self.rows.shape[0] // len(self.metric.factors)),
            self.metric.factors,
            strict=True,
        ):
            gram = factor.double() @ factor.double().T
            parts.append(refit_coefficients(part, decode.T, gram))
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
        """The decoder as stored: w0, b0, w1, b1, ... (+ skip; a linear decoder: w0 alone)."""
        tensors: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(_linears(self.decoder)):
            tensors[f"w{index}"] = layer.weight
            if layer.bias is not None:
                tensors[f"b{index}"] = layer.bias
        if self.skip is not None:
            tensors["skip"] = self.skip
        return tensors

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
        """Rows (all, or those of `index`) decoded from `codes` by the current decoder,
        both rounded first under a codec."""
        decoder = self.decoder_tensors()
        if self.codec is not None:
            codes, decoder = self.codec.apply(codes, decoder)
        return self.decode_with(codes, decoder, index)

    def decode_with(
        self,
        codes: torch.Tensor,
        decoder: dict[str, torch.Tensor],
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        norms = None
        if self.norms is not None:
            norms = self.norms if index is None else self.norms[index]
        return decode_rows(codes, decoder, self.spec, norms)

    @torch.no_grad()
    def stored_loss(self, codes: torch.Tensor, decoder: dict[str, torch.Tensor]) -> float:
        """The loss of every row decoded from these codes by this decoder (as stored)."""
        decoded = self.decode_with(codes, decoder)
        return self.loss(decoded, None, self.options.loss.l1_alpha_end).item()

    def loss(self, decoded: torch.Tensor, index: torch.Tensor | None, alpha: float) -> torch.Tensor:
        """The loss of decoded rows (all rows, or those of `index`), in the trainer's metric."""
        reference = self.reference if index is None else self.reference[index]
        weights = self.loss_weights
        if weights is not None and index is not None:
            weights = weights[index]
        members = self.member_of_row if index is None else self.member_of_row[index]
        measured = decoded if self.metric is None else self.metric.apply(decoded, members)
        return reconstruction_loss(reference, measured, self.options.loss, weights, alpha)

    @torch.no_grad()
    def full_loss(self, codes: torch.Tensor, alpha: float) -> float:
        return self.loss(self.decode(codes), None, alpha).item()

    def train(
        self, options: AutoencoderOptions | None = None, from_start: bool | None = None
    ) -> dict[str, Any]:
        """Train for options.epochs (default: the trainer's options); the best epoch by the
        selection signal, the starting state a candidate too when `from_start` (default:
        when starting from an SVD)."""
        options = options or self.options
        if from_start is None:
            from_start = options.init == "svd" and options.selection != "last"
        rows = self.rows
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
        if from_start:
            best = self._candidate(0, self.signal())  # training must beat its start
        history = []
        bar = progress_bar(
            range(options.epochs),
            desc=f"ae {self.context.spec.name}",
            enabled=self.context.progress,
        )
        for epoch in bar:
            alpha = powered_l1_alpha(options.loss, epoch, options.epochs)
            order = torch.randperm(count, generator=self.generator).to(rows.device)
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
            score = self.score(epoch, options)
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

    def score(self, epoch: int, options: AutoencoderOptions) -> float:
        """The selection signal after `epoch` of training with `options` (lower is better;
        the powered L1 term, if on, at its final alpha so that epochs compare)."""
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

    def finetune_quantized(self, best: dict[str, Any], codec: Codec) -> dict[str, Any]:
        """Quantization-aware training from the float fit's `best` state (codec.py): the
        codes become parameters (an encoder is dropped), then `qat_epochs` epochs at
        `qat_lr` through the rounding; returns the best state by the signal measured on
        the rounded tensors."""
        with torch.no_grad():
            for name, tensor in self.decoder_tensors().items():
                tensor.copy_(best["decoder"][name])
        self.encoder = None
        self.codes = nn.Parameter(best["codes"].clone())
        self.codec = codec
        if self.options.qat_epochs == 0:
            return self._candidate(0, self.signal())
        options = self.options.model_copy(
            update={
                "epochs": self.options.qat_epochs,
                "lr": self.options.qat_lr,
                "schedule": "constant",
                "select_from": 0.0,
            }
        )
        return self.train(options, from_start=True)["best"]
