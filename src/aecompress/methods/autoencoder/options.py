"""Options of the AE methods (presets `fast` and `paper`) and their budget arithmetic.

Stored for a group of stacked rows [N, m] at latent width x: the codes N*x, the decoder's
weights and biases (hidden widths multiples of x, or absolute; a linear decoder has no
bias), the skip path x*m beside a non-linear decoder, and the N row norms with norm
enforcement.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from aecompress.budget import solve_width
from aecompress.methods.base import GroupSpec, MethodOptions
from aecompress.methods.losses import LossConfig
from aecompress.modules import DecoderSpec

# The paper's reference implementation's settings, selected by `preset: paper`.
PAPER_PRESET: dict[str, Any] = {
    "trainer": "autoencoder",
    "init": "random",
    "encoder": [8, 4],
    "decoder": [2, 4],
    "sizes": "relative",
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

# The decoder of each kind of matrix when none is given, as (hidden sizes, sizes). Rows of a
# tall embedding share the decoder, whose cost is nothing next to their codes; a layer's
# matrix has few rows, so a wide decoder would eat its budget (WikiText-2 validation on
# SmolLM2, benchmarks/results/compensation/report.md).
Decoders = dict[str, tuple[list[float], Literal["relative", "absolute"]]]
DEFAULT_DECODERS: Decoders = {
    "embedding": ([2.0, 4.0], "relative"),
    "linear": ([16.0], "absolute"),
}
# ae-data on a layer's matrix: a linear decoder, i.e. SVD-LLM's solution (the exact optimum
# of the whitened loss at its width; training keeps it). On SmolLM2's MLPs (WikiText-2
# validation, benchmarks/results/compensation/report.md) it beat 16 hidden units: the
# hidden layer's numbers cost more rank than its non-linearity gives back.
DATA_AWARE_DECODERS: Decoders = {**DEFAULT_DECODERS, "linear": ([], "absolute")}


class AutoencoderOptions(MethodOptions):
    """Options of `--method ae`. Field defaults are the `fast` preset; `preset: paper`
    replaces every option not given explicitly by the paper's value (PAPER_PRESET)."""

    preset: Literal["fast", "paper"] = "fast"
    # Architecture. Hidden sizes (empty list: a single Linear, no activation = linear),
    # multiples of x (relative) or absolute; the decoder's default depends on the kind of
    # matrix (DEFAULT_DECODERS: measured on validation data).
    encoder: list[float] = Field(default_factory=lambda: [8.0, 4.0])
    decoder: list[float] | None = None
    sizes: Literal["relative", "absolute"] | None = None
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
    # With a quantization stage (codec.py): the decoder's matrices are quantized as the
    # codes are (False: kept at the storage dtype), and after the float fit `qat_epochs`
    # epochs of quantization-aware training (straight-through rounding) at `qat_lr`. On
    # SmolLM2's MLP matrices a float decoder measured worse, and training through the
    # rounding no better than a linear decoder's alternation (benchmarks/results/ae-codec).
    quantize_decoder: bool = True
    qat_epochs: int = Field(0, ge=0)
    qat_lr: float = Field(3e-4, gt=0)
    # A quantized linear decoder: rounds of rounding its basis and the codes in turn, each
    # refitted to the other (codec.py).
    codec_rounds: int = Field(4, ge=1)
    # A quantized linear decoder stores the width of lower loss: the budget's, or narrower
    # (tried in steps of a tenth of it while the loss falls). Near full rank, low-bit
    # factors round worse than narrower ones (benchmarks/results/ae-codec/width.md).
    narrow_codec: bool = True

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> AutoencoderOptions:
        for side in ("encoder", "decoder"):
            sizes = getattr(self, side) or []
            if any(not s > 0 for s in sizes):
                raise ValueError(f"{side} hidden sizes must be positive (got {sizes})")
            if self.sizes == "absolute" and any(s != int(s) for s in sizes):
                raise ValueError(f"absolute {side} hidden sizes must be whole (got {sizes})")
        if self.trainer == "autoencoder" and self.init == "svd" and (self.encoder or self.decoder):
            raise ValueError("init: svd needs a linear autoencoder (encoder: [], decoder: [])")
        return self

    default_decoders: ClassVar[Decoders] = DEFAULT_DECODERS

    def for_kind(self, kind: str) -> AutoencoderOptions:
        """These options with the decoder (and its sizes) of the kind of matrix filled in
        where they were not given (`default_decoders`)."""
        decoder, sizes = self.default_decoders[kind]
        if self.decoder is not None:
            decoder, sizes = self.decoder, self.sizes or "relative"
        return self.model_copy(update={"decoder": decoder, "sizes": self.sizes or sizes})

    @property
    def has_skip(self) -> bool:
        """A linear path beside a non-linear decoder (a linear decoder is its own path)."""
        return self.skip and bool(self.decoder)

    def spec(self) -> DecoderSpec:
        return DecoderSpec(self.activation, self.negative_slope, self.output, self.norm)


