"""Models larger than memory, one transformer block at a time.

The model is a skeleton (every parameter on the meta device: no weight memory; buffers
real) whose blocks a BlockSource fills from disk when a step needs them and empties
after, so a pass over the model holds one block's weights, not the model's.
CheckpointBlocks is the source of a dense safetensors checkpoint: each tensor read by
plain file reads (tensorfile.SafetensorsFiles), upcast to float32 as `models.load_model`
loads it. Tied parameters (an output head sharing the input embedding) stay one
Parameter: filled and emptied together.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedModel

from aecompress.errors import AecompressError, first_line
from aecompress.models import EMBEDDED, load_config, resolve_embedded
from aecompress.targets import transformer_blocks
from aecompress.tensorfile import SafetensorsError, SafetensorsFiles


def skeleton_from_checkpoint(folder: str | Path, auto_class: str) -> PreTrainedModel:
    """The model of `folder`'s config under `auto_class` (e.g. AutoModelForCausalLM),
    float32, built without weight memory: parameters on the meta device (tied ones tied),
    buffers real. Fill it with a BlockSource."""
    try:
        config = load_config(str(folder))
        with init_empty_weights():
            model = getattr(transformers, auto_class).from_config(
                config, dtype=torch.float32, trust_remote_code=False
            )
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise AecompressError(f"cannot build the model of {folder}: {first_line(error)}") from error
    model.tie_weights()
    model.eval()
    return model


class BlockSource(Protocol):
    """Fills a skeleton's parameters from somewhere (a checkpoint, an artifact) a part at a
    time, in place, and empties them again (back on the meta device, memory returned)."""

    model: PreTrainedModel
    blocks_path: str  # the path of the ModuleList of transformer blocks
    blocks: nn.ModuleList

    def load(self, index: int, device: torch.device) -> None:
        """Materialise block `index`: its parameters read, float32, on `device`."""

    def release(self, index: int) -> None:
        """Put block `index`'s parameters back on the meta device."""

    def load_outside(self, paths: Iterable[str], device: torch.device) -> None:
        """Materialise the parameters of the modules at `paths`, outside the blocks."""

    def release_outside(self, paths: Iterable[str]) -> None:
        """Put the parameters of the modules at `paths` back on the meta device."""

    def outside_paths(self) -> list[str]:
        """Paths of the modules outside the blocks that own parameters, in model order."""


