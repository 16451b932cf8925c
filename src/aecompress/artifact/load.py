"""Loading an artifact folder back into a CompressedModel, checked first: the manifest
against the weights file (tensors, counts, ratios, storage dtype) and every group against
the model its config describes (family, kind, shape, width)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.artifact.manifest import (
    PREFIX,
    GroupEntry,
    Manifest,
    check_groups,
    check_storage_dtype,
    load_manifest,
)
from aecompress.artifact.weights import read_weights
from aecompress.budget import float_bits
from aecompress.compressed import CompressedGroup, CompressedModel, SlicedStream
from aecompress.errors import AecompressError, describe, first_line
from aecompress.memory import short_of_memory
from aecompress.methods import Method, MethodLayout, Stored, make_method
from aecompress.methods.base import GroupSpec
from aecompress.models import check_vocabulary, load_config, load_tokenizer
from aecompress.streaming import loaded_bytes
from aecompress.substitution import Serving, inject
from aecompress.targets import (
    CUSTOM_FAMILY,
    STRUCTURED_PARTS,
    Group,
    Target,
    head_dim,
    kv_heads,
    module_kind,
    resolve_targets,
    spec_kind,
    weight_matrix,
)


def load_compressed(
    path: str | Path, decode: bool = False, lazy: bool | None = None
) -> CompressedModel:
    """Rebuild the CompressedModel of an artifact folder.

    The model's skeleton is built without memory (meta device), each group's modules are
    rebuilt from its stored tensors, then the untouched tensors are assigned. With
    decode=True each matrix is decoded once into a dense weight (fastest to run, no longer
    compressed in memory); otherwise the methods' own runtime modules are used. `lazy`:
    the matrices whose runtime module is their decoded matrix (sparse methods) are
    rebuilt from the stored tensors, kept in the artifact's dtype, on every call instead
    (memory: the artifact's bytes; time: a decode per call); None: when the model
    decoded would not fit the available memory.
    """
    path = Path(path)
    manifest = load_manifest(path)
    tensors = read_weights(path, manifest)
    floating = {
        str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()
    }
    check_storage_dtype(manifest, floating)  # first: the bits of the groups depend on it
    check_groups(manifest, {k: (list(t.shape), 8 * t.element_size()) for k, t in tensors.items()})
    model = checked_skeleton(path, manifest)
    tokenizer = artifact_tokenizer(path)
    check_vocabulary(model, tokenizer, str(path))  # the embedding as the config makes it
    if lazy is None:
        lazy = not decode and _too_large_decoded(model, path)
    serving: Serving = "decoded" if decode else "lazy" if lazy else "runtime"
    groups = []
    for entry in manifest.groups:
        method = make_method(entry.method, entry.options)
        as_stored = serving == "lazy" and method.decodes_at_load
        stored = stored_from_entry(entry, method, tensors, None if as_stored else torch.float32)
        fitted = CompressedGroup(
            group_from_entry(entry),
            method,
            stored,
            entry.shape,
            float_bits(manifest.storage_dtype),
        )
        tied = manifest.tied_output if entry.family == "embed" else None
        try:
            inject(model, fitted.group, method, stored, tied, serving)
        except (AttributeError, KeyError, IndexError, RuntimeError) as error:
            raise AecompressError(f"group {entry.name} does not fit this model: {error}") from error
        groups.append(fitted)
    cm = CompressedModel(
        model,
        tokenizer,
        manifest.recipe,
        groups,
        base_model=manifest.base_model,
        auto_class=manifest.auto_class,
        base_sha256=manifest.base_weights_sha256,
        tied_output=manifest.tied_output,
        decoded=decode,
        aliases=manifest.aliases,
        storage_dtype=manifest.storage_dtype,
        sliced=SlicedStream(**manifest.sliced.model_dump()) if manifest.sliced else None,
    )
    _load_untouched(cm, {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()})
    model.eval()
    return cm


def _too_large_decoded(model: PreTrainedModel, path: Path) -> bool:
    """Whether the model with every matrix decoded (float32) would not fit the available
    memory, with the margin of loading (a note when so)."""
    return short_of_memory(
        f"{path} decoded",
        loaded_bytes(sum(p.numel() for p in model.parameters())),
        "sparse matrices are kept stored and decoded on each call (load with lazy=False "
        "to decode them once)",
    )


def group_from_entry(entry: GroupEntry) -> Group:
    """The group a manifest entry describes."""
    members = tuple(Target(m.path, entry.family, m.layer, m.kind, m.part) for m in entry.members)
    return Group(entry.name, entry.family, members)


def stored_from_entry(
    entry: GroupEntry,
    method: Method,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype | None = torch.float32,
) -> Stored:
    """The entry's stored tensors (taken out of `tensors`, as read from the weights files
    into memory of their own: the group's shared ones and its members', all or some),
    floating ones in `dtype` (None: as stored), as parameters under the method's
    validated layout."""
    prefix = f"{PREFIX}{entry.name}."

    def converted(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is None or not tensor.is_floating_point():
            return tensor
        return tensor.to(dtype)

    flat = {
        k[len(prefix) :]: converted(tensors.pop(k)) for k in list(tensors) if k.startswith(prefix)
    }
    layout = _layout(entry, method)
    try:
        stored = Stored.from_tensors(flat, len(entry.members), _width(entry), layout)
    except (ValueError, IndexError) as error:
        raise AecompressError(f"group {entry.name}: malformed stored tensor names") from error
    stored.info = entry.info
    return stored.as_parameters()


def _layout(entry: GroupEntry, method: Method) -> MethodLayout:
    """The group's validated layout."""
    try:
        return method.Layout.model_validate(entry.layout)
    except ValidationError as error:
        raise AecompressError(describe(error, f"group {entry.name} layout")) from error