class DataAwareOptions(AutoencoderOptions):
    """`ae` options, defaults changed: the loss is the (whitened) squared error alone, which
    is what the output error is; `ridge` is SVD-LLM's (relative to X^T X's mean diagonal);
    a layer's decoder is linear (DATA_AWARE_DECODERS)."""

    default_decoders: ClassVar[Decoders] = DATA_AWARE_DECODERS

    loss: LossConfig = Field(
        default_factory=lambda: LossConfig.model_validate({"cosine_weight": 0, "rmse_weight": 1})
    )
    ridge: float = Field(1e-4, ge=0)


def hidden_widths(sizes: Sequence[float] | None, x: int, mode: str | None) -> list[int]:
    """Hidden layer widths: multiples of x (rounded, at least 1) or absolute."""
    assert sizes is not None, "resolve the options with for_kind first"
    if mode == "absolute":
        return [int(s) for s in sizes]
    return [max(1, round(s * x)) for s in sizes]


def decoder_widths(options: AutoencoderOptions, x: int, cols: int) -> list[int]:
    """Widths of the decoder from code to row: [x, hidden..., cols]."""
    return [x, *hidden_widths(options.decoder, x, options.sizes), cols]


def encoder_widths(options: AutoencoderOptions, x: int, cols: int) -> list[int]:
    return [cols, *hidden_widths(options.encoder, x, options.sizes), x]


def decoder_has_biases(widths: Sequence[int]) -> bool:
    """Whether a decoder with these widths stores biases: a linear one (no hidden layer) is
    a low-rank factorisation and spends nothing on them."""
    return len(widths) > 2


def layers_numel(widths: Sequence[int], bias: bool) -> int:
    """Weights (and biases) of a stack of Linear layers with these widths."""
    return sum(a * b + (b if bias else 0) for a, b in pairwise(widths))


def stored_cost(options: AutoencoderOptions, rows: int, cols: int, x: int) -> int:
    """Numbers stored for `rows` stacked rows of width `cols` at latent width x."""
    norms = rows if options.norm else 0
    skip = x * cols if options.has_skip else 0
    widths = decoder_widths(options, x, cols)
    return rows * x + layers_numel(widths, decoder_has_biases(widths)) + skip + norms


def rounds_basis(options: AutoencoderOptions, spec: GroupSpec) -> bool:
    """Whether the decoder is a linear one quantized by the stage, stored as its basis
    `w0t` = w0^T [x, cols] (grouped along a row's columns) and fitted by alternation."""
    return spec.quantize is not None and options.quantize_decoder and not options.decoder


def decoder_matrices(
    options: AutoencoderOptions, x: int, cols: int, basis: bool = False
) -> dict[str, tuple[int, int]]:
    """The decoder's stored matrices by name, with their shapes: each layer's weight `wI`
    [out, in] and the skip path [cols, x] (its biases are vectors); with `basis`, a linear
    decoder's weight as its transpose `w0t` [x, cols] (`rounds_basis`)."""
    if basis:
        return {"w0t": (x, cols)}
    widths = decoder_widths(options, x, cols)
    shapes = {f"w{i}": (b, a) for i, (a, b) in enumerate(pairwise(widths))}
    return shapes | ({"skip": (cols, x)} if options.has_skip else {})


def group_bits(options: AutoencoderOptions, spec: GroupSpec, x: int) -> int:
    """Bits stored for a group at latent width x: each member's codes [rows, x] and, with
    `quantize_decoder`, the decoder's matrices as the group's stage stores a matrix (floats
    without a stage); biases and norms as floats. Without a stage: stored_cost's floats."""
    codes = spec.count * spec.matrix_bits(spec.rows, x)
    matrices = decoder_matrices(options, x, spec.cols, rounds_basis(options, spec)).values()
    if options.quantize_decoder:
        decoder = sum(spec.matrix_bits(rows, cols) for rows, cols in matrices)
    else:
        decoder = spec.floats(sum(rows * cols for rows, cols in matrices))
    vectors = (
        stored_cost(options, spec.count * spec.rows, spec.cols, x) - spec.count * spec.rows * x
    )
    vectors -= sum(rows * cols for rows, cols in matrices)
    return codes + decoder + spec.floats(vectors)


def solve_latent_width(
    options: AutoencoderOptions, rows: int, cols: int, budget: float, group: str
) -> int:
    """The largest x in [1, cols] whose codes + decoder + norms fit `budget`."""
    return solve_width(lambda x: stored_cost(options, rows, cols, x), budget, cols, group)
