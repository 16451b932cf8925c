"""Exporting an artifact's model as a folder that loads without aecompress.

A format is a function that checks its output folder before any work, loads the artifact
and writes its model into the folder `_export_folder` gives, which then receives the base's
tokenizer and a sentence encoder's pooling files and appears atomically."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from aecompress.artifact.compressed_tensors import (
    check_exportable,
    module_tensors,
    quantization_config,
)
from aecompress.artifact.folder import atomic_folder, copy_sentence_transformers_files
from aecompress.artifact.load import load_compressed
from aecompress.artifact.manifest import WEIGHTS, load_manifest
from aecompress.artifact.save import untouched_state
from aecompress.budget import STORAGE_DTYPES
from aecompress.compressed import CompressedModel
from aecompress.errors import AecompressError
from aecompress.methods.attention import AttnDimsLayout
from aecompress.methods.pruning import unpack_bits
from aecompress.outputs import check_new_folder
from aecompress.tensorfile import write_safetensors


def export_dense(artifact: str | Path, output: str | Path) -> Path:
    """Write the artifact's model as a plain transformers folder: every matrix decoded into
    an fp32 dense weight (safetensors), the base's config and tokenizer. It loads with
    `AutoModel*.from_pretrained(output)` without aecompress; `output` must be new or empty.
    Pruned MLPs (ffn-neurons) and attentions (attn-dims) are written at their smaller
    sizes, with the config that builds them (pruned_intermediate_size, pruned_attention)."""
    output = check_new_folder(Path(output))
    intermediate = pruned_intermediate_size(artifact)
    head = pruned_head_dim(artifact)
    cm = load_compressed(artifact)
    window = rotary_window(cm, Path(artifact)) if head is not None else None  # or refused
    model = cm.merge_and_unload()
    if intermediate is not None:  # the MLPs are the smaller ones: say so in the config
        model.config.intermediate_size = intermediate
    if window is not None:
        pruned_attention(model, cm, window)
    with _export_folder(output, cm, Path(artifact)) as work:
        model.save_pretrained(work)
    return output


def _uniform_width(artifact: str | Path, kind: str, refusal: str) -> int | None:
    """The one width of the artifact's groups of `kind` (structured targets), the same on
    every layer; None when it has none; refused with `refusal` when some layers are not
    compressed or keep other widths (a plain config has one size for all layers)."""
    manifest = load_manifest(artifact)
    pruned = [e for e in manifest.groups if e.members[0].kind == kind]
    if not pruned:
        return None
    layers = {m.layer for e in pruned for m in e.members}
    widths = {w for e in pruned for w in ([e.width] if isinstance(e.width, int) else e.width)}
    config = json.loads((Path(artifact) / "config.json").read_text())
    if len(widths) > 1 or layers != set(range(config.get("num_hidden_layers", -1))):
        raise AecompressError(f"{artifact}: {refusal}")
    return widths.pop()


def pruned_intermediate_size(artifact: str | Path) -> int | None:
    """The one intermediate size of an artifact whose MLPs (`ffn` targets) all keep the
    same number of neurons; None without ffn groups; refused otherwise."""
    return _uniform_width(
        artifact,
        "ffn",
        "its MLPs keep different numbers of neurons (or some layers are not pruned), and a "
        "plain config has one intermediate_size: compress with --targets ffn on every layer "
        "at one --ratio, without --allocate, for uniform widths",
    )


ATTENTION_EXPORT = (
    "a plain config has one head_dim and one RoPE: compress with --targets attn on every "
    "layer at one --ratio, without --allocate, with --option pairs=low or pairs=high (one "
    "window of rotary pairs; on SmolLM2 these lose far more than the default pairs=score, "
    "whose artifact aecompress.load serves with its smaller attentions)"
)


def pruned_head_dim(artifact: str | Path) -> int | None:
    """The one kept head dim of an artifact whose attentions (`attn` targets) all keep the
    same number of dims; None without attn groups; refused otherwise."""
    return _uniform_width(
        artifact,
        "attn",
        f"its attentions keep different head dims (or some layers are not pruned), and "
        f"{ATTENTION_EXPORT}",
    )


class RotaryWindow(NamedTuple):
    """The rotary pairs [start, start + pairs) every pruned attention keeps, of head_dim."""

    start: int
    pairs: int
    head_dim: int


def rotary_window(cm: CompressedModel, artifact: Path) -> RotaryWindow:
    """The window of rotary pairs that the attentions pruned by attn-dims all keep, when
    they do and the RoPE is default or linear (pruned_attention); refused otherwise,
    before any decoding."""
    windows = set()
    for fitted in (g for g in cm.groups if g.group.members[0].kind == "attn"):
        layout = fitted.stored.layout
        assert isinstance(layout, AttnDimsLayout)
        for member in fitted.stored.members:
            mask = unpack_bits(member["kept"], layout.head_dim // 2)
            pairs = tuple(torch.nonzero(mask).flatten().tolist())
            windows.add((pairs, layout.head_dim))
    (pairs, size), *others = windows
    start = pairs[0]
    if others or pairs != tuple(range(start, start + len(pairs))):
        raise AecompressError(
            f"{artifact}: its attentions keep different rotary pairs (or not one window of "
            f"them), and {ATTENTION_EXPORT}"
        )
    rope = getattr(cm.model.config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear") or "rope_theta" not in rope:
        raise AecompressError(
            f"{artifact}: RoPE of type '{kind}' has no plain config for a subset of its "
            "frequencies: export --dense takes default or linear RoPE"
        )
    return RotaryWindow(start, len(pairs), size)


def pruned_attention(model: PreTrainedModel, cm: CompressedModel, window: RotaryWindow) -> None:
    """Make the decoded `model`'s attentions (attn-dims: head_dim d' of D, the rotary pairs
    [a, a + d'/2) of `window` kept in every layer) a plain config's: head_dim d', and
    RoPE parameters giving exactly the kept frequencies. The original inv_freq_j =
    theta^(-2j/D); the kept j = a + i, i < d'/2, are theta'^(-2i/d') * theta^(-2a/D) with
    theta' = theta^(d'/D): rope_theta theta' and, for a > 0, rope_type "linear" (inv_freq
    divided by `factor`) with factor theta^(2a/D) (times a linear model's own factor).
    transformers' Llama scales the logits by head_dim^-0.5 with no config field for it, so
    the original D^-0.5 is kept by folding sqrt(d'/D) into q's rows."""
    start, size = window.start, window.head_dim
    config = model.config
    rope = dict(config.rope_parameters)  # default or linear, with rope_theta (rotary_window)
    width, theta = 2 * window.pairs, float(rope["rope_theta"])
    factor = float(rope.get("factor", 1.0)) * theta ** (2 * start / size)
    rope["rope_theta"] = theta ** (width / size)
    if factor != 1.0:
        rope.update(rope_type="linear", factor=factor)
    config.rope_parameters = rope
    config.head_dim = width
    scale = (width / size) ** 0.5
    with torch.no_grad():
        for fitted in (g for g in cm.groups if g.group.members[0].kind == "attn"):
            for target in fitted.group.members:
                q_proj = model.get_submodule(target.path)
                q_proj.weight = nn.Parameter(q_proj.weight * scale, requires_grad=False)


def export_compressed_tensors(artifact: str | Path, output: str | Path) -> Path:
    """Write a gptq / rtn artifact's model in the compressed-tensors format (see
    compressed_tensors.py): the stored codes, scales and zero points as they are, every
    other tensor in the storage dtype (also the config's `dtype`), the base's config with a
    `quantization_config`. transformers loads it with the compressed-tensors package
    installed. Groups of other methods or layers are refused before any work; `output`
    must be new or empty."""
    output = check_new_folder(Path(output))
    manifest = load_manifest(artifact)
    check_exportable(manifest)
    cm = load_compressed(artifact)
    tensors, _ = untouched_state(cm.model, cm.replaced_paths())  # tied ones once: HF ties them
    for fitted in cm.groups:
        for target, stored in zip(fitted.group.members, fitted.stored.members, strict=True):
            tensors.update(module_tensors(target.path, stored, fitted.shape[1]))
    linear = [name for name, module in cm.model.named_modules() if isinstance(module, nn.Linear)]
    config = json.loads((Path(artifact) / "config.json").read_text())
    config["dtype"] = manifest.storage_dtype
    config["quantization_config"] = quantization_config(manifest.groups, linear)
    with _export_folder(output, cm, Path(artifact)) as work:
        dtype = STORAGE_DTYPES[manifest.storage_dtype]
        write_safetensors(work / WEIGHTS, dict(sorted(tensors.items())), dtype, {"format": "pt"})
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if cm.model.can_generate():
            cm.model.generation_config.save_pretrained(work)
    return output


# the formats `aecompress export --format` writes
EXPORTS: dict[str, Callable[[str | Path, str | Path], Path]] = {
    "dense": export_dense,
    "compressed-tensors": export_compressed_tensors,
}


@contextmanager
def _export_folder(output: Path, cm: CompressedModel, artifact: Path) -> Iterator[Path]:
    """A fresh folder for a format's model files; the base's tokenizer and pooling files
    are added after them, and the folder is renamed into `output` (as `atomic_folder`)."""
    with atomic_folder(output) as work:
        yield work
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(work)
        copy_sentence_transformers_files(artifact, work)
