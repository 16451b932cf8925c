"""What an artifact stores, as `inspect` prints it: checked against the weights files.

By default one row per family (members, shapes, methods, stored numbers, bits per weight,
bytes, the true ratio of bits and the paper's ratio of numbers); per matrix group on
request; or the manifest with the verified figures as JSON. Sizes come from the weights
files' headers, never from the manifest alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from aecompress.artifact import (
    PREFIX,
    GroupEntry,
    Manifest,
    SlicedEntry,
    check_groups,
    checked_skeleton,
    load_manifest,
    weights_header,
)
from aecompress.budget import float_bits
from aecompress.errors import AecompressError
from aecompress.methods.stage import QuantStage
from aecompress.pipeline.slicing import stream_weights
from aecompress.recipe import Recipe


def _shape(shape: list[int] | tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _group_bytes(entry: GroupEntry, header: dict[str, tuple[list[int], int]]) -> int:
    prefix = f"{PREFIX}{entry.name}."
    return sum(
        _numel(shape) * size for key, (shape, size) in header.items() if key.startswith(prefix)
    )


def artifact_facts(path: str | Path) -> dict[str, Any]:
    """The manifest as JSON data, with each group's stored bytes from the weights files
    (raises if the file is missing, altered, or disagrees with the manifest)."""
    manifest = load_manifest(path)
    header = weights_header(path, manifest)
    check_groups(manifest, {k: (shape, 8 * size) for k, (shape, size) in header.items()})
    skeleton = checked_skeleton(Path(path), manifest)
    data = manifest.model_dump(mode="json")
    for entry, group in zip(manifest.groups, data["groups"], strict=True):
        group["stored_bytes"] = _group_bytes(entry, header)
        group["code_bits"] = _code_bits(group)
    target = sum(g.original_params for g in manifest.groups)
    stored = sum(g.stored_params for g in manifest.groups)
    bits = sum(g.stored_bits for g in manifest.groups)
    artifact = sum(_numel(shape) for shape, _ in header.values())
    dense = artifact - stored + target
    if manifest.sliced is not None:
        sliced_target, sliced_stored = _sliced_numbers(path, manifest.sliced, header, skeleton)
        target, stored = target + sliced_target, stored + sliced_stored
        bits += sliced_stored * float_bits(manifest.storage_dtype)
        dense = manifest.sliced.model_params_dense  # the base's: not in the files
    target_bits = target * float_bits(manifest.storage_dtype)
    data["totals"] = {
        "target_params": target,
        "stored_params": stored,
        "target_bits": target_bits,
        "stored_bits": bits,
        "bits_per_weight": bits / target if target else None,
        "ratio": target_bits / bits if bits else None,
        "number_ratio": target / stored if stored else None,
        "model_params_artifact": artifact,
        "model_params_dense": dense,
        "artifact_bytes": sum(record.bytes for record in manifest.weights_files),
        "dense_fp32_bytes": 4 * dense,
        "dense_storage_dtype_bytes": float_bits(manifest.storage_dtype) // 8 * dense,
    }
    return data


def _sliced_numbers(
    path: str | Path,
    sliced: SlicedEntry,
    header: dict[str, tuple[list[int], int]],
    skeleton: PreTrainedModel,
) -> tuple[int, int]:
    """The numbers of the blocks' linear layers of a stream slicegpt cut, dense and
    stored: the stored from the weights files (each matrix has one side of the stream's
    width, so the dense is that times hidden_size / width)."""
    names = stream_weights(skeleton)
    if missing := [name for name in names if name not in header]:
        raise AecompressError(f"{path}: its weights files lack the sliced matrix {missing[0]}")
    stored = sum(_numel(header[name][0]) for name in names)
    if stored != sliced.stored_params:
        raise AecompressError(
            f"{path}: its weights files hold {stored:,} numbers of the sliced matrices, its "
            f"manifest {sliced.stored_params:,}"
        )
    return stored * sliced.hidden_size // sliced.width, stored


def _method(group: dict[str, Any]) -> str:
    """The group's method, with its quantization stage if any (e.g. sparsegpt + int4:g64:gptq)."""
    quantized = group["layout"].get("quantize")
    return group["method"] + (f" + {QuantStage(**quantized['stage'])}" if quantized else "")


def _code_bits(group: dict[str, Any]) -> int | None:
    """Bits per integer code of a quantized group (gptq / rtn's own, or its quantization
    stage's: budget allocation may give groups different bits); None for floats."""
    layout = group["layout"]
    if layout.get("quantize"):
        return int(layout["quantize"]["stage"]["bits"])
    return layout.get("bits")  # gptq / rtn's layout


def _bits_column(groups: list[dict[str, Any]]) -> str:
    """The code bits of groups, with how many groups have each: '2 (x3), 3 (x7)'."""
    counts: dict[int, int] = defaultdict(int)
    for group in groups:
        if group["code_bits"] is not None:
            counts[group["code_bits"]] += 1
    if not counts:
        return "-"
    if len(counts) == 1:
        return str(next(iter(counts)))
    return ", ".join(f"{bits} (x{count})" for bits, count in sorted(counts.items()))


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _header_lines(manifest: Manifest) -> list[str]:
    recipe = manifest.recipe
    lines = [
        f"base model: {manifest.base_model} ({manifest.auto_class})",
        f"targets: {','.join(Recipe.parse(recipe).all_targets())}  "
        f"grouping: {recipe.get('group')}  "
        f"requested ratio: {recipe.get('ratio')}",
    ]
    if manifest.tied_output:
        lines.append(f"tied output head {manifest.tied_output} shares the embedding's factors")
    return lines


