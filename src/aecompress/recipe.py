"""A validated description of one compression run (YAML file or Python object)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aecompress.calibration import CalibrationConfig
from aecompress.errors import AecompressError, describe, first_line
from aecompress.methods import make_method
from aecompress.methods.stage import QuantStage
from aecompress.targets import check_target, parse_grouping


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
    measured better or equal on WikiText-2 validation (SmolLM2 MLPs, ratios 1.25 / 1.67:
    sparsegpt 23.82 / 30.33 against 23.82 / 30.50, svdllm 62.9 / 143.9 against 64.5 / 145.8)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["dense", "local"] = "local"
    damp: float = Field(1e-3, ge=0)
    granularity: Literal["block", "layer"] = "block"


class RefineConfig(BaseModel):
    """`steps` Adam steps per stage at `lr` (0: no refinement), one calibration batch a
    step; every `eval_every` steps the held-out batches (`holdout`, a fraction of the
    calibration batches, at least one) are scored, and training ends after `patience`
    scores without improvement."""

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
    of every rule without its own stage are quantized, within the same budget.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    method: str | list[MethodRule] = "svd"
    options: dict[str, Any] = Field(default_factory=dict)
    ratio: float = Field(gt=1)
    quantize: QuantStage | None = None
    targets: list[str] = Field(default_factory=list)
    group: str = "none"
    pipeline: Literal["auto", "independent", "sequential"] = "auto"
    sequential: SequentialConfig = SequentialConfig()
    refine: RefineConfig = RefineConfig()
    allocate: Literal["uniform", "sensitivity"] = "uniform"
    storage_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto (CUDA when there is one), cpu, cuda, cuda:N
    untie_embeddings: bool = False
    seed: int = 0
    calibration: CalibrationConfig = CalibrationConfig()

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return split_list(value)

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
        rules = self.rules()
        if not rules or not all(r.targets for r in rules):
            raise ValueError("targets: give the target families (e.g. targets: [k, down])")
        for rule in rules:  # before any work: names and options (one-line errors)
            make_method(rule.method, rule.options)
            for target in rule.targets:
                check_target(target)
        if isinstance(self.method, str) and "=" in self.method:
            unknown = set(self.options) - {r.method for r in rules}
            if unknown:
                raise ValueError(
                    f"options: with several methods, options go under a method's name "
                    f"(got {', '.join(sorted(unknown))})"
                )
        return self

    def rules(self) -> list[MethodRule]:
        """The method rules this recipe means, each with its targets and options."""
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


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without YAML 1.1's base-60 numbers: `2:4` (an N:M sparsity
    pattern) stays the string it looks like instead of becoming 124."""


_BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_Loader.yaml_implicit_resolvers = {
    first: [("tag:yaml.org,2002:str", _BASE_60), *resolvers]
    if first in set("-+0123456789")
    else resolvers
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str, what: str) -> Any:
    """YAML text (what: where it comes from); invalid YAML is a one-line AecompressError."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise AecompressError(f"{what} is not valid YAML: {problem}{where}") from error


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content; an unreadable file or invalid YAML is a one-line error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AecompressError(f"cannot read {what} {path}: {error}") from error
    return parse_yaml(text, f"{what} {path}")