def _width(entry: GroupEntry) -> int | tuple[int, ...]:
    return tuple(entry.width) if isinstance(entry.width, list) else entry.width


def artifact_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The artifact's tokenizer (None when it was saved without one)."""
    if not (path / "tokenizer_config.json").is_file():
        return None
    return load_tokenizer(str(path))


def _load_untouched(cm: CompressedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Assign the untouched tensors (tied ones share one); every parameter and persistent
    buffer of the model must come from the file or a group."""
    for key, kept in cm.aliases.items():
        if kept not in tensors:
            raise AecompressError(f"artifact alias {key} -> {kept}: no such tensor")
        tensors[key] = tensors[kept]
    try:
        result = cm.model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as error:
        raise AecompressError(
            f"artifact tensors do not fit the model: {first_line(error)}"
        ) from error
    if result.unexpected_keys:
        raise AecompressError(f"artifact holds unknown tensors: {result.unexpected_keys[:3]}")
    replaced = [p + "." for p in cm.replaced_paths()]
    missing = [k for k in result.missing_keys if not any(k.startswith(p) for p in replaced)]
    if missing:
        raise AecompressError(f"artifact is missing the tensor {missing[0]}")
    for key, kept in cm.aliases.items():  # tied tensors: one object again, as when saved
        _set_tensor(cm.model, key, _get_tensor(cm.model, kept))
    for name, tensor in [*cm.model.named_parameters(), *cm.model.named_buffers()]:
        if tensor.is_meta:
            raise AecompressError(f"artifact leaves {name} without a value")


def _get_tensor(model: torch.nn.Module, key: str) -> torch.Tensor:
    owner, _, name = key.rpartition(".")
    return getattr(model.get_submodule(owner), name)


def _set_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, name = key.rpartition(".")
    setattr(model.get_submodule(owner), name, tensor)


def checked_skeleton(path: Path, manifest: Manifest) -> PreTrainedModel:
    """The model its config describes, built without memory (meta device), after checking
    every group against it: members are matrices of its family with the recorded kind and
    shape, widths cost what the groups store, a tied output head is the model's own."""
    try:
        config = load_config(str(path))
    except (OSError, ValueError) as error:
        raise AecompressError(f"{path}: cannot read config.json: {first_line(error)}") from error
    try:
        with init_empty_weights():
            model = getattr(transformers, manifest.auto_class).from_config(
                config, trust_remote_code=False
            )
    except (ValueError, KeyError, AttributeError) as error:
        raise AecompressError(f"{path}: config.json does not describe a model: {error}") from error
    head = model.get_output_embeddings()  # (the skeleton's weights are not tied yet)
    heads = [p for p, module in model.named_modules() if module is head and head is not None]
    if manifest.tied_output not in (None, *heads):
        raise AecompressError(f"{manifest.tied_output} is not the output head of this model")
    for entry in manifest.groups:
        _check_width(entry, _group_spec(entry, model, manifest.storage_dtype))
    return model


def _group_spec(entry: GroupEntry, model: PreTrainedModel, storage_dtype: str) -> GroupSpec:
    """What the group's method fitted, after checking each member against the model."""
    members = group_from_entry(entry).members
    if entry.family != CUSTOM_FAMILY:  # a regex's matrices have no family to check
        _check_family(entry, members, model)
    for target in members:
        _check_member(entry, target, model)
    count, (rows, cols) = len(members), entry.shape
    quantized = _layout(entry, make_method(entry.method, entry.options)).quantize
    return GroupSpec(
        entry.name,
        entry.family,
        spec_kind(members[0]),
        count,
        rows,
        cols,
        head_dim(model),
        storage_dtype,
        quantized.stage if quantized else None,
        kv_heads(model),
    )


def _check_family(entry: GroupEntry, members: tuple[Target, ...], model: PreTrainedModel) -> None:
    """Each member is a matrix of the group's family in the model (path, layer, kind, part)."""
    try:
        own = set(resolve_targets(model, [entry.family]))
    except AecompressError as error:
        raise AecompressError(f"group {entry.name}: {error}") from error
    if strangers := [t.name for t in members if t not in own]:
        raise AecompressError(
            f"group {entry.name}: {strangers[0]} is not a '{entry.family}' matrix of this "
            "model (layer, kind or part as recorded)"
        )


def _check_member(entry: GroupEntry, target: Target, model: PreTrainedModel) -> None:
    """The member's module exists and has the recorded kind and the group's shape."""
    try:
        module = model.get_submodule(target.path)
        kind = (
            target.kind
            if target.kind in STRUCTURED_PARTS and module_kind(module) == "linear"
            else module_kind(module)
        )
        shape = tuple(weight_matrix(model, target).shape)
    except (AttributeError, AecompressError, ValueError, ZeroDivisionError) as error:
        message = f"group {entry.name} does not fit this model: {first_line(error)}"
        raise AecompressError(message) from error
    if (kind, shape) != (target.kind, entry.shape):
        raise AecompressError(
            f"group {entry.name} does not fit this model: {target.name} is a {kind} of "
            f"shape {list(shape)}, the manifest says a {target.kind} of {list(entry.shape)}"
        )


def _check_width(entry: GroupEntry, spec: GroupSpec) -> None:
    """The group's width costs, by its method, the bits it stores."""
    method = make_method(entry.method, entry.options)
    try:
        cost: int | None = method.cost(_width(entry), spec)
    except (AssertionError, TypeError, ValueError, IndexError):  # a width of the wrong form
        cost = None
    if cost != entry.stored_bits:
        raise AecompressError(f"group {entry.name}: width {entry.width} is not what it stores")
