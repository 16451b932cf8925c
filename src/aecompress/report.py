"""Human-readable summaries of artifacts."""

from __future__ import annotations

from typing import Any


def _shape(shape: list[int]) -> str:
    return "x".join(str(s) for s in shape)


def describe_manifest(manifest: dict[str, Any]) -> str:
    """What an artifact stores: one row per group, then whole-model totals."""
    recipe = manifest["recipe"]
    lines = [
        f"base model: {manifest['base_model']} ({manifest['auto_class']})",
        f"method: {recipe['method']} {recipe['options'] or ''}".rstrip(),
        f"targets: {','.join(recipe['targets'])}  grouping: {recipe['group']}  "
        f"requested ratio: {recipe['ratio']}",
    ]
    if manifest["tied_output"]:
        lines.append(f"tied output head {manifest['tied_output']} shares the embedding's factors")
    lines += [
        "",
        "| group | members | matrix | stored tensors | original | stored | ratio | meta |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in manifest["groups"]:
        shapes = _stored_shapes(g["tensors"])
        meta = ", ".join(f"{k}={v}" for k, v in g["meta"].items())
        lines.append(
            f"| {g['name']} | {len(g['members'])} | {_shape(g['shape'])} | {shapes} | "
            f"{g['original_params']:,} | {g['stored_params']:,} | {g['ratio']:.3f} | {meta} |"
        )
    t = manifest["totals"]
    lines += [
        "",
        f"targets: {t['target_params']:,} -> {t['stored_params']:,} numbers, "
        f"ratio {t['ratio']:.3f}",
        f"whole model: {t['model_params_dense']:,} -> {t['model_params_artifact']:,} parameters, "
        f"ratio {t['model_params_dense'] / t['model_params_artifact']:.3f}",
        f"bytes: dense fp32 {t['dense_fp32_bytes']:,} -> {manifest['weights_file']['name']} "
        f"{t['artifact_bytes']:,} (ratio {t['dense_fp32_bytes'] / t['artifact_bytes']:.3f})",
    ]
    return "\n".join(lines)


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
