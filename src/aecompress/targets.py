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

FAMILIES = ("embed", "q", "k", "v", "o", "up", "gate", "down", "ffn", "attn")
# Structured targets take a block's matrices of one layer together (structured methods
# remove whole neurons or head dimensions); their matrix stacks the block's matrices, the
# last transposed (structured_matrices), and their path is the module whose input
# calibration measures:
# - `ffn`: a gated MLP's up, gate and down, [3 * intermediate, hidden]; its path is the
#   down projection's (its input: the intermediate activations);
# - `attn`: a Llama-style attention's q, k, v and o, [(2 * heads + 2 * kv_heads) *
#   head_dim, hidden]; its path is q_proj's (its input: the hidden states entering q, k, v).
FFN_PARTS = ("up_proj", "gate_proj", "down_proj")
ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
STRUCTURED_PARTS = {"ffn": FFN_PARTS, "attn": ATTN_PARTS}  # kind -> the block's matrices
# the families a Llama-style block reads the residual stream with or writes it with
# (slicegpt's targets: cutting the stream shrinks all of them)
STREAM_FAMILIES = ("q", "k", "v", "o", "up", "gate", "down")
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
                ("attn", "self_attn", "q_proj"),
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
    kind: str  # "linear", "conv1d", "embedding", "ffn" or "attn" (see STRUCTURED_PARTS)
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


SpecKind = Literal["linear", "embedding", "ffn", "attn"]


def spec_kind(target: Target) -> SpecKind:
    """How a method sees the target: an embedding, a structured stack, or a linear matrix."""
    if target.kind == "embedding" or target.kind in STRUCTURED_PARTS:
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


def structured_path(target: Target) -> str:
    """The block module of a structured target (its MLP or attention: the parent of the
    module at its path)."""
    return target.path.rpartition(".")[0]


def covered_names(target: Target) -> list[str]:
    """Names of the matrices a target compresses (a structured target: its block's)."""
    if target.kind in STRUCTURED_PARTS:
        return [f"{structured_path(target)}.{name}" for name in STRUCTURED_PARTS[target.kind]]
    return [target.name]


def structured_matrices(model: nn.Module, target: Target) -> tuple[torch.Tensor, ...]:
    """A structured target's weights in its STRUCTURED_PARTS order: an ffn's up [I, H],
    gate [I, H] and down [H, I]; an attention's q, k, v [heads * head_dim, H] and o."""
    block = model.get_submodule(structured_path(target))
    return tuple(getattr(block, name).weight.detach() for name in STRUCTURED_PARTS[target.kind])


def weight_matrix(model: nn.Module, target: Target) -> torch.Tensor:
    """The target's weight in [out, in] layout (a view or a copy; never modified); a
    structured target's stack with its last matrix transposed: an ffn's [up; gate; down^T]
    [3 * intermediate, hidden], an attention's [q; k; v; o^T]."""
    if target.kind in STRUCTURED_PARTS:
        *first, last = structured_matrices(model, target)
        return torch.cat([*first, last.T])
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
            kind = family if family in STRUCTURED_PARTS else module_kind(module)
            if kind == "attn":
                check_attention(model, path.rpartition(".")[0])
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
    """Record that `by` selects `target`, refusing a matrix (or part) selected before (a
    structured target selects its block's matrices)."""
    if target.kind in STRUCTURED_PARTS:
        weights: list[object] = list(model.get_submodule(structured_path(target)).parameters())
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


def kv_heads(model: nn.Module) -> int | None:
    """The number of key / value heads of the model's attention (None when it names none)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None)
    heads = heads if isinstance(heads, int) else getattr(config, "num_attention_heads", None)
    return heads if isinstance(heads, int) else None


def check_attention(model: nn.Module, path: str) -> None:
    """Refuse, in one line, an attention at `path` that is not Llama's layout (q, k, v, o
    without biases, one head_dim, RoPE over all of it, no q / k norms): an `attn` target
    removes rotary pairs of head dimensions and must know where they are."""
    attention = model.get_submodule(path)
    config = getattr(model, "config", None)
    rope = getattr(config, "rope_parameters", None) or {}
    problem = ""
    if not all(isinstance(getattr(attention, n, None), nn.Linear) for n in ATTN_PARTS):
        problem = "it has no q_proj, k_proj, v_proj and o_proj Linear modules"
    elif any(getattr(attention, n).bias is not None for n in ATTN_PARTS):
        problem = "its projections have biases"
    elif any(hasattr(attention, n) for n in ("q_norm", "k_norm", "qk_norm")):
        problem = "it normalises queries and keys (q_norm / k_norm)"
    elif not isinstance(size := getattr(attention, "head_dim", None), int) or size % 2:
        problem = "it has no even head_dim"
    elif not isinstance(getattr(attention, "scaling", None), float):
        problem = "it has no softmax scaling attribute"
    elif isinstance(rope, dict) and rope.get("partial_rotary_factor", 1.0) != 1.0:
        problem = "its RoPE rotates part of each head only (partial_rotary_factor)"
    if problem:
        raise AecompressError(
            f"{path}: --targets attn needs a Llama-style attention (q, k, v, o without "
            f"biases, RoPE over the whole head, no q/k norms): {problem}"
        )


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
