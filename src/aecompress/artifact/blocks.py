"""The BlockSource of an artifact folder: its model filled one transformer block at a time.

The skeleton is the model its config describes (meta device, checked against every group
as `load_compressed` checks it); loading block i puts in it the serving modules of the
groups' members in that block (each group's shared tensors and those members' own, read
from the weights file one tensor at a time), then the block's untouched tensors; releasing
it puts the empty block back. The modules outside the blocks (embeddings, final norm,
head) are filled the same way. These are the modules `load_compressed` builds, so the
outputs are the same; the memory held is one block's (and the outside modules'), not the
model's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.artifact.load import (
    artifact_tokenizer,
    checked_skeleton,
    group_from_entry,
    stored_from_entry,
)
from aecompress.artifact.manifest import (
    PREFIX,
    GroupEntry,
    Manifest,
    check_groups,
    check_storage_dtype,
    load_manifest,
)
from aecompress.artifact.weights import verify_weights
from aecompress.errors import AecompressError, first_line
from aecompress.methods import Method, make_method
from aecompress.models import check_vocabulary
from aecompress.numerics import all_finite
from aecompress.substitution import Serving, inject
from aecompress.targets import Group, transformer_blocks
from aecompress.tensorfile import SafetensorsError, SafetensorsFiles


@dataclass(frozen=True)
class _Members:
    """Some members of a group (by their indices in it), rebuilt together."""

    entry: GroupEntry
    group: Group
    method: Method
    indices: tuple[int, ...]


class ArtifactBlocks:
    """The BlockSource of the artifact at `path` (see the module); `serving` as for
    `load_compressed` (runtime: the methods' own modules; decoded: dense matrices)."""

    def __init__(self, path: str | Path, serving: Serving = "runtime") -> None:
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.files = checked_files(self.path, self.manifest)
        self.model: PreTrainedModel = checked_skeleton(self.path, self.manifest).eval()
        self.tokenizer: PreTrainedTokenizerBase | None = artifact_tokenizer(self.path)
        check_vocabulary(self.model, self.tokenizer, str(self.path))
        found = transformer_blocks(self.model)
        if found is None:
            raise AecompressError(f"{type(self.model).__name__}: no transformer blocks to stream")
        self.blocks_path, self.blocks = found
        self.serving = serving
        self._empty_blocks = [copy.deepcopy(block) for block in self.blocks]
        self._empty_outside = {
            path: copy.deepcopy(self.model.get_submodule(path)) for path in self.outside_paths()
        }
        # untouched tensors: the model's name -> the file's (a tied one: its kept twin)
        self._untouched = {k: k for k in self.files if not k.startswith(PREFIX)}
        self._untouched.update(self.manifest.aliases)
        known = (f"{self.blocks_path}.", *(f"{p}." for p in self._empty_outside))
        if strangers := [k for k in self._untouched if not k.startswith(known)]:
            raise AecompressError(f"artifact holds unknown tensors: {strangers[:3]}")

    def load(self, index: int, device: torch.device) -> None:
        self.blocks[index] = copy.deepcopy(self._empty_blocks[index])
        self._fill([f"{self.blocks_path}.{index}"], device)

    def release(self, index: int) -> None:
        self.blocks[index] = self._empty_blocks[index]

    def load_outside(self, paths: Iterable[str], device: torch.device) -> None:
        paths = list(paths)
        for path in paths:
            self.model.set_submodule(path, copy.deepcopy(self._empty_outside[path]))
        self._fill(paths, device)

    def release_outside(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.model.set_submodule(path, self._empty_outside[path])

    def outside_paths(self) -> list[str]:
        """Paths of the modules outside the blocks that own parameters or persistent
        buffers, in model order."""
        inside = f"{self.blocks_path}."
        owners = (name.rpartition(".")[0] for name in self.model.state_dict(keep_vars=True))
        return list(dict.fromkeys(p for p in owners if not f"{p}.".startswith(inside)))

    def _fill(self, paths: Sequence[str], device: torch.device) -> None:
        """The modules at `paths` (empty copies in place) filled: the groups' members under
        them, then the untouched tensors under them; none left without a value; in eval
        mode."""
        prefixes = tuple(f"{path}." for path in paths)
        for members in self._members_under(prefixes):
            self._inject(members, device)
        values: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}  # by the file's key: tied tensors read once
        for name, key in self._untouched.items():
            if name.startswith(prefixes):
                if key not in kept:
                    kept[key] = self._read(key, device)
                values[name] = kept[key]
        result = self.model.load_state_dict(values, strict=False, assign=True)
        if result.unexpected_keys:
            raise AecompressError(f"artifact holds unknown tensors: {result.unexpected_keys[:3]}")
        for path in paths:
            module = self.model.get_submodule(path).eval()  # the serving modules too
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if tensor.is_meta:
                    raise AecompressError(f"artifact leaves {path}.{name} without a value")

    def _members_under(self, prefixes: tuple[str, ...]) -> list[_Members]:
        """Each group's members whose modules lie under one of `prefixes`."""
        found = []
        for entry in self.manifest.groups:
            group = group_from_entry(entry)
            indices = tuple(
                i for i, t in enumerate(group.members) if f"{t.path}.".startswith(prefixes)
            )
            if indices:
                found.append(
                    _Members(entry, group, make_method(entry.method, entry.options), indices)
                )
        return found

    def _inject(self, members: _Members, device: torch.device) -> None:
        """The members' serving modules in place, from the group's shared tensors and
        their own."""
        prefix = f"{PREFIX}{members.entry.name}."
        heads = ("shared.", *(f"{i}." for i in members.indices))
        tensors = {
            key: self._read(key, device)
            for key in self.files
            if key.startswith(prefix) and key[len(prefix) :].startswith(heads)
        }
        stored = stored_from_entry(members.entry, members.method, tensors)
        tied = self.manifest.tied_output if members.entry.family == "embed" else None
        try:
            inject(
                self.model,
                members.group,
                members.method,
                stored,
                tied,
                self.serving,
                only=members.indices,
            )
        except (AttributeError, KeyError, IndexError, RuntimeError) as error:
            raise AecompressError(
                f"group {members.entry.name} does not fit this model: {error}"
            ) from error

    def _read(self, key: str, device: torch.device) -> torch.Tensor:
        """A tensor of the weights file, floating ones in float32, on `device`; refused
        when it holds NaN or infinite values (saving refuses them)."""
        try:
            tensor = self.files.read(key, torch.float32)
        except SafetensorsError as error:
            raise AecompressError(str(error)) from error
        if not all_finite(tensor):
            raise AecompressError(f"{self.path}: the tensor {key} holds NaN or infinite values")
        return tensor.to(device)


def checked_files(path: Path, manifest: Manifest) -> SafetensorsFiles:
    """The artifact's weights, size and sha256 verified, their headers checked against the
    manifest (storage dtype; each group's tensors, counts and bits)."""
    try:
        files = SafetensorsFiles(verify_weights(path, manifest))
    except SafetensorsError as error:
        raise AecompressError(f"{path}: {first_line(error)}") from error
    headers = {key: files.header(key) for key in files}
    floating = {str(d).removeprefix("torch.") for d, _ in headers.values() if d.is_floating_point}
    check_storage_dtype(manifest, floating)
    check_groups(manifest, {k: (list(s), 8 * d.itemsize) for k, (d, s) in headers.items()})
    return files
