"""Compressed models and their artifact: a folder with config, tokenizer, model.safetensors
and a JSON manifest.

model.safetensors holds the untouched parameters under their usual names and each group's
stored tensors under `aecompress.<group>.<shared|member index>.<name>`. The manifest (a
validated schema: unknown keys, wrong types and forged sizes are refused) says which
method rebuilds each group and how; it is written last, and the folder appears atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from accelerate import init_empty_weights
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.budget import stored_numel
from aecompress.errors import AecompressError, describe, first_line
from aecompress.methods import Method, Stored, make_method
from aecompress.methods.base import GroupSpec
from aecompress.models import load_config, load_tokenizer
from aecompress.numerics import all_finite
from aecompress.outputs import (
    MANIFEST,
    InsidePath,
    check_artifact_folder,
    check_contained,
    check_new_folder,
    files_under,
)
from aecompress.recipe import Recipe
from aecompress.substitution import Serving, inject, restore
from aecompress.targets import (
    CUSTOM_FAMILY,
    Group,
    Target,
    head_dim,
    module_kind,
    resolve_targets,
    weight_matrix,
)
from aecompress.tensorfile import write_safetensors
from aecompress.version import __version__

FORMAT = "aecompress-artifact"
FORMAT_VERSION = 2
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS = "model.safetensors"
PREFIX = "aecompress."


@dataclass
class CompressedGroup:
    """One fitted group: its targets, the method that fitted it, what it stored."""

    group: Group
    method: Method
    stored: Stored
    shape: tuple[int, int]  # of each member, [out, in]

    @property
    def original_numel(self) -> int:
        return len(self.group.members) * self.shape[0] * self.shape[1]

    @property
    def stored_numel(self) -> int:
        return stored_numel(self.stored.tensors().values())

    @property
    def ratio(self) -> float:
        return self.original_numel / self.stored_numel


@dataclass
class CompressedModel:
    """A transformers model whose targets were replaced, and everything needed to save it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    recipe: dict[str, Any]  # as given (a Recipe dumped to JSON)
    groups: list[CompressedGroup]
    base_model: str
    auto_class: str
    base_sha256: str
    tied_output: str | None = None  # path of an output head that shares the embedding's factors
    decoded: bool = False  # True when loaded with every matrix decoded to a dense weight
    aliases: dict[str, str] = field(default_factory=dict)  # tied untouched keys -> kept key
    storage_dtype: str = "float32"  # of the floating tensors in the file (integers stay)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the artifact folder (atomically)."""
        save_artifact(self, path)

    def merge_and_unload(self) -> PreTrainedModel:
        """The plain transformers model (as peft's merge_and_unload): every group decoded
        into a module of the base model's own class, a tied head sharing the decoded
        embedding. This CompressedModel is then decoded and cannot be saved as an artifact."""
        for fitted in self.groups:
            if not self.decoded:
                tied = self.tied_output if fitted.group.family == "embed" else None
                inject(self.model, fitted.group, fitted.method, fitted.stored, tied, "decoded")
            for target in fitted.group.members:
                restore(self.model, target)
        if self.tied_output:
            head = self.model.get_submodule(self.tied_output)
            head.weight = self.model.get_input_embeddings().weight
            self.model.__dict__.pop("tie_weights", None)  # transformers' own again
        self.decoded = True
        return self.model

    def replaced_paths(self) -> list[str]:
        """Module paths whose weights now come from a group's stored tensors."""
        paths = [member_path(t) for g in self.groups for t in g.group.members]
        return paths + ([self.tied_output] if self.tied_output else [])

    def totals(self) -> dict[str, Any]:
        original = sum(g.original_numel for g in self.groups)
        stored = sum(g.stored_numel for g in self.groups)
        return {"target_params": original, "stored_params": stored, "ratio": original / stored}


def member_path(target: Target) -> str:
    """Path of the module that serves a target (a fused target's part lives inside)."""
    return target.path if target.part is None else f"{target.path}.parts.{target.part[0]}"


# --- the manifest -----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberEntry(_Strict):
    path: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    layer: int | None
    kind: Literal["linear", "conv1d", "embedding"]
    part: tuple[int, int] | None


class GroupEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+\-\[\]/]+$")
    family: str
    method: str
    options: dict[str, Any]
    members: list[MemberEntry] = Field(min_length=1)
    shape: tuple[int, int]
    width: int | list[int]
    layout: dict[str, Any]
    info: dict[str, Any]
    tensors: dict[str, list[int]]
    original_params: int
    stored_params: int
    ratio: float


class WeightsFile(_Strict):
    name: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _inside_the_folder(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", value) or value.startswith("."):
            raise ValueError(f"'{value}' is not a file name inside the artifact folder")
        return value


class Manifest(_Strict):
    format: Literal["aecompress-artifact"]
    storage_dtype: Literal["float32", "bfloat16", "float16"]
    files: list[InsidePath]
    format_version: int
    aecompress_version: str
    base_model: str
    auto_class: Literal["AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM"]
    base_weights_sha256: str
    recipe: dict[str, Any]
    tied_output: str | None
    aliases: dict[str, str]
    groups: list[GroupEntry]
    totals: dict[str, float]
    weights_file: WeightsFile

    @field_validator("recipe")
    @classmethod
    def _a_recipe(cls, value: dict[str, Any]) -> dict[str, Any]:
        Recipe.model_validate(value)  # kept as given, but a valid recipe
        return value


def group_entry(fitted: CompressedGroup) -> dict[str, Any]:
    width = fitted.stored.width
    return {
        "name": fitted.group.name,
        "family": fitted.group.family,
        "method": fitted.method.name,
        "options": fitted.method.options.model_dump(mode="json"),
        "members": [
            {"path": t.path, "layer": t.layer, "kind": t.kind, "part": t.part}
            for t in fitted.group.members
        ],
        "shape": list(fitted.shape),
        "width": list(width) if isinstance(width, tuple) else width,
        "layout": fitted.stored.layout.model_dump(mode="json"),
        "info": fitted.stored.info,
        "tensors": {k: list(t.shape) for k, t in fitted.stored.tensors().items()},
        "original_params": fitted.original_numel,
        "stored_params": fitted.stored_numel,
        "ratio": fitted.ratio,
    }


def untouched_state(cm: CompressedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters and buffers not rebuilt from stored tensors; shared ones kept once.

    Returns the tensors and the aliases (dropped key -> kept key) of tied tensors.
    """
    replaced = [p + "." for p in cm.replaced_paths()]
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in cm.model.state_dict().items():
        if any(key.startswith(p) for p in replaced) and not key.endswith(".bias"):
            continue
        pointer = (tensor.data_ptr(), tuple(tensor.shape))
        if pointer in seen:
            aliases[key] = seen[pointer]
            continue
        seen[pointer] = key
        state[key] = tensor.detach().contiguous()
    return state, aliases


def build_manifest(cm: CompressedModel, untouched: dict[str, torch.Tensor]) -> dict[str, Any]:
    untouched_numel = sum(t.numel() for t in untouched.values())
    totals = cm.totals()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "aecompress_version": __version__,
        "base_model": cm.base_model,
        "auto_class": cm.auto_class,
        "base_weights_sha256": cm.base_sha256,
        "recipe": cm.recipe,
        "storage_dtype": cm.storage_dtype,
        "tied_output": cm.tied_output,
        "aliases": cm.aliases,
        "groups": [group_entry(g) for g in cm.groups],
        "totals": {
            **totals,
            "model_params_dense": untouched_numel + totals["target_params"],
            "model_params_artifact": untouched_numel + totals["stored_params"],
        },
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(cm: CompressedModel, path: str | Path) -> Path:
    """Write `cm` to the folder `path` atomically (a crash leaves no half artifact).

    An existing artifact there is replaced; a folder holding anything else is refused."""
    if cm.decoded:
        raise AecompressError("a model loaded with decode=True has no stored form to save")
    path = check_artifact_folder(Path(path))
    untouched, aliases = untouched_state(cm)
    cm.aliases = aliases
    tensors = dict(untouched)
    for fitted in cm.groups:
        for key, tensor in fitted.stored.tensors().items():
            tensors[f"{PREFIX}{fitted.group.name}.{key}"] = tensor.detach().contiguous()
    dtype = STORAGE_DTYPES[cm.storage_dtype]
    manifest = build_manifest(cm, untouched)
    with _atomic_folder(path) as work:
        cm.model.config.save_pretrained(work)
        _strip_quantization(work / "config.json")
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(work)
        _copy_sentence_transformers_files(Path(str(cm.model.name_or_path)), work)
        write_safetensors(
            work / WEIGHTS,
            tensors,
            dtype,
            {"format": "pt", "producer": FORMAT},
            check=partial(check_finite, dtype_name=cm.storage_dtype),
        )
        manifest["weights_file"] = {
            "name": WEIGHTS,
            "bytes": (work / WEIGHTS).stat().st_size,
            "sha256": _file_sha256(work / WEIGHTS),
        }
        totals = manifest["totals"]
        totals["artifact_bytes"] = manifest["weights_file"]["bytes"]
        totals["dense_fp32_bytes"] = 4 * totals["model_params_dense"]
        totals["dense_storage_dtype_bytes"] = dtype.itemsize * totals["model_params_dense"]
        manifest["files"] = sorted([*files_under(work), MANIFEST])
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


@contextmanager
def _atomic_folder(path: Path) -> Iterator[Path]:
    """A fresh folder beside `path` to fill, renamed into its place when the block ends
    without error (a crash leaves no half-written folder), else deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield work
        work.chmod(0o755)
        _swap_into_place(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def export_dense(artifact: str | Path, output: str | Path) -> Path:
    """Write the artifact's model as a plain transformers folder: every matrix decoded into
    an fp32 dense weight (safetensors), the base's config and tokenizer. It loads with
    `AutoModel*.from_pretrained(output)` without aecompress; `output` must be new or empty."""
    output = check_new_folder(Path(output))
    cm = load_compressed(artifact, decode=True)
    model = cm.merge_and_unload()
    with _atomic_folder(output) as work:
        model.save_pretrained(work)
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(work)
        _copy_sentence_transformers_files(Path(artifact), work)
    return output


def check_finite(key: str, tensor: torch.Tensor, dtype_name: str) -> None:
    """Refuse to save NaN or infinite numbers (e.g. values beyond float16's range)."""
    if not all_finite(tensor):
        raise AecompressError(
            f"{key} holds NaN or infinite values in {dtype_name}: not saving it "
            "(values beyond float16's range need --storage-dtype bfloat16 or float32)"
        )


def remove_leftovers(path: Path) -> None:
    """Delete `.NAME.tmp-PID-*` and `.NAME.old-PID` folders that interrupted writes of this
    artifact left, unless the process that made them still runs."""
    for leftover in path.parent.glob(f".{path.name}.*"):
        match = re.fullmatch(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)(?:-.*)?", leftover.name)
        if match and leftover.is_dir() and not _running(int(match.group(1))):
            shutil.rmtree(leftover, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_sentence_transformers_files(source: Path, work: Path) -> None:
    """Keep a sentence encoder's pooling set-up (modules.json, 1_Pooling/, ...) with it."""
    if not (source / "modules.json").is_file():
        return
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, work / name)
    for folder in source.glob("[0-9]_*"):
        if folder.is_dir():
            shutil.copytree(folder, work / folder.name)


def _strip_quantization(config_file: Path) -> None:
    """The artifact stores fp32 weights: drop a GGUF source's quantization_config."""
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _swap_into_place(work: Path, path: Path) -> None:
    if not path.exists():
        os.replace(work, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(work, path)
    shutil.rmtree(old, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------


def load_manifest(path: str | Path) -> Manifest:
    """The validated manifest of an artifact folder."""
    manifest_file = Path(path) / MANIFEST
    if not manifest_file.is_file():
        raise AecompressError(f"{path} is not an aecompress artifact (no {MANIFEST})")
    try:
        data = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AecompressError(f"{manifest_file} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AecompressError(f"{path} is not an aecompress artifact (format {found!r})")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise AecompressError(f"{manifest_file}: format_version must be an integer")
    if version > FORMAT_VERSION:
        raise AecompressError(
            f"{path} has format version {version}; this aecompress reads up to "
            f"{FORMAT_VERSION}: upgrade aecompress"
        )
    if version < FORMAT_VERSION:
        raise AecompressError(
            f"{path} has format version {version}, written by an older aecompress: "
            "compress the model again"
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as error:
        raise AecompressError(describe(error, f"{manifest_file}")) from error
    check_contained(Path(path))
    if missing := [name for name in manifest.files if not (Path(path) / name).exists()]:
        raise AecompressError(f"{path}: {missing[0]}, a file of the artifact, is missing")
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of an artifact folder, as JSON data."""
    return load_manifest(path).model_dump(mode="json")


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def verify_weights(path: str | Path, manifest: Manifest) -> Path:
    """The artifact's weights file, after checking its size and sha256 against the manifest."""
    weights = Path(path) / manifest.weights_file.name
    if not weights.is_file():
        raise AecompressError(f"{path}: {weights.name} is missing")
    if (
        weights.stat().st_size != manifest.weights_file.bytes
        or _file_sha256(weights) != manifest.weights_file.sha256
    ):
        raise AecompressError(f"{weights} is truncated or altered (size or sha256 mismatch)")
    return weights


def read_weights(path: str | Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The artifact's tensors (size and sha256 checked)."""
    weights = verify_weights(path, manifest)
    try:
        return load_file(str(weights))
    except SafetensorError as error:
        raise AecompressError(f"cannot read {weights}: {error}") from error


def weights_header(path: str | Path, manifest: Manifest) -> dict[str, tuple[list[int], int]]:
    """Shape and bytes per element of every tensor in the (verified) weights file, read
    from its header without loading the tensors."""
    weights = verify_weights(path, manifest)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            header, floating = {}, set()
            for key in handle.keys():  # noqa: SIM118
                view = handle.get_slice(key)
                itemsize = _DTYPE_BYTES.get(view.get_dtype(), 4)
                header[key] = (list(view.get_shape()), itemsize)
                if view.get_dtype() in _FLOAT_NAMES:
                    floating.add(_FLOAT_NAMES[view.get_dtype()])
    except (SafetensorError, OSError) as error:
        raise AecompressError(f"cannot read {weights}: {error}") from error
    check_storage_dtype(manifest, floating)
    return header


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def check_storage_dtype(manifest: Manifest, floating: set[str]) -> None:
    """The weights file's floating tensors all have the manifest's storage dtype."""
    if floating - {manifest.storage_dtype}:
        raise AecompressError(
            f"the weights file holds {', '.join(sorted(floating))} tensors, the manifest "
            f"says {manifest.storage_dtype}"
        )


def check_groups(manifest: Manifest, shapes: dict[str, list[int]]) -> None:
    """Every group's tensors, counts and ratio as the weights file says (no forged sizes)."""
    for entry in manifest.groups:
        prefix = f"{PREFIX}{entry.name}."
        found = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
        if found != entry.tensors:
            raise AecompressError(
                f"group {entry.name}: the manifest's tensors do not match the weights file"
            )
        stored = sum(torch.Size(s).numel() for s in found.values())
        original = len(entry.members) * entry.shape[0] * entry.shape[1]
        if stored != entry.stored_params or original != entry.original_params or stored == 0:
            raise AecompressError(f"group {entry.name}: the manifest's counts are wrong")
        if abs(entry.ratio - original / stored) > 1e-6 * entry.ratio:
            raise AecompressError(f"group {entry.name}: the manifest's ratio is wrong")


def _group_from_entry(entry: GroupEntry) -> Group:
    members = tuple(Target(m.path, entry.family, m.layer, m.kind, m.part) for m in entry.members)
    return Group(entry.name, entry.family, members)


def _stored_from_entry(
    entry: GroupEntry, method: Method, tensors: dict[str, torch.Tensor]
) -> Stored:
    prefix = f"{PREFIX}{entry.name}."
    # clone: tensors read from the file may sit at unaligned offsets, and matmuls on
    # them can round differently from the same values in freshly allocated memory
    flat = {k[len(prefix) :]: tensors.pop(k).clone() for k in list(tensors) if k.startswith(prefix)}
    try:
        layout = method.Layout.model_validate(entry.layout)
    except ValidationError as error:
        raise AecompressError(describe(error, f"group {entry.name} layout")) from error
    try:
        stored = Stored.from_tensors(flat, len(entry.members), _width(entry), layout)
    except (ValueError, IndexError) as error:
        raise AecompressError(f"group {entry.name}: malformed stored tensor names") from error
    stored.info = entry.info
    return stored.as_parameters()


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
        _check_width(entry, _group_spec(entry, model))
    return model


def _group_spec(entry: GroupEntry, model: PreTrainedModel) -> GroupSpec:
    """What the group's method fitted, after checking each member against the model."""
    members = _group_from_entry(entry).members
    if entry.family != CUSTOM_FAMILY:  # a regex's matrices have no family to check
        _check_family(entry, members, model)
    for target in members:
        _check_member(entry, target, model)
    use: Literal["linear", "embedding"] = (
        "embedding" if members[0].kind == "embedding" else "linear"
    )
    count, (rows, cols) = len(members), entry.shape
    return GroupSpec(entry.name, entry.family, use, count, rows, cols, head_dim(model))


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
        kind = module_kind(model.get_submodule(target.path))
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
    """The group's width costs, by its method, the numbers it stores."""
    method = make_method(entry.method, entry.options)
    try:
        cost: int | None = method.cost(_width(entry), spec)
    except (AssertionError, TypeError, ValueError, IndexError):  # a width of the wrong form
        cost = None
    if cost != entry.stored_params:
        raise AecompressError(f"group {entry.name}: width {entry.width} is not what it stores")


def _width(entry: GroupEntry) -> int | tuple[int, ...]:
    return tuple(entry.width) if isinstance(entry.width, list) else entry.width


def load_compressed(path: str | Path, decode: bool = False) -> CompressedModel:
    """Rebuild the CompressedModel of an artifact folder.

    The model's skeleton is built without memory (meta device), each group's modules are
    rebuilt from its stored tensors, then the untouched tensors are assigned. With
    decode=True each matrix is decoded once into a dense weight (fastest to run, no longer
    compressed in memory); otherwise the methods' own runtime modules are used.
    """
    path = Path(path)
    manifest = load_manifest(path)
    tensors = read_weights(path, manifest)
    check_groups(manifest, {k: list(t.shape) for k, t in tensors.items()})
    floating = {
        str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()
    }
    check_storage_dtype(manifest, floating)
    tensors = {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
    model = checked_skeleton(path, manifest)
    serving: Serving = "decoded" if decode else "runtime"
    groups = []
    for entry in manifest.groups:
        method = make_method(entry.method, entry.options)
        stored = _stored_from_entry(entry, method, tensors)
        fitted = CompressedGroup(_group_from_entry(entry), method, stored, entry.shape)
        tied = manifest.tied_output if entry.family == "embed" else None
        try:
            inject(model, fitted.group, method, stored, tied, serving)
        except (AttributeError, KeyError, IndexError, RuntimeError) as error:
            raise AecompressError(f"group {entry.name} does not fit this model: {error}") from error
        groups.append(fitted)
    cm = CompressedModel(
        model,
        _load_tokenizer(path),
        manifest.recipe,
        groups,
        base_model=manifest.base_model,
        auto_class=manifest.auto_class,
        base_sha256=manifest.base_weights_sha256,
        tied_output=manifest.tied_output,
        decoded=decode,
        aliases=manifest.aliases,
        storage_dtype=manifest.storage_dtype,
    )
    _load_untouched(cm, tensors)
    model.eval()
    return cm


def round_to_storage(cm: CompressedModel, dtype_name: str, serving: Serving = "runtime") -> None:
    """Give every floating tensor of the model the precision it will be stored with (kept
    in its own dtype), so that the model in memory computes what the artifact will; the
    groups' modules are built again from the rounded stored tensors (`serving`)."""
    cm.storage_dtype = dtype_name
    dtype = STORAGE_DTYPES[dtype_name]
    tensors = list(cm.model.state_dict(keep_vars=True).values())  # what is saved
    tensors += [t for g in cm.groups for t in g.stored.tensors().values()]
    with torch.no_grad():
        for tensor in {id(t): t for t in tensors}.values():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.copy_(tensor.to(dtype))
    for fitted in cm.groups:
        tied = cm.tied_output if fitted.group.family == "embed" else None
        inject(cm.model, fitted.group, fitted.method, fitted.stored, tied, serving)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
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
