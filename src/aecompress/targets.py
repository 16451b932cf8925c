"""Which weight matrices to compress: canonical families per architecture, and grouping.

Every matrix is seen in the nn.Linear layout [out, in] (an embedding is [vocab, hidden]):
one row per output unit or per token. GPT-2's Conv1D stores [in, out] and is transposed;
its fused c_attn holds q, k and v side by side and is addressed by output slices.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from aecompress.errors import AecompressError
from aecompress.modules import FusedLinear

logger = logging.getLogger(__name__)

FAMILIES = ("embed", "q", "k", "v", "o", "up", "gate", "down", "ffn")
# An `ffn` target is a gated MLP's up, gate and down of one layer taken together (structured
# methods remove whole intermediate neurons): its path is the down projection's (whose
# input, the intermediate activations, is what calibration measures), its matrix the
# [3 * intermediate, hidden] stack of up, gate and down transposed (ffn_matrices).
FFN_PARTS = ("up_proj", "gate_proj", "down_proj")
CUSTOM_PREFIX = "re:"
CUSTOM_FAMILY = "custom"  # family of the matrices a `re:REGEX` target selects
_LAYER = r"(?P<layer>\d+)"


@dataclass(frozen=True)
class Architecture:
    """Module-path patterns of each family; `fused` maps a family to (pattern, part, parts);
    `blocks` is the pattern of the ModuleList of transformer blocks (layers)."""

    families: dict[str, str]
    fused: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    blocks: str = r"model\.layers"


def _bert_like(prefix: str) -> Architecture:
    layer = rf"{prefix}encoder\.layer\.{_LAYER}\."
    return Architecture(
        blocks=rf"{prefix}encoder\.layer",
        families={
            "embed": rf"{prefix}embeddings\.word_embeddings",
            "q": layer + r"attention\.self\.query",
            "k": layer + r"attention\.self\.key",
            "v": layer + r"attention\.self\.value",
            "o": layer + r"attention\.output\.dense",
            "up": layer + r"intermediate\.dense",
            "down": layer + r"output\.dense",
        },
    )


_LLAMA = Architecture(
    {
        "embed": r"model\.embed_tokens",
        **{
            family: rf"model\.layers\.{_LAYER}\.{block}\.{name}"
            for family, block, name in (
                ("q", "self_attn", "q_proj"),
                ("k", "self_attn", "k_proj"),
                ("v", "self_attn", "v_proj"),
                ("o", "self_attn", "o_proj"),
                ("up", "mlp", "up_proj"),
                ("gate", "mlp", "gate_proj"),
                ("down", "mlp", "down_proj"),
                ("ffn", "mlp", "down_proj"),
            )
        },
    }
)

_GPT2_ATTN = rf"transformer\.h\.{_LAYER}\.attn\.c_attn"
_GPT2 = Architecture(
    blocks=r"transformer\.h",
    families={
        "embed": r"transformer\.wte",
        "o": rf"transformer\.h\.{_LAYER}\.attn\.c_proj",
        "up": rf"transformer\.h\.{_LAYER}\.mlp\.c_fc",
        "down": rf"transformer\.h\.{_LAYER}\.mlp\.c_proj",
    },
    fused={"q": (_GPT2_ATTN, 0, 3), "k": (_GPT2_ATTN, 1, 3), "v": (_GPT2_ATTN, 2, 3)},
)

_DISTILBERT_LAYER = rf"distilbert\.transformer\.layer\.{_LAYER}\."
_DISTILBERT = Architecture(
    blocks=r"distilbert\.transformer\.layer",
    families={
        "embed": r"distilbert\.embeddings\.word_embeddings",
        "q": _DISTILBERT_LAYER + r"attention\.q_lin",
        "k": _DISTILBERT_LAYER + r"attention\.k_lin",
        "v": _DISTILBERT_LAYER + r"attention\.v_lin",
        "o": _DISTILBERT_LAYER + r"attention\.out_lin",
        "up": _DISTILBERT_LAYER + r"ffn\.lin1",
        "down": _DISTILBERT_LAYER + r"ffn\.lin2",
    },
)

# model_type -> architecture; module paths may carry a head prefix ("bert.", "roberta.").
ARCHITECTURES: dict[str, Architecture] = {
    "bert": _bert_like(r"(?:bert\.)?"),
    "roberta": _bert_like(r"(?:roberta\.)?"),
    "xlm-roberta": _bert_like(r"(?:roberta\.)?"),
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    **{name: _LLAMA for name in ("llama", "mistral", "qwen2", "qwen3", "smollm3")},
}


@dataclass(frozen=True)
class Target:
    """One matrix to compress: a module (or an output slice of a fused one) in [out, in]."""

    path: str
    family: str
    layer: int | None
    kind: str  # "linear", "conv1d", "embedding" or "ffn" (see FFN_PARTS)
    part: tuple[int, int] | None = None  # (index, count) of a fused module's output slice

    @property
    def name(self) -> str:
        return self.path if self.part is None else f"{self.path}[{self.part[0]}/{self.part[1]}]"


@dataclass(frozen=True)
class Group:
    """Matrices compressed together: one family stacked row-wise across some layers."""

    name: str
    family: str
    members: tuple[Target, ...]


SpecKind = Literal["linear", "embedding", "ffn"]


def spec_kind(target: Target) -> SpecKind:
    """How a method sees the target: an embedding, an ffn stack, or a linear matrix."""
    if target.kind in ("embedding", "ffn"):
        return cast(SpecKind, target.kind)
    return "linear"


def module_kind(module: nn.Module) -> str:
    """'linear', 'conv1d' or 'embedding'; anything else cannot be a target."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise AecompressError(
        f"cannot compress a {type(module).__name__}: only Linear, Conv1D, Embedding"
    )


