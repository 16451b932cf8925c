"""Where aecompress writes: the one guard of every output path, called before any work.

An output is new, or an existing output of aecompress of the same kind (an artifact, an
`evaluate --json` file, a sweep's results file or report file); never someone else's file
or folder, never a place inside a model or artifact folder, never the current folder (or
one that holds it), and its place must be writable. A symbolic link is followed: the place
it points to is checked and written, and the link stays.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from aecompress.errors import AecompressError

MANIFEST = "aecompress.json"  # an artifact folder's manifest: what marks the folder
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # a plain name: no '/', '..', '.x'


def check_artifact_folder(path: Path, what: str | None = None, overwrite: bool = True) -> Path:
    """The place (links followed) to write an artifact folder: new, an empty folder, or with
    `overwrite` an artifact that holds only the files its manifest lists. `what` names the
    output in errors (default: the path)."""
    what = what or str(path)
    target = _outside_models(path, what)
    if (target / MANIFEST).is_file():
        _check_replaceable(target, what, overwrite)
    else:
        _check_empty(target, what, "an aecompress artifact")
    return _writable(target, what)


def check_new_folder(path: Path, what: str | None = None) -> Path:
    """The place (links followed) to write a folder that must be new or empty."""
    what = what or str(path)
    target = _outside_models(path, what)
    _check_empty(target, what, "an empty folder")
    return _writable(target, what)


def check_file(
    path: Path, what: str, kind: str, ours: Callable[[Path], bool], replace: bool = True
) -> Path:
    """The place (links followed) to write a file: new, or an existing file that `ours`
    recognises as `kind` (an existing one is refused unless `replace`, asking for
    --overwrite)."""
    target = _outside_models(path, what)
    if target.is_dir():
        raise AecompressError(f"{what} is a folder")
    if target.exists():
        if not target.is_file() or not ours(target):
            raise AecompressError(f"{what} exists and is not {kind}: not overwriting")
        if not replace:
            raise AecompressError(f"{what} exists: pass --overwrite to replace it")
    return _writable(target, what)


def head(path: Path, size: int) -> bytes:
    """The first `size` bytes of a file (what recognises a file of ours)."""
    with path.open("rb") as handle:
        return handle.read(size)


def files_under(folder: Path) -> list[str]:
    """Relative paths ('1_Pooling/config.json') of everything in `folder` but its folders;
    links are not followed (a linked folder is one entry)."""
    found = []
    for root, folders, files in os.walk(folder):
        here = Path(root)
        links = [name for name in folders if (here / name).is_symlink()]
        found += [(here / name).relative_to(folder).as_posix() for name in [*files, *links]]
    return found


def check_contained(folder: Path) -> None:
    """Refuse a folder with an entry that leads out of it (a symbolic link): what reads or
    copies the folder must not reach other files."""
    root = _resolve(folder, str(folder))
    for name in files_under(folder):
        if not _resolve(folder / name, f"{folder}/{name}").is_relative_to(root):
            raise AecompressError(f"{folder}: {name} is a link out of the folder")


def _inside(value: str) -> str:
    if not all(_NAME.fullmatch(part) for part in value.split("/")):
        raise ValueError(f"'{value}' is not a path inside the folder")
    return value


def _plain(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"'{value}' is not a plain name (letters, digits, _ . -)")
    return value


# a file's path inside a folder ('a/b.json'): never absolute, never '..'
InsidePath = Annotated[str, AfterValidator(_inside)]
# one folder's name: never a path
PlainName = Annotated[str, AfterValidator(_plain)]


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except RuntimeError as error:  # a loop of links
        raise AecompressError(f"{what}: {error}") from error


def _outside_models(path: Path, what: str) -> Path:
    """`path` with links followed, refused when it is (or holds) the current folder or lies
    in a model or artifact folder."""
    target, here = _resolve(path, what), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise AecompressError(f"{what}: the output cannot replace the current folder")
    if _is_model_folder(target.parent):
        raise AecompressError(f"{what} lies in the model folder {target.parent}: write elsewhere")
    if artifact := next((p for p in target.parents if (p / MANIFEST).is_file()), None):
        raise AecompressError(f"{what} lies in the artifact folder {artifact}: write elsewhere")
    return target


def _is_model_folder(folder: Path) -> bool:
    """A transformers model folder: a config.json beside weights."""
    weights = (p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
    return (folder / "config.json").is_file() and any(weights)


def _check_empty(target: Path, what: str, expected: str) -> None:
    if target.exists() and not target.is_dir():
        raise AecompressError(f"{what} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        raise AecompressError(f"{what} exists and is not {expected}: not overwriting")


def _check_replaceable(target: Path, what: str, overwrite: bool) -> None:
    """An artifact is replaced only when each file in it, in subfolders too, is one its
    manifest lists, and only with `overwrite`."""
    foreign = sorted(set(files_under(target)) - _listed(target))
    if foreign:
        raise AecompressError(
            f"{what} holds files that are not part of its artifact ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): move them or write elsewhere"
        )
    if not overwrite:
        raise AecompressError(f"{what} is an artifact already: pass --overwrite to replace it")


def _listed(artifact: Path) -> set[str]:
    """The files an artifact's manifest lists (none when it cannot be read)."""
    try:
        files = json.loads((artifact / MANIFEST).read_text()).get("files", [])
    except (ValueError, AttributeError, RecursionError):  # not JSON, UTF-8, an object
        return set()
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def _writable(target: Path, what: str) -> Path:
    """`target`, once something can be created in the nearest existing folder above it and
    an existing `target` can be written."""
    nearest = next(p for p in [target.parent, *target.parent.parents] if p.exists())
    if not nearest.is_dir():
        raise AecompressError(f"{what}: {nearest} is not a folder")
    _probe(nearest, what)
    if target.exists():
        _probe(target, what)
    return target


def _probe(path: Path, what: str) -> None:
    """Create (and remove) a folder in a folder, open a file for appending."""
    try:
        if path.is_dir():
            Path(tempfile.mkdtemp(prefix=".aecompress-check-", dir=path)).rmdir()
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as error:
        raise AecompressError(f"{what}: cannot write in {path} ({error.strerror})") from error
