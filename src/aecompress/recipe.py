"""A validated description of one compression run (YAML file or Python object)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aecompress.budget import ratio_problem
from aecompress.calibration import CalibrationConfig, Seed
from aecompress.catalog import SLICEGPT
from aecompress.errors import AecompressError, describe, first_line
from aecompress.methods import make_method
from aecompress.methods.base import Method
from aecompress.methods.stage import QuantStage
from aecompress.targets import STREAM_FAMILIES, check_target, parse_grouping


class MethodRule(BaseModel):
    """One method for some target families (several rules: several methods, one budget),
    its options and its quantization stage (None: the recipe's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(min_length=1)
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    quantize: QuantStage | None = None

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return split_list(value)


def split_list(value: Any) -> Any:
    """'a,b' -> ['a', 'b'] (other values unchanged)."""
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return value


def parse_rules(text: str) -> list[tuple[list[str], str]]:
    """'embed=ae-data;up,gate,down=sparsegpt' -> [(['embed'], 'ae-data'), ...]."""
    rules = []
    for part in text.split(";"):
        families, sep, method = part.partition("=")
        if not sep or not families.strip() or not method.strip():
            raise ValueError(f"'{part}' is not FAMILIES=METHOD")
        rules.append((split_list(families), method.strip()))
    return rules


class SequentialConfig(BaseModel):
    """`target`: `local` fits each layer to its own outputs on the compressed stream
    (GPTQ's target; measured better on WikiText-2 validation), `dense` to the dense model's
    outputs on the dense stream (compensating upstream error); `damp`: lambda relative to
    H's mean diagonal (dense target only); `granularity`: `block` calibrates every layer of
    a block on the block as it was (llm-compressor's sequential pipeline; positions fitted
    last to first, each on a pass through uncompressed ones); `layer` calibrates each
    layer on the inputs that the layers before it in its block produce as already
    compressed (GPTQ's true sequential order). `block`
    measured better or equal on WikiText-2 validation (SmolLM2 MLPs,
    benchmarks/results/compensation/report.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["dense", "local"] = "local"
    damp: float = Field(1e-3, ge=0)
    granularity: Literal["block", "layer"] = "block"


class RefineConfig(BaseModel):
    """`steps` Adam steps per stage at `lr` (0: no refinement; a recipe without `refine`
    takes its methods' own, Method.refine_steps: 40 with attn-dims, else 0), one
    calibration batch a step; every `eval_every` steps the held-out batches (`holdout`, a
    fraction of the calibration batches, at least one) are scored, and training ends after
    `patience` scores without improvement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(0, ge=0)
    lr: float = Field(1e-4, gt=0)
    holdout: float = Field(0.125, gt=0, lt=1)
    eval_every: int = Field(10, ge=1)
    patience: int = Field(3, ge=1)


class Recipe(BaseModel):
    """Model, method(s) and options, ratio, targets, grouping, pipeline and seed.

    `method` is a method name (its options in `options`), rules
    'FAMILIES=METHOD;FAMILIES=METHOD' (each method's options under its name in `options`),
    or a list of MethodRule. With rules, `targets` defaults to the rules' families.
    `quantize` (e.g. `int4:g64`, or a mapping of QuantStage's fields): the stored matrices
    of every rule without its own stage are quantized, within the same budget. `slicegpt`
    is no matrix method: it cuts the whole residual stream (pipeline/slicing.py), its
    targets every linear layer of the blocks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    method: str | list[MethodRule] = "svd"
    options: dict[str, Any] = Field(default_factory=dict)
    ratio: float
    quantize: QuantStage | None = None
    targets: list[str] = Field(default_factory=list)
    group: str = "none"
    pipeline: Literal["auto", "independent", "sequential"] = "auto"
    sequential: SequentialConfig = SequentialConfig()
    refine: RefineConfig = RefineConfig()
    allocate: Literal["uniform", "sensitivity"] = "uniform"
    storage_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto (CUDA when there is one), cpu, cuda, cuda:N
    # compress_to_folder: stream the model from disk a block at a time (True), load it
    # whole (False), or stream when loaded whole it would not fit in memory (auto)
    stream: bool | Literal["auto"] = "auto"
    untie_embeddings: bool = False
    seed: Seed = 0
    calibration: CalibrationConfig = CalibrationConfig()

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("ratio")
    @classmethod
    def _check_ratio(cls, value: float) -> float:
        if problem := ratio_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        parse_grouping(value)
        return value

    @field_validator("refine", mode="before")
    @classmethod
    def _refine_steps(cls, value: Any) -> Any:
        return {"steps": value} if isinstance(value, int) else value

    @model_validator(mode="after")
    def _check_rules(self) -> Recipe:
        if self.slices_stream:
            return self._check_slicing()
        rules = self.rules()
        if not rules or not all(r.targets for r in rules):
            raise ValueError("targets: give the target families (e.g. targets: [k, down])")
        methods = []
        for rule in rules:  # before any work: names and options (one-line errors)
            methods.append(make_method(rule.method, rule.options))
            for target in rule.targets:
                check_target(target)
        if isinstance(self.method, str) and "=" in self.method:
            unknown = set(self.options) - {r.method for r in rules}
            if unknown:
                raise ValueError(
                    f"options: with several methods, options go under a method's name "
                    f"(got {', '.join(sorted(unknown))})"
                )
        if "refine" not in self.model_fields_set and self.pipeline != "independent":
            steps = max(method.refine_steps for method in methods)
            object.__setattr__(self, "refine", RefineConfig(steps=steps))  # the methods' own
        object.__setattr__(self, "calibration", self._methods_calibration(methods))
        return self

    @property
    def slices_stream(self) -> bool:
        """Whether this is slicegpt's recipe: the residual stream cut, no matrix groups."""
        return self.method == SLICEGPT

    def _check_slicing(self) -> Recipe:
        """slicegpt's recipe: its targets are every linear layer of the blocks (the
        default), and it takes none of the matrix methods' settings."""
        if not self.targets:
            object.__setattr__(self, "targets", list(STREAM_FAMILIES))
        if sorted(self.targets) != sorted(STREAM_FAMILIES):
            raise ValueError(
                f"targets: slicegpt cuts the residual stream that every "
                f"{', '.join(STREAM_FAMILIES)} of the blocks reads or writes: give those "
                f"targets (or none), not {', '.join(self.targets)}"
            )
        given = {
            "options": bool(self.options),
            "quantize": self.quantize is not None,
            "group": self.group != "none",
            "pipeline": self.pipeline == "sequential",
            "refine": bool(self.refine.steps),
            "allocate": self.allocate != "uniform",
            "stream": self.stream is True,
        }
        if unsupported := [name for name, present in given.items() if present]:
            raise ValueError(
                f"slicegpt rotates and cuts the whole model at once: it takes no "
                f"{', '.join(unsupported)}"
            )
        return self

    def _methods_calibration(self, methods: list[Method]) -> CalibrationConfig:
        """The calibration with the methods' own samples and seq_len (the most any asks
        for, Method.calibration_size) where the recipe sets neither; still counted as
        not given, so a recipe overridden with another method takes that one's."""
        given = self.calibration.model_fields_set
        sizes = [m.calibration_size for m in methods if m.calibration_size]
        if not sizes or given & {"samples", "seq_len"}:
            return self.calibration
        own = {"samples": max(s for s, _ in sizes), "seq_len": max(t for _, t in sizes)}
        values = {**self.calibration.model_dump(), **own}
        return CalibrationConfig.model_construct(_fields_set=set(given), **values)

    def calibration_is_methods_own(self) -> bool:
        """Whether the calibration size is the methods' own (none given)."""
        default = CalibrationConfig()
        size = (self.calibration.samples, self.calibration.seq_len)
        given = self.calibration.model_fields_set & {"samples", "seq_len"}
        return not given and size != (default.samples, default.seq_len)

    def rules(self) -> list[MethodRule]:
        """The method rules this recipe means, each with its targets and options (none for
        slicegpt: it fits no matrix groups)."""
        if self.slices_stream:
            return []
        stage = self.quantize
        if isinstance(self.method, list):
            return [
                r if r.quantize else r.model_copy(update={"quantize": stage}) for r in self.method
            ]
        if "=" not in self.method:
            return [
                MethodRule(
                    targets=self.targets, method=self.method, options=self.options, quantize=stage
                )
            ]
        return [
            MethodRule(
                targets=families, method=name, options=self.options.get(name, {}), quantize=stage
            )
            for families, name in parse_rules(self.method)
        ]

    def all_targets(self) -> list[str]:
        """Every target family or regex, in the order given (recipe targets first)."""
        found = list(self.targets)
        for rule in self.rules():
            found += [t for t in rule.targets if t not in found]
        return found

    def override(self, fields: dict[str, Any]) -> tuple[Recipe, list[str]]:
        """This recipe with `fields` (flags given beside it) in place of its own, and what
        changed ('ratio 4.0 -> 10.0'). A new method drops the recipe's options unless
        options are given; refine steps keep the recipe's other refine settings, and the
        calibration settings given keep the others."""
        data = self.model_dump(mode="json")
        if "refine" not in self.model_fields_set:  # the methods' own: theirs again
            del data["refine"]
        data["calibration"] = self.calibration.model_dump(
            mode="json", include=self.calibration.model_fields_set
        )
        if "method" in fields and "options" not in fields:
            fields = {**fields, "options": {}}
        if "refine" in fields:
            fields = {**fields, "refine": {**data.get("refine", {}), "steps": fields["refine"]}}
        if "calibration" in fields:
            fields = {**fields, "calibration": {**data["calibration"], **fields["calibration"]}}
        new = Recipe.parse({**data, **fields})
        after = new.model_dump(mode="json")
        changes = [f"{k} {data[k]} -> {after[k]}" for k in fields if after[k] != data[k]]
        return new, changes

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        data = read_yaml(path, "recipe")
        if data is not None and not isinstance(data, dict):
            raise AecompressError(f"recipe {path} must be a mapping of fields")
        return cls.parse(data or {})

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Recipe:
        """Validate `data`, turning pydantic's report into one line naming each bad key."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise AecompressError(describe(error, "recipe")) from error


# Bounds of every YAML input (recipes, sweeps, --option values): a recipe is a few hundred
# lines; anything far beyond is refused before it costs time or memory.
MAX_YAML_BYTES = 1 << 18
MAX_YAML_DEPTH = 50  # nesting of sequences and mappings
MAX_YAML_NODES = 10_000  # values once aliases are expanded


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without YAML 1.1's base-60 numbers (`2:4`, an N:M sparsity pattern,
    stays the string it looks like instead of becoming 124), and bounded: nesting depth,
    and the number of values with every alias expanded (an alias bomb is refused while it
    is read, before anything expands it)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._composed = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) expanded

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            anchored = self.anchors.get(self.peek_event().anchor)
            if anchored is not None and id(anchored) not in self._sizes:
                self._refuse("an alias refers to a node that contains it")
            return super().compose_node(parent, index)
        self._depth += 1
        self._composed += 1
        if self._depth > MAX_YAML_DEPTH:
            self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels")
        if self._composed > MAX_YAML_NODES:
            self._refuse(f"more than {MAX_YAML_NODES} values")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._sizes[id(node)] = self._expanded(node)
        return node

    def _expanded(self, node: yaml.Node) -> tuple[int, int]:
        """(values, depth) of a node with its aliases expanded, from its children's."""
        children = node.value if isinstance(node.value, list) else []  # scalars: a string
        flat = [n for child in children for n in (child if isinstance(child, tuple) else [child])]
        sizes = [self._sizes[id(child)] for child in flat]
        values = 1 + sum(size for size, _ in sizes)
        depth = 1 + max((d for _, d in sizes), default=0)
        if values > MAX_YAML_NODES:
            self._refuse(f"more than {MAX_YAML_NODES} values once aliases are expanded")
        if depth > MAX_YAML_DEPTH:
            self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
        return values, depth

    def _refuse(self, problem: str) -> NoReturn:
        raise yaml.composer.ComposerError(None, None, problem, self.get_mark())


_BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_Loader.yaml_implicit_resolvers = {
    first: [("tag:yaml.org,2002:str", _BASE_60), *resolvers]
    if first in set("-+0123456789")
    else resolvers
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str, what: str) -> Any:
    """YAML text (what: where it comes from), bounded in size, depth and expanded values;
    invalid or oversized YAML is a one-line AecompressError that quotes none of it."""
    if len(text) > MAX_YAML_BYTES:
        raise AecompressError(f"{what} is larger than {MAX_YAML_BYTES >> 10} KiB")
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise AecompressError(f"{what} is not valid YAML: {problem}{where}") from error


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; an unreadable, oversized file or invalid YAML is a one-line
    error."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise AecompressError(f"{what} {path} is larger than {MAX_YAML_BYTES >> 10} KiB")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AecompressError(f"cannot read {what} {path}: {error}") from error
    return parse_yaml(text, f"{what} {path}")
