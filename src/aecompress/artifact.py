"""The artifact: a folder with config, tokenizer, model.safetensors and a JSON manifest.

model.safetensors holds the untouched parameters under their usual names and each group's
stored tensors under `aecompress.<group>.<shared|member index>.<name>`. The manifest says
how to rebuild the model; it is written last, and the folder appears atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aecompress.engine import CompressedGroup, CompressedModel, inject
from aecompress.errors import AecompressError
from aecompress.methods import Stored, make_method
from aecompress.recipe import Recipe
from aecompress.targets import Group, Target
from aecompress.version import __version__

FORMAT = "aecompress-artifact"
FORMAT_VERSION = 1
MANIFEST = "aecompress.json"
WEIGHTS = "model.safetensors"
PREFIX = "aecompress."


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def group_entry(fitted: CompressedGroup, method: str) -> dict[str, Any]:
    return {
        "name": fitted.group.name,
        "family": fitted.group.family,
        "method": method,
        "members": [
            {"path": t.path, "layer": t.layer, "kind": t.kind, "part": t.part}
            for t in fitted.group.members
        ],
        "shape": list(fitted.shape),
        "meta": fitted.stored.meta,
        "tensors": {k: list(t.shape) for k, t in fitted.stored.tensors().items()},
        "original_params": fitted.original_numel,
        "stored_params": fitted.stored_numel,
        "ratio": fitted.ratio,
    }


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
        "recipe": cm.recipe.model_dump(),
        "tied_output": cm.tied_output,
        "aliases": cm.aliases,
        "groups": [group_entry(g, cm.recipe.method) for g in cm.groups],
        "totals": {
            **totals,
            "model_params_dense": untouched_numel + totals["target_params"],
            "model_params_artifact": untouched_numel + totals["stored_params"],
        },
    }


def save_artifact(cm: CompressedModel, path: str | Path) -> Path:
    """Write `cm` to the folder `path` atomically (a crash leaves no half artifact)."""
    if cm.decoded:
        raise AecompressError("a model loaded with decode=True has no stored form to save")
    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise AecompressError(f"{path} exists and is not an aecompress artifact: not overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    untouched, aliases = untouched_state(cm)
    cm.aliases = aliases
    tensors = dict(untouched)
    for fitted in cm.groups:
        for key, tensor in fitted.stored.tensors().items():
            tensors[f"{PREFIX}{fitted.group.name}.{key}"] = tensor.detach().contiguous()
    manifest = build_manifest(cm, untouched)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config = cm.model.config
        config.save_pretrained(work)
        _strip_quantization(work / "config.json")
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(work)
        _copy_sentence_transformers_files(Path(str(cm.model.name_or_path)), work)
        save_file(tensors, str(work / WEIGHTS), metadata={"format": "pt", "producer": FORMAT})
        manifest["weights_file"] = {
            "name": WEIGHTS,
            "bytes": (work / WEIGHTS).stat().st_size,
            "sha256": _file_sha256(work / WEIGHTS),
        }
        manifest["totals"]["artifact_bytes"] = manifest["weights_file"]["bytes"]
        manifest["totals"]["dense_fp32_bytes"] = 4 * manifest["totals"]["model_params_dense"]
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        work.chmod(0o755)
        _swap_into_place(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return path


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


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an artifact folder, checked for format and version."""
    manifest_file = Path(path) / MANIFEST
    if not manifest_file.is_file():
        raise AecompressError(f"{path} is not an aecompress artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as error:
        raise AecompressError(f"{manifest_file} is not valid JSON: {error}") from error
    if manifest.get("format") != FORMAT:
        raise AecompressError(
            f"{path} is not an aecompress artifact (format {manifest.get('format')!r})"
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise AecompressError(
            f"{path} has format version {manifest['format_version']}; this aecompress reads "
            f"up to {FORMAT_VERSION}: upgrade aecompress"
        )
    return manifest


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _read_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = path / manifest["weights_file"]["name"]
    if not weights.is_file():
        raise AecompressError(f"{path}: {weights.name} is missing")
    if (
        weights.stat().st_size != manifest["weights_file"]["bytes"]
        or _file_sha256(weights) != manifest["weights_file"]["sha256"]
    ):
        raise AecompressError(f"{weights} is truncated or altered (size or sha256 mismatch)")
    try:
        return load_file(str(weights))
    except SafetensorError as error:
        raise AecompressError(f"cannot read {weights}: {error}") from error


def _group_from_entry(entry: dict[str, Any]) -> Group:
    members = tuple(
        Target(
            m["path"],
            entry["family"],
            m["layer"],
            m["kind"],
            tuple(m["part"]) if m["part"] else None,
        )
        for m in entry["members"]
    )
    return Group(entry["name"], entry["family"], members)


def load_compressed(path: str | Path, decode: bool = False) -> CompressedModel:
    """Rebuild the CompressedModel of an artifact folder.

    With decode=True each matrix is decoded once into a dense weight (fastest to run, no
    longer compressed in memory); otherwise the methods' own runtime modules are used.
    """
    path = Path(path)
    manifest = read_manifest(path)
    tensors = _read_weights(path, manifest)
    config = transformers.AutoConfig.from_pretrained(str(path))
    model = getattr(transformers, manifest["auto_class"]).from_config(config)
    recipe = Recipe.parse(manifest["recipe"])
    method = make_method(recipe.method, recipe.options)
    groups = []
    for entry in manifest["groups"]:
        prefix = f"{PREFIX}{entry['name']}."
        # clone: tensors read from the file may sit at unaligned offsets, and matmuls on
        # them can round differently from the same values in freshly allocated memory
        flat = {
            k[len(prefix) :]: tensors.pop(k).clone() for k in list(tensors) if k.startswith(prefix)
        }
        stored = Stored.from_tensors(flat, len(entry["members"]), entry["meta"]).as_parameters()
        fitted = CompressedGroup(_group_from_entry(entry), stored, tuple(entry["shape"]))
        tied = manifest["tied_output"] if entry["family"] == "embed" else None
        inject(model, fitted, method, tied, decode=decode)
        groups.append(fitted)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    cm = CompressedModel(
        model,
        tokenizer,
        recipe,
        groups,
        base_model=manifest["base_model"],
        auto_class=manifest["auto_class"],
        base_sha256=manifest["base_weights_sha256"],
        tied_output=manifest["tied_output"],
        decoded=decode,
        aliases=manifest["aliases"],
    )
    _load_untouched(cm, tensors)
    model.eval()
    return cm


def _load_untouched(cm: CompressedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Load untouched tensors; every key of the model must come from the file or a group."""
    result = cm.model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise AecompressError(f"artifact holds unknown tensors: {result.unexpected_keys[:3]}")
    replaced = [p + "." for p in cm.replaced_paths()]
    state = cm.model.state_dict()
    for key in result.missing_keys:
        if any(key.startswith(p) for p in replaced):
            continue
        kept = cm.aliases.get(key)
        if kept is None:
            raise AecompressError(f"artifact is missing the tensor {key}")
        if state[key].data_ptr() != state[kept].data_ptr():
            with torch.no_grad():
                state[key].copy_(tensors[kept])