def _sliced_lines(manifest: Manifest) -> list[str]:
    """What slicegpt stored: the stream's width, and the head it untied."""
    sliced = manifest.sliced
    if sliced is None:
        return []
    return [
        f"residual stream cut by slicegpt: {sliced.hidden_size} -> {sliced.width} directions; "
        "every linear layer of the blocks, the embedding and the output head (its own "
        "matrix, no longer the embedding's) are the model's own, at the smaller width"
    ]


def _family_rows(data: dict[str, Any]) -> list[str]:
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for group in data["groups"]:
        by_family[group["family"]].append(group)
    rows = [
        "| family | matrices | shape | method | code bits | original | stored | bits/weight "
        "| stored bytes | ratio | number ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_bits = float_bits(data["storage_dtype"])
    for family, groups in by_family.items():
        original = sum(g["original_params"] for g in groups)
        stored = sum(g["stored_params"] for g in groups)
        bits = sum(g["stored_bits"] for g in groups)
        shapes = sorted({_shape(g["shape"]) for g in groups})
        methods = sorted({_method(g) for g in groups})
        matrices = sum(len(g["members"]) for g in groups)
        size = sum(g["stored_bytes"] for g in groups)
        rows.append(
            f"| {family} | {matrices} | {', '.join(shapes)} | {', '.join(methods)} | "
            f"{_bits_column(groups)} | {original:,} | {stored:,} | {bits / original:.3f} | "
            f"{size:,} | "
            f"{original * dense_bits / bits:.3f} | {original / stored:.3f} |"
        )
    return rows


def _group_rows(data: dict[str, Any]) -> list[str]:
    rows = [
        "| group | members | matrix | method | code bits | width | stored tensors | original "
        "| stored | bits/weight | ratio | number ratio | info |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in data["groups"]:
        info = ", ".join(f"{k}={v}" for k, v in g["info"].items())
        rows.append(
            f"| {g['name']} | {len(g['members'])} | {_shape(g['shape'])} | {_method(g)} | "
            f"{_bits_column([g])} | {g['width']} | {_stored_shapes(g['tensors'])} | "
            f"{g['original_params']:,} | "
            f"{g['stored_params']:,} | {g['stored_bits'] / g['original_params']:.3f} | "
            f"{g['ratio']:.3f} | {g['number_ratio']:.3f} | {info} |"
        )
    return rows


def _stored_shapes(tensors: dict[str, list[int]]) -> str:
    """Shared tensors by name, member tensors once with a count (they share one shape)."""
    shared = [
        f"{k.removeprefix('shared.')} {_shape(s)}"
        for k, s in tensors.items()
        if k.startswith("shared.")
    ]
    members: dict[str, tuple[list[int], int]] = {}
    for key, shape in tensors.items():
        if not key.startswith("shared."):
            name = key.partition(".")[2]
            members[name] = (shape, members.get(name, (shape, 0))[1] + 1)
    per_member = [f"{n} {_shape(s)} (x{count})" for n, (s, count) in members.items()]
    return ", ".join(shared + per_member)


def _files(manifest: Manifest) -> str:
    """The weights files: the one's name, or how many shards."""
    files = manifest.weights_files
    return files[0].name if len(files) == 1 else f"{len(files)} shards model-*.safetensors"


def describe_artifact(path: str | Path, per_matrix: bool = False) -> str:
    """A Markdown summary of what the artifact stores, then whole-model totals."""
    manifest = load_manifest(path)
    data = artifact_facts(path)
    rows = _group_rows(data) if per_matrix else _family_rows(data)
    t = data["totals"]
    lines = [
        *_header_lines(manifest),
        "",
        *(rows if manifest.groups else _sliced_lines(manifest)),
        "",
        f"targets: {t['target_params']:,} weights -> {t['stored_bits']:,} bits "
        f"({t['bits_per_weight']:.3f} per weight), ratio {t['ratio']:.3f} against dense "
        f"{manifest.storage_dtype}; {t['stored_params']:,} numbers, number ratio "
        f"{t['number_ratio']:.3f}",
        f"whole model: {t['model_params_dense']:,} -> {t['model_params_artifact']:,} "
        f"parameters, ratio {t['model_params_dense'] / t['model_params_artifact']:.3f}",
        f"bytes ({manifest.storage_dtype} stored): {_files(manifest)} "
        f"{t['artifact_bytes']:,}; dense fp32 {t['dense_fp32_bytes']:,} (ratio "
        f"{t['dense_fp32_bytes'] / t['artifact_bytes']:.3f}); dense {manifest.storage_dtype} "
        f"{t['dense_storage_dtype_bytes']:,} (ratio "
        f"{t['dense_storage_dtype_bytes'] / t['artifact_bytes']:.3f})",
    ]
    return "\n".join(lines)