def dense_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """A Linear, Conv1D or Embedding module's weight in [out, in] layout."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise AecompressError(f"{type(module).__name__} has no weight matrix")
    return weight.T if kind == "conv1d" else weight


def ffn_path(target: Target) -> str:
    """The MLP module of an `ffn` target (the parent of its down projection)."""
    return target.path.rpartition(".")[0]


def covered_names(target: Target) -> list[str]:
    """Names of the matrices a target compresses (an ffn target: its up, gate and down)."""
    if target.kind == "ffn":
        return [f"{ffn_path(target)}.{name}" for name in FFN_PARTS]
    return [target.name]


def ffn_matrices(model: nn.Module, target: Target) -> tuple[torch.Tensor, ...]:
    """An `ffn` target's up [I, H], gate [I, H] and down [H, I] weights."""
    mlp = model.get_submodule(ffn_path(target))
    return tuple(getattr(mlp, name).weight.detach() for name in FFN_PARTS)


def weight_matrix(model: nn.Module, target: Target) -> torch.Tensor:
    """The target's weight in [out, in] layout (a view or a copy; never modified); an
    `ffn` target's [up; gate; down^T] stack, [3 * intermediate, hidden]."""
    if target.kind == "ffn":
        up, gate, down = ffn_matrices(model, target)
        return torch.cat([up, gate, down.T])
    module = model.get_submodule(target.path)
    if isinstance(module, FusedLinear) and target.part is not None:  # already split
        return dense_weight(module.parts[target.part[0]], "linear")
    weight = dense_weight(module, target.kind)
    if target.part is not None:
        index, count = target.part
        rows = weight.shape[0] // count
        weight = weight[index * rows : (index + 1) * rows]
    return weight.detach()


def architecture_for(model: PreTrainedModel) -> Architecture:
    model_type = getattr(model.config, "model_type", "")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    logger.warning("unknown model_type '%s': trying Llama-style module names", model_type)
    return _LLAMA


def _match(pattern: str, path: str) -> re.Match[str] | None:
    return re.fullmatch(pattern, path)


def _layer_of(match: re.Match[str]) -> int | None:
    layer = match.groupdict().get("layer")
    return int(layer) if layer is not None else None


def _family_targets(model: nn.Module, arch: Architecture, family: str) -> list[Target]:
    if family in arch.fused:
        pattern, index, count = arch.fused[family]
    elif family in arch.families:
        pattern, index, count = arch.families[family], 0, 0
    else:
        return []
    found = []
    for path, module in model.named_modules():
        match = _match(pattern, path)
        if match:
            part = (index, count) if count else None
            kind = "ffn" if family == "ffn" else module_kind(module)
            found.append(Target(path, family, _layer_of(match), kind, part))
    return found


def _compile(pattern: str) -> re.Pattern[str]:
    regex = pattern[len(CUSTOM_PREFIX) :]
    try:
        return re.compile(regex)
    except re.error as error:
        raise AecompressError(f"bad target regex '{regex}': {error}") from error


def check_target(family: str) -> None:
    """Refuse a target that is neither a known family nor `re:` and a valid regex."""
    if family.startswith(CUSTOM_PREFIX):
        _compile(family)
    elif family not in FAMILIES:
        raise AecompressError(
            f"unknown target family '{family}': use {', '.join(FAMILIES)} or re:REGEX"
        )


def _custom_targets(model: nn.Module, pattern: str) -> list[Target]:
    compiled = _compile(pattern)
    found = []
    for path, module in model.named_modules():
        if compiled.fullmatch(path) and isinstance(module, nn.Linear | nn.Embedding | Conv1D):
            layers = re.findall(r"\.(\d+)\.", f".{path}.")
            layer = int(layers[0]) if layers else None
            found.append(Target(path, CUSTOM_FAMILY, layer, module_kind(module)))
    return found


