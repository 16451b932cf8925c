"""Calibration statistics: what the data-aware methods know about a target's inputs.

Calibration text is WikiText-2 *train* text (never the reported split), or the user's own
(`data`: a local text, JSONL or parquet file or a saved `datasets` folder), cut into random
windows with a fixed seed. One pass through the dense model collects, per target:
- `xtx`: the input second moment sum_t x_t x_t^T [in, in] and `abs_mean`: mean |x| per
  input channel [in] (`InputMoments`: float64 sums, no activations kept);
- `counts`: for an embedding, how often each token occurs [vocab] in the whole split's
  text (not only the windows): the diagonal of X^T X for its one-hot inputs, so
  activation-aware methods weight the rows of frequent tokens;
- `fisher` / `l1`: sums over calibration sequences of the squared / absolute gradient of
  the model's own LM loss with respect to the weight [out, in] (one sequence per step);
  `out_fisher`: the sum over tokens of the squared gradient of that loss with respect to
  each output of the module [out] (how much the loss reacts to each output).
Statistics are cached in a safetensors file keyed by the weights, targets and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.cache import InvalidEntry, cache_dir, read_entry, write_entry
from aecompress.data import local_text, wikitext2_text
from aecompress.errors import AecompressError
from aecompress.memory import trim_heap
from aecompress.models import (
    check_positions,
    is_causal_lm,
    is_masked_lm,
    model_device,
    tokenize_whole,
)
from aecompress.numerics import all_finite
from aecompress.progress import progress_bar
from aecompress.targets import STRUCTURED_PARTS, Target, dense_weight, weight_matrix

INPUT_MOMENTS = frozenset({"xtx", "abs_mean"})  # of a linear layer's inputs: one forward pass
ACTIVATION_STATISTICS = INPUT_MOMENTS | {"counts"}
GRADIENT_STATISTICS = frozenset({"fisher", "l1", "out_fisher"})


# A seed of every random choice (torch generators take up to 64 bits; 32 leave room).
Seed = Annotated[int, Field(ge=0, lt=1 << 32)]


class CalibrationConfig(BaseModel):
    """Which text (`data`: a local file or `datasets` folder, recorded as an absolute
    path; else WikiText-2's `split`), how much of it, and the seed that picks the windows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=8)
    split: Literal["train", "validation"] = "train"
    data: str | None = None
    batch_size: int = Field(8, ge=1)
    seed: Seed = 0

    @field_validator("data")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else os.path.abspath(os.path.expanduser(value))

    def check(self) -> None:
        """Refuse, before any work, a `data` path that does not exist."""
        if self.data is not None and not Path(self.data).exists():
            raise AecompressError(f"no such calibration data file or folder: {self.data}")

    def text(self) -> str:
        """The calibration text."""
        return wikitext2_text(self.split) if self.data is None else local_text(Path(self.data))

    def fingerprint(self) -> dict[str, object]:
        """The settings and, for a local text, the sha256 of its content (cache keys)."""
        settings: dict[str, object] = self.model_dump()
        if self.data is not None:
            settings["data_sha256"] = hashlib.sha256(self.text().encode()).hexdigest()
        return settings


@dataclass
class TargetStatistics:
    """Calibration statistics of one target; fields not asked for stay None."""

    tokens: int = 0
    xtx: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    l1: torch.Tensor | None = None
    out_fisher: torch.Tensor | None = None


_TENSOR_FIELDS = [f.name for f in fields(TargetStatistics) if f.name != "tokens"]


def _check_finite(stats: dict[str, TargetStatistics]) -> None:
    """Refuse statistics that overflowed (huge weights before a target)."""
    for name, entry in stats.items():
        for field in _TENSOR_FIELDS:
            value = getattr(entry, field)
            if value is not None and not all_finite(value):
                raise AecompressError(
                    f"calibration statistics ({field}) of {name} are not finite: the "
                    "model's activations or gradients overflow"
                )


def calibration_ids(tokenizer: PreTrainedTokenizerBase, config: CalibrationConfig) -> torch.Tensor:
    """Every token id of the calibration text."""
    ids = torch.tensor(tokenize_whole(tokenizer, config.text())["input_ids"], dtype=torch.long)
    trim_heap()  # the tokeniser's many small allocations, freed
    return ids


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    config: CalibrationConfig,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`samples` random windows [samples, seq_len] of the split's token ids (seeded)."""
    ids = calibration_ids(tokenizer, config) if ids is None else ids
    if ids.numel() < config.seq_len + 1:
        raise AecompressError(f"calibration text has fewer than {config.seq_len} tokens")
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seq_len, (config.samples,), generator=generator)
    return torch.stack([ids[s : s + config.seq_len] for s in starts.tolist()])


