"""A validated description of one compression run (YAML file or Python object)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aecompress.calibration import CalibrationConfig
from aecompress.errors import AecompressError
from aecompress.targets import parse_grouping


class Recipe(BaseModel):
    """Model, method and its options, ratio, targets, grouping and seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    method: str = "svd"
    options: dict[str, Any] = Field(default_factory=dict)
    ratio: float = Field(gt=1)
    targets: list[str] = Field(min_length=1)
    group: str = "none"
    untie_embeddings: bool = False
    seed: int = 0
    calibration: CalibrationConfig = CalibrationConfig()

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        parse_grouping(value)
        return value

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise AecompressError(f"cannot read recipe {path}: {error}") from error
        return cls.parse(data or {})

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Recipe:
        """Validate `data`, turning pydantic's report into one line naming each bad key."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise AecompressError(describe(error, "recipe")) from error


def describe(error: ValidationError, what: str) -> str:
    """One line naming every invalid or unknown key of a validation error."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in error.errors()
    )
    return f"{what}: {problems}"