def resolve_targets(model: PreTrainedModel, families: list[str]) -> list[Target]:
    """Targets of the requested families (or `re:REGEX` over module paths), in model order;
    a matrix that two of them select (a tied head counts as its embedding) is refused."""
    arch = architecture_for(model)
    targets: list[Target] = []
    chosen: dict[int, list[tuple[Target, str]]] = {}  # id(weight) -> targets on it, by whom
    for family in families:
        check_target(family)
        if family.startswith(CUSTOM_PREFIX):
            found = _custom_targets(model, family)
        else:
            found = _family_targets(model, arch, family)
        if not found:
            raise AecompressError(
                f"model type '{model.config.model_type}' has no '{family}' matrices"
            )
        for target in found:
            _choose(chosen, model, target, family)
        targets.extend(found)
    return targets


def _choose(
    chosen: dict[int, list[tuple[Target, str]]], model: nn.Module, target: Target, by: str
) -> None:
    """Record that `by` selects `target`, refusing a matrix (or part) selected before (an
    `ffn` target selects its up, gate and down)."""
    if target.kind == "ffn":
        weights: list[object] = list(model.get_submodule(ffn_path(target)).parameters())
    else:
        weights = [model.get_submodule(target.path).weight]
    for weight in weights:
        on_weight = chosen.setdefault(id(weight), [])
        for earlier, earlier_by in on_weight:
            if None in (earlier.part, target.part) or earlier.part == target.part:
                shares = (
                    "" if earlier.path == target.path else f" (it shares {earlier.name}'s weight)"
                )
                raise AecompressError(
                    f"targets '{earlier_by}' and '{by}' both select {target.name}{shares}"
                    ": each matrix is compressed once"
                )
        on_weight.append((target, by))


def parse_grouping(grouping: str) -> int | None:
    """'none' -> 1, 'layers' -> None (all layers), 'layers:K' -> K adjacent layers."""
    if grouping == "none":
        return 1
    if grouping == "layers":
        return None
    if grouping.startswith("layers:") and grouping[7:].isdigit() and int(grouping[7:]) >= 1:
        return int(grouping[7:])
    raise AecompressError(f"unknown grouping '{grouping}': use none, layers or layers:K")


def group_targets(model: nn.Module, targets: list[Target], grouping: str) -> list[Group]:
    """Stack each family's matrices across layers as `grouping` says (same shapes required)."""
    span = parse_grouping(grouping)
    families: dict[str, list[Target]] = {}
    for target in targets:
        families.setdefault(_stack_key(target), []).append(target)
    groups = []
    for key, members in families.items():
        chunk = len(members) if span is None else span
        for start in range(0, len(members), chunk):
            stack = tuple(members[start : start + chunk])
            shapes = {tuple(weight_matrix(model, t).shape) for t in stack}
            if len(shapes) > 1:
                raise AecompressError(
                    f"cannot stack '{key}' across layers: shapes differ {sorted(shapes)}"
                )
            name = _group_name(stack, len(members))
            groups.append(Group(name, stack[0].family, stack))
    return groups


_LAYER_INDEX = re.compile(r"\.\d+\.")  # the first: a regex target's layer (_custom_targets)


def _stack_key(target: Target) -> str:
    """What a matrix stacks with across layers: its family, or for a regex's matrices the
    same module in other layers (model.layers.#.mlp.up_proj): a regex spanning several
    families (re:.*_proj) stacks each of them apart."""
    if target.family != CUSTOM_FAMILY:
        return target.family
    return _LAYER_INDEX.sub(".#.", target.path, count=1)


def _group_name(stack: tuple[Target, ...], stack_size: int) -> str:
    """Family names (k, k.3, k.0-3) or, for a regex's matrices, module paths with the layer
    range (model.layers.3.mlp.up_proj, model.layers.0-3.mlp.up_proj): distinct names."""
    first, last = stack[0], stack[-1]
    if first.family == CUSTOM_FAMILY:
        if len(stack) == 1:
            return first.name
        return _stack_key(first).replace(".#.", f".{first.layer}-{last.layer}.", 1)
    if len(stack) == stack_size:
        return first.family
    if len(stack) == 1:
        return f"{first.family}.{first.layer}" if first.layer is not None else first.path
    return f"{first.family}.{first.layer}-{last.layer}"


def output_head_path(model: PreTrainedModel) -> str | None:
    """Path of the output embedding when it shares its weight with the input embedding."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or getattr(head, "weight", None) is not embed.weight:
        return None
    return next(path for path, module in model.named_modules() if module is head)


def untie_embeddings(model: PreTrainedModel) -> None:
    """Give the output head its own copy of the embedding so only the input is compressed."""
    head = model.get_output_embeddings()
    if head is not None:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def head_dim(model: PreTrainedModel) -> int | None:
    """The attention head size of the model (None when its config names no heads)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    config = config or model.config
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int):
        return explicit
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The path and ModuleList of the model's transformer blocks (its layers), found by the
    architecture's pattern, else as the ModuleList with num_hidden_layers children."""
    pattern = architecture_for(model).blocks if isinstance(model, PreTrainedModel) else None
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    fallback = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if pattern is not None and _match(pattern, path):
            return path, module
        if fallback is None and layers is not None and len(module) == layers:
            fallback = (path, module)
    return fallback