def _unique_paths(targets: list[Target]) -> dict[str, str]:
    """Module path -> kind, once per module (the parts of a fused module share inputs)."""
    return {t.path: t.kind for t in targets if t.kind != "embedding"}


CHUNK_ROWS = 1024  # rows of an input product made (in float32) before joining its sum


@dataclass
class InputMoments:
    """Input statistics of one module, summed over batches in float64: the Gram
    X^T X [in, in], sum |x| [in] and, given the same module's inputs in a second (dense)
    stream, the cross moment X_d^T X [in_d, in]. Batches are read in float32 and products
    made CHUNK_ROWS rows at a time, each added in place: never a float64 copy of a batch
    nor a full-size product beside the sums."""

    tokens: int = 0
    gram: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    cross: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Add a batch of inputs [..., in] (and the dense stream's [..., in_d])."""
        x = _rows(inputs)
        self.gram = _add_product(self.gram, x, x)
        self.abs_sum = _add_sum(self.abs_sum, torch.linalg.vector_norm(x, 1, dim=0))
        if dense is not None:
            self.cross = _add_product(self.cross, _rows(dense), x)
        self.tokens += x.shape[0]

    def statistics(self) -> TargetStatistics:
        """xtx (the Gram itself, not a copy) and abs_mean; empty before any batch."""
        if self.gram is None or self.abs_sum is None:
            return TargetStatistics()
        return TargetStatistics(self.tokens, self.gram, self.abs_sum / self.tokens)


def _rows(inputs: torch.Tensor) -> torch.Tensor:
    """A batch of inputs as rows [tokens, in], float32 (a view when it is float32)."""
    return inputs.detach().reshape(-1, inputs.shape[-1]).float()


def _add_product(
    total: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """total + left^T right in float64, in place; the product is made in float32,
    CHUNK_ROWS of its rows at a time (the first batch starts the sum at zero)."""
    if total is None:
        shape = (left.shape[1], right.shape[1])
        total = torch.zeros(shape, dtype=torch.float64, device=left.device)
    for start in range(0, left.shape[1], CHUNK_ROWS):
        total[start : start + CHUNK_ROWS] += left[:, start : start + CHUNK_ROWS].T @ right
    return total


def _add_sum(total: torch.Tensor | None, batch: torch.Tensor) -> torch.Tensor:
    """total + batch in float64, in place (the first batch starts the sum)."""
    if total is None:
        return batch.double()
    return total.add_(batch)


class InputAccumulator:
    """InputMoments of modules by key, fed one forward pass at a time. Modules that read
    the same input tensor in a pass (q, k, v; up, gate) share one entry, which adds that
    tensor once; tensors are recognised by identity, without keeping them alive."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.moments = {key: InputMoments() for key in keys}
        self._first: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}

    def new_pass(self) -> None:
        self._first.clear()

    def add(self, key: str, inputs: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Add module `key`'s input of this pass (see InputMoments.add)."""
        seen = self._first.get(id(inputs))
        if seen is not None and seen[0]() is inputs and seen[1] != key:
            self.moments[key] = self.moments[seen[1]]  # read by an earlier module: shared
            return
        self._first[id(inputs)] = (weakref.ref(inputs), key)
        self.moments[key].add(inputs, dense)

    def statistics(self) -> dict[str, TargetStatistics]:
        """TargetStatistics by key; keys sharing an entry share its tensors."""
        unique = {id(m): m.statistics() for m in self.moments.values()}
        return {key: unique[id(m)] for key, m in self.moments.items()}


@contextmanager
def _input_hooks(model: nn.Module, accumulator: InputAccumulator) -> Iterator[None]:
    """Add each module's input (the accumulator's keys are module paths) to `accumulator`
    as the model's forward passes reach it, while the context is open."""

    def hook(path: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        return lambda _module, inputs: accumulator.add(path, inputs[0])

    handles = [model.register_forward_pre_hook(lambda _module, _args: accumulator.new_pass())]
    handles += [
        model.get_submodule(path).register_forward_pre_hook(hook(path))
        for path in accumulator.moments
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lm_loss(
    model: PreTrainedModel, batch: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The model's own LM loss on `batch`: causal, or masked (15% of tokens) for MLM heads."""
    if is_causal_lm(model):
        return model(input_ids=batch, labels=batch).loss
    if is_masked_lm(model):
        mask_id = model.config.to_dict().get("mask_token_id") or 103
        chosen = (torch.rand(batch.shape, generator=generator) < 0.15).to(batch.device)
        labels = torch.where(chosen, batch, torch.full_like(batch, -100))
        return model(input_ids=torch.where(chosen, mask_id, batch), labels=labels).loss
    raise AecompressError(
        f"Fisher / L1 statistics need the model's LM loss, and {type(model).__name__} has "
        "no LM head "
        "(load it with its causal or masked LM head)"
    )


def _weight_slice(grad: torch.Tensor, target: Target) -> torch.Tensor:
    grad = grad.T if target.kind == "conv1d" else grad
    if target.part is not None:
        index, count = target.part
        rows = grad.shape[0] // count
        grad = grad[index * rows : (index + 1) * rows]
    return grad


def _row_slice(values: torch.Tensor, target: Target) -> torch.Tensor:
    """A fused target's part of per-output values [out] (others: unchanged)."""
    if target.part is None:
        return values
    index, count = target.part
    rows = values.shape[0] // count
    return values[index * rows : (index + 1) * rows]


@contextmanager
def _output_gradient_hooks(
    model: nn.Module, targets: list[Target], sums: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Accumulate, per module, the squared gradient of the loss w.r.t. each output."""

    def forward_hook(path: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return

            def accumulate(grad: torch.Tensor) -> None:
                squares = grad.detach().double().pow(2).reshape(-1, grad.shape[-1]).sum(0)
                sums[path] = squares + sums[path] if path in sums else squares

            output.register_hook(accumulate)

        return hook

    paths = {t.path for t in targets if t.kind != "embedding"}
    handles = [model.get_submodule(p).register_forward_hook(forward_hook(p)) for p in paths]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _accumulate_weight_gradients(
    weights: dict[str, torch.Tensor],
    targets: list[Target],
    needed: set[str],
    stats: dict[str, TargetStatistics],
) -> None:
    for target in targets:
        grad = weights[target.name].grad
        if grad is None:
            continue
        grad = _weight_slice(grad, target).double()
        entry = stats[target.name]
        if "fisher" in needed:
            entry.fisher = grad.pow(2) + (entry.fisher if entry.fisher is not None else 0)
        if "l1" in needed:
            entry.l1 = grad.abs() + (entry.l1 if entry.l1 is not None else 0)


def _collect_gradients(
    model: PreTrainedModel,
    windows: torch.Tensor,
    targets: list[Target],
    needed: set[str],
    stats: dict[str, TargetStatistics],
    progress: bool,
) -> None:
    weights = {t.name: dense_weight(model.get_submodule(t.path), "linear") for t in targets}
    flags = {p: p.requires_grad for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    outputs: dict[str, torch.Tensor] = {}
    try:
        with _output_gradient_hooks(model, targets, outputs):
            for sequence in progress_bar(windows, desc="calibration gradients", enabled=progress):
                model.zero_grad(set_to_none=True)
                _lm_loss(model, sequence[None].to(model_device(model)), generator).backward()
                _accumulate_weight_gradients(weights, targets, needed, stats)
        for target in targets:
            if "out_fisher" in needed and target.path in outputs:
                stats[target.name].out_fisher = _row_slice(outputs[target.path], target)
    finally:
        model.zero_grad(set_to_none=True)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def collect_statistics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    targets: list[Target],
    needed: set[str],
    config: CalibrationConfig,
    *,
    progress: bool = True,
) -> dict[str, TargetStatistics]:
    """Statistics of each target (by Target.name) that `needed` names, from one pass."""
    unknown = needed - ACTIVATION_STATISTICS - GRADIENT_STATISTICS
    if unknown:
        raise ValueError(f"unknown calibration statistics {sorted(unknown)}")
    if tokenizer is None:
        raise AecompressError("calibration needs the model's tokenizer")
    check_positions(model, config.seq_len)
    ids = calibration_ids(tokenizer, config)
    windows = calibration_windows(tokenizer, config, ids)
    accumulator = InputAccumulator(_unique_paths(targets))
    if needed & INPUT_MOMENTS and accumulator.moments:  # counts need no pass
        batches = windows.split(config.batch_size)
        with torch.inference_mode(), _input_hooks(model, accumulator):
            for batch in progress_bar(batches, desc="calibration activations", enabled=progress):
                model(input_ids=batch.to(model_device(model)))
    by_path = accumulator.statistics()
    vocab = int(dense_weight(model.get_input_embeddings(), "embedding").shape[0])
    # token counts over the whole split (tokenised anyway), not only the sampled windows:
    # 64 x 256 window tokens miss most of the vocabulary (MiniLM STS-B dev: -1.4 points)
    counts = torch.bincount(ids, minlength=vocab).double()
    stats = {}
    for target in targets:
        source = by_path.get(target.path, TargetStatistics())
        entry = TargetStatistics(source.tokens, source.xtx, source.abs_mean)
        if target.kind == "embedding" and needed & ACTIVATION_STATISTICS:
            entry.counts, entry.tokens = counts, ids.numel()
        stats[target.name] = entry
    if needed & GRADIENT_STATISTICS:
        _collect_gradients(model, windows, targets, needed, stats, progress)
    _check_finite(stats)
    return stats


def cache_key(
    base_sha256: str, targets: list[Target], needed: set[str], config: CalibrationConfig
) -> str:
    """A key that changes whenever the weights, targets, statistics or settings do."""
    payload = {
        "weights": base_sha256,
        "targets": [t.name for t in targets],
        "needed": sorted(needed),
        "config": config.fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def save_statistics(stats: dict[str, TargetStatistics], path: Path) -> None:
    """Write statistics to a safetensors file; a tensor shared by several
    targets (one input read by several modules) is written once."""
    tensors, tokens, aliases = {}, {}, {}
    written: dict[int, str] = {}
    for name, entry in stats.items():
        tokens[name] = entry.tokens
        for field in _TENSOR_FIELDS:
            value = getattr(entry, field)
            if value is None:
                continue
            key = f"{name}::{field}"
            if id(value) in written:
                aliases[key] = written[id(value)]
                continue
            written[id(value)] = key
            tensors[key] = value.contiguous().cpu()
    metadata = {"tokens": json.dumps(tokens), "aliases": json.dumps(aliases)}
    save_file(tensors, str(path), metadata=metadata)


def load_statistics(path: Path) -> dict[str, TargetStatistics]:
    """What save_statistics wrote; metadata or tensor names of another form: InvalidEntry."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tokens, aliases = json.loads(metadata["tokens"]), json.loads(metadata.get("aliases", "{}"))
    if not _mapping(tokens, int) or not _mapping(aliases, str):
        raise InvalidEntry("its metadata is not a mapping of token counts and aliases")
    stats = {name: TargetStatistics(count) for name, count in tokens.items()}
    loaded = load_file(str(path))
    for key, kept in aliases.items():
        if kept not in loaded:
            raise InvalidEntry(f"alias {key} -> {kept}: no such tensor")
    for key, tensor in [*loaded.items(), *((k, loaded[v]) for k, v in aliases.items())]:
        name, _, field = key.rpartition("::")
        if name not in stats or field not in _TENSOR_FIELDS:
            raise InvalidEntry(f"unknown statistic {key}")
        setattr(stats[name], field, tensor)
    return stats


def _mapping(value: object, kind: type) -> bool:
    """Whether `value` is a dict of strings to `kind` (not bool for int)."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool)
        for k, v in value.items()
    )


def _shapes(model: nn.Module, target: Target) -> dict[str, tuple[int, ...]]:
    """The shape of each statistic of a target whose matrix is [rows, cols]."""
    rows, cols = weight_matrix(model, target).shape
    if target.kind in STRUCTURED_PARTS:  # measured at its path: ffn at down, attn at q
        rows, cols = dense_weight(model.get_submodule(target.path), "linear").shape
    return {
        "xtx": (cols, cols),
        "abs_mean": (cols,),
        "counts": (rows,),  # an embedding's rows are its tokens
        "fisher": (rows, cols),
        "l1": (rows, cols),
        "out_fisher": (rows,),
    }


def _required(target: Target, needed: set[str]) -> set[str]:
    """The statistics a pass collecting `needed` gives the target (collect_statistics:
    counts only to an embedding, the input moments only when `needed` names one)."""
    embedding = target.kind == "embedding"
    required = set()
    if embedding and needed & ACTIVATION_STATISTICS:
        required |= {"counts"}
    if not embedding and needed & INPUT_MOMENTS:
        required |= INPUT_MOMENTS
    if needed & GRADIENT_STATISTICS:
        required |= {"fisher", "l1"} | (set() if embedding else {"out_fisher"})
    return required


def check_statistics(
    stats: dict[str, TargetStatistics], model: nn.Module, targets: list[Target], needed: set[str]
) -> dict[str, TargetStatistics]:
    """`stats` (read from a cache file), once each target has every statistic a pass gives
    it, finite, of its shape; else InvalidEntry."""
    for target in targets:
        entry = stats.get(target.name)
        if entry is None:
            raise InvalidEntry(f"no statistics of {target.name}")
        if missing := sorted(f for f in _required(target, needed) if getattr(entry, f) is None):
            raise InvalidEntry(f"no {missing[0]} of {target.name}")
        for field, shape in _shapes(model, target).items():
            value = getattr(entry, field)
            if value is None:
                continue
            if not value.is_floating_point() or tuple(value.shape) != shape:
                raise InvalidEntry(f"{field} of {target.name} is not a {list(shape)} float tensor")
            if not all_finite(value):
                raise InvalidEntry(f"{field} of {target.name} is not finite")
    return stats


def cached_statistics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    targets: list[Target],
    needed: set[str],
    config: CalibrationConfig,
    base_sha256: str,
    *,
    progress: bool = True,
) -> dict[str, TargetStatistics]:
    """collect_statistics, reusing an earlier run's file when everything matches.

    A pass collects everything it gets for free, so that methods asking for part of it
    share one file: an activation pass gives xtx, abs_mean and counts, a gradient pass
    Fisher and L1.
    """
    if needed & INPUT_MOMENTS:
        needed = needed | ACTIVATION_STATISTICS
    if needed & GRADIENT_STATISTICS:
        needed = needed | GRADIENT_STATISTICS
    path = (
        cache_dir()
        / "calibration"
        / f"{cache_key(base_sha256, targets, needed, config)}.safetensors"
    )
    cached = read_entry(
        path, lambda p: check_statistics(load_statistics(p), model, targets, needed)
    )
    if cached is not None:
        return cached
    stats = collect_statistics(model, tokenizer, targets, needed, config, progress=progress)
    write_entry(path, partial(save_statistics, stats))
    return stats