class CheckpointBlocks:
    """The BlockSource of a dense safetensors checkpoint (a folder, single-file or
    sharded, or its files) for `skeleton`, the model its config describes: every
    parameter and persistent buffer of the skeleton must be in the files with its shape
    (checked up front, from the headers)."""

    def __init__(
        self, skeleton: PreTrainedModel, files: SafetensorsFiles | str | Path | list[Path]
    ) -> None:
        found = transformer_blocks(skeleton)
        if found is None:
            raise AecompressError(
                f"{type(skeleton).__name__}: no transformer blocks found to stream"
            )
        self.model = skeleton
        self.blocks_path, self.blocks = found
        try:
            self.files = files if isinstance(files, SafetensorsFiles) else SafetensorsFiles(files)
        except SafetensorsError as error:
            raise AecompressError(str(error)) from error
        self.aliases = tied_names(skeleton)
        self.file_keys = self._match_keys()

    def load(self, index: int, device: torch.device) -> None:
        self._fill(self._names_under([f"{self.blocks_path}.{index}"]), device)

    def release(self, index: int) -> None:
        self._empty(self._names_under([f"{self.blocks_path}.{index}"]))

    def load_outside(self, paths: Iterable[str], device: torch.device) -> None:
        self._fill(self._names_under(self._outside(paths)), device)

    def release_outside(self, paths: Iterable[str]) -> None:
        self._empty(self._names_under(self._outside(paths)))

    def outside_paths(self) -> list[str]:
        inside = f"{self.blocks_path}."
        names = (a for name in self.file_keys for a in self.aliases.get(name, [name]))
        owners = (name.rpartition(".")[0] for name in names)
        return list(dict.fromkeys(p for p in owners if not f"{p}.".startswith(inside)))

    def read(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The value of the model's parameter or persistent buffer `name` (any name of a
        tied one) as the model loaded whole has it: the checkpoint's tensor, floating ones
        in `dtype` (None: the file's dtype), or a buffer the model computes itself."""
        canonical = self.aliases.get(name, [name])[0]
        if canonical in self.file_keys:
            return self.files.read(self.file_keys[canonical], dtype)
        return _get(self.model, canonical)

    def _outside(self, paths: Iterable[str]) -> list[str]:
        paths = list(paths)
        inside = [p for p in paths if f"{p}.".startswith(f"{self.blocks_path}.")]
        if inside:
            raise ValueError(f"{inside[0]} lies inside the blocks: load it with load()")
        return paths

    def _names_under(self, paths: Sequence[str]) -> list[str]:
        """Parameter and persistent buffer names under the module paths (all aliases of a
        tied parameter: its copies elsewhere are filled and emptied with it)."""
        prefixes = tuple(f"{p}." if p else "" for p in paths)
        blocks = f"{self.blocks_path}."
        skip_blocks = not all(p.startswith(blocks) for p in prefixes)  # outside paths
        return [
            name
            for name in self.file_keys
            if any(
                a.startswith(prefixes) and not (skip_blocks and a.startswith(blocks))
                for a in self.aliases.get(name, [name])
            )
        ]

    def _fill(self, names: list[str], device: torch.device) -> None:
        for name in names:
            current = _get(self.model, name)
            value = self.read(name).to(device)
            if isinstance(current, nn.Parameter):
                value = nn.Parameter(value, requires_grad=current.requires_grad)
            for alias in self.aliases.get(name, [name]):
                _set(self.model, alias, value)

    def _empty(self, names: list[str]) -> None:
        """Parameters back on the meta device; buffers (small) stay, and so does what a
        compressed module holds in a parameter's place (its stored tensors)."""
        for name in names:
            current = _parameter(self.model, name)
            if current is None:
                continue
            empty = nn.Parameter(
                torch.empty_like(current, device="meta"), requires_grad=current.requires_grad
            )
            for alias in self.aliases.get(name, [name]):
                if _parameter(self.model, alias) is current:
                    _set(self.model, alias, empty)

    def _match_keys(self) -> dict[str, str]:
        """The checkpoint key of every parameter and persistent buffer (tied parameters
        under one name, the first the model lists), shapes checked."""
        prefix = getattr(self.model, "base_model_prefix", "")
        head, embedding = (
            _weight_name(self.model, module)
            for module in (self.model.get_output_embeddings(), self.model.get_input_embeddings())
        )
        found: dict[str, str] = {}
        state = self.model.state_dict(keep_vars=True)
        for name, tensor in state.items():
            group = self.aliases.get(name, [name])
            if group[0] != name:
                continue  # a tied parameter's other names
            candidates = [k for alias in group for k in (alias, f"{prefix}.{alias}")]
            candidates += [a.removeprefix(f"{prefix}.") for a in group]
            key = next((k for k in candidates if k in self.files), None)
            if key is None and name == head and embedding:  # untied from a tied checkpoint
                key = found.get(embedding)
            if key is None:
                if isinstance(tensor, nn.Parameter):
                    raise AecompressError(f"the checkpoint lacks the tensor {name}")
                continue  # a buffer the model computes itself
            shape = self.files.header(key)[1]
            if shape != tuple(tensor.shape):
                raise AecompressError(
                    f"the checkpoint's {key} is {list(shape)}, the config makes it "
                    f"{list(tensor.shape)}"
                )
            found[name] = key
        return found


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Every name of a parameter that several modules share -> all its names, the first
    the one model.named_parameters() gives."""
    by_identity: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(parameter), []).append(name)
    return {name: names for names in by_identity.values() if len(names) > 1 for name in names}


def checkpoint_sha256(source: CheckpointBlocks) -> str:
    """models.weights_sha256 of the model loaded whole in float32, computed a tensor at a
    time from the checkpoint: the same names in the same order, tied tensors once."""
    digest, seen = hashlib.sha256(), set()
    for name in sorted(source.model.state_dict(keep_vars=True)):
        canonical = source.aliases.get(name, [name])[0]
        if canonical in seen:
            continue
        seen.add(canonical)
        value = source.read(canonical)
        digest.update(name.encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _weight_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """The name of `module`'s weight parameter in `model` (None without the module)."""
    path = next((p for p, m in model.named_modules() if m is module), None)
    return None if path is None else f"{path}.weight"


# The in-memory path's peak over the model's float32 weights (the sequential pipeline on
# the TinyLlama shape, benchmarks/results/scale.md), until a finer estimate replaces it.
IN_MEMORY_PEAK = 1.3


def loaded_bytes(numbers: int) -> int:
    """About the memory a model of `numbers` parameters takes loaded whole: IN_MEMORY_PEAK
    times their float32 bytes."""
    return int(IN_MEMORY_PEAK * 4 * numbers)


def in_memory_bytes(folder: str | Path) -> int:
    """About the memory the checkpoint in `folder` (or an artifact) takes loaded whole
    (loaded_bytes of its tensors)."""
    files = SafetensorsFiles(folder)
    return loaded_bytes(sum(math.prod(files.header(key)[1]) for key in files))


def why_not_streamable(name: str) -> str:
    """Why the model `name` cannot stream (streamable_folder found no folder for it)."""
    if name.endswith(".gguf") or (name in EMBEDDED and EMBEDDED[name].gguf):
        return (
            "streaming reads safetensors checkpoints, and a GGUF file is de-quantised whole "
            "when loaded: drop --stream"
        )
    return "streaming reads a local folder of safetensors files"


def streamable_folder(name: str) -> Path | None:
    """The safetensors checkpoint folder that the model `name` (as load_model takes it) is
    read from, or None: a GGUF file, a hub id, a folder without safetensors files."""
    if name in EMBEDDED:
        return None if EMBEDDED[name].gguf else resolve_embedded(name)
    path = Path(name)
    return path.resolve() if path.is_dir() and any(path.glob("*.safetensors")) else None


def _parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter `name` of `model`, None when its module no longer has it."""
    owner, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(owner)._parameters.get(attr)
    except AttributeError:
        return None


def _get(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    value: torch.Tensor = getattr(model.get_submodule(owner), attr)
    return value


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        module._buffers[attr] = value
