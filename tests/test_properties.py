"""Property-based tests (hypothesis) of hostile input on a tiny model: fuzzed manifests,
recipes and command lines end with exit status 2, exactly one `aecompress: error:` line
and nothing written, or in success with an artifact that loads and gives finite logits.
Never a traceback. Output paths among random files, folders, artifacts, model folders and
links are refused untouched, or are new places or earlier outputs of the same kind.
Damaged sweep result lines are skipped, damaged cache entries read as valid or rebuilt,
and regex targets give distinct groups or one error line. The CLI runs in this process;
model and artifact are built once."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import aecompress
from aecompress.artifact import MANIFEST
from aecompress.errors import AecompressError
from aecompress.models import LoadedModel
from aecompress.sweep import SweepRecipe, cells, current, read_results
from tests.conftest import SMALL_VOCAB, make_tiny, tiny_tokenizer
from tests.helpers import invoke, one_error, tree


def fuzz(examples: int) -> settings:
    """Few examples, no deadline, reproducible; function-scoped fixtures are shared by the
    examples on purpose (one isolated cache, one scratch folder emptied each time)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# a small calibration keeps data-aware methods fast
CALIBRATION = {"samples": 4, "seq_len": 16, "batch_size": 2}

# a few options per method that keep its fit short
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "svd": {},
    "asvd": {},
    "svdllm": {},
    "shared-basis": {},
    "prune": {"index": "int32"},
    "wanda": {"pattern": "2:4"},
    "sparsegpt": {},
    "sparse-lowrank": {"iterations": 1},
    "kronecker": {"steps": 2},
    "tucker": {"steps": 2, "iterations": 2},
    "ae": {"epochs": 2},
    "ae-data": {"epochs": 2},
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    make_tiny("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def artifact(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every part of a manifest: a tied embedding, a stack of layers, shared tensors."""
    out = tmp_path_factory.mktemp("artifact") / "art"
    args = ["--targets", "embed,k", "--group", "layers", "--method", "svd", "--ratio", "2"]
    code, _, err = invoke("compress", str(model_folder), *args, "-o", str(out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for one example's files (emptied before each)."""
    yield tmp_path_factory.mktemp("scratch")


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder)
    folder.mkdir()
    return folder


def assert_loads(folder: Path) -> None:
    model = aecompress.load(folder)
    ids = torch.arange(SMALL_VOCAB).view(4, -1)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def assert_outcome(result: tuple[int, str, str], output: Path) -> None:
    """One error line with exit status 2 and no artifact, or a loadable artifact."""
    code, _, err = result
    event(f"exit status {code}")
    if code == 0:
        assert_loads(output)
    else:
        one_error(code, err)
        assert not output.exists()


# --- manifests ----------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["../model.safetensors", "AutoModel", "k.0", "float16", "embedding"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=4,
)


def places(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value inside a JSON document."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield (*path, key)
        if isinstance(value, dict | list) and value:
            yield from places(value, (*path, key))


def mutate(data: Any, document: dict[str, Any]) -> dict[str, Any]:
    """1-3 of: a value deleted, replaced, nudged (numbers), or a key added."""
    for _ in range(data.draw(st.integers(1, 3))):
        *parents, key = data.draw(st.sampled_from(list(places(document))))
        parent = document
        for step in parents:
            parent = parent[step]
        action = data.draw(st.sampled_from(["delete", "replace", "nudge", "add"]))
        if action == "delete":
            del parent[key]
        elif action == "nudge" and type(parent[key]) in (int, float):
            parent[key] += data.draw(st.sampled_from([-1, 1, 0.5]))
        elif action == "add" and isinstance(parent[key], dict):
            parent[key][data.draw(st.text(max_size=6))] = data.draw(JSON)
        else:
            parent[key] = data.draw(JSON)
    return document


# what inspect reports of a group: none of it may differ from the truth
FIGURES = ("name", "family", "method", "members", "shape", "width", "tensors", "stored_params")


def figures(inspected: str) -> list[Any]:
    """Whole-model totals and each group's figures in the output of `inspect --json`."""
    facts = json.loads(inspected)
    groups = [[g[k] for k in FIGURES] + [pytest.approx(g["ratio"])] for g in facts["groups"]]
    return [facts["totals"], *groups]


@pytest.fixture(scope="module")
def truth(artifact: Path) -> list[Any]:
    return figures(invoke("inspect", str(artifact), "--json")[1])


@fuzz(80)
@given(data=st.data())
def test_a_fuzzed_manifest_is_refused_in_one_line_or_tells_the_truth(
    artifact, truth, scratch, data
):
    folder = fresh(scratch) / "art"
    shutil.copytree(artifact, folder, copy_function=shutil.copy)
    manifest = json.loads((artifact / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps(mutate(data, copy.deepcopy(manifest))))
    code, out, err = invoke("inspect", str(folder), "--json")
    if code:
        one_error(code, err)
    else:  # a forged figure that passes would be reported: the figures are the true ones
        assert figures(out) == truth
    result = invoke("evaluate", str(folder), "--windows", "1", "--seq-len", "8", "--no-dense")
    assert_outcome(result, folder if result[0] == 0 else folder / "none")


# --- recipes ------------------------------------------------------------------------

VALID: dict[str, st.SearchStrategy[Any]] = {
    "method": st.sampled_from([*FAST_OPTIONS, "k=svd;down=prune"]),
    "ratio": st.sampled_from([1.5, 2, 4]),
    "targets": st.sampled_from([["k"], "down,up", ["embed"], ["re:.*v_proj"], ["q", "o"]]),
    "group": st.sampled_from(["none", "layers", "layers:1"]),
}
EXTRAS: dict[str, st.SearchStrategy[Any]] = {
    "pipeline": st.sampled_from(["auto", "independent", "sequential"]),
    "refine": st.sampled_from([0, 2]),
    "allocate": st.sampled_from(["uniform", "sensitivity"]),
    "storage_dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
    "untie_embeddings": st.booleans(),
}
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "method": st.sampled_from(["svdd", "", "k=svd;=prune", "k=svd;k=prune"]),
    "ratio": st.sampled_from([1, 0.5, 1e9, "two", None, float("nan")]),
    "targets": st.sampled_from([["kk"], [], "re:(", 3, ["re:.*norm"]]),
    "group": st.sampled_from(["layerz", "layers:0"]),
    "options": st.dictionaries(st.sampled_from(["steps", "x", "pattern", "epochs"]), JSON),
    "pipeline": st.sampled_from(["both", None]),
    "refine": st.sampled_from([-1, "x"]),
    "storage_dtype": st.just("int8"),
    "calibration": st.just({"samples": 0}),
    "colour": st.just("red"),
}


@st.composite
def recipes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid recipe (fast options, up to two further fields), with one field made
    invalid two times in three."""
    fields = {name: draw(strategy) for name, strategy in VALID.items()}
    fields["options"] = copy.deepcopy(FAST_OPTIONS.get(fields["method"], {}))
    fields["calibration"] = CALIBRATION
    for name in draw(st.lists(st.sampled_from(sorted(EXTRAS)), max_size=2, unique=True)):
        fields[name] = draw(EXTRAS[name])
    broken = draw(st.sampled_from([None, *sorted(INVALID)]))
    if broken is not None and draw(st.integers(0, 2)):
        fields[broken] = draw(INVALID[broken])
    return fields


YAML_TEXT = st.one_of(
    recipes().map(yaml.safe_dump),
    st.sampled_from(["", "- 1\n", "method: [\n", "ratio: 2\n", "{a: 1}\n"]),
    st.text(max_size=20),
)


@fuzz(60)
@given(text=YAML_TEXT)
def test_a_fuzzed_recipe_is_refused_in_one_line_or_gives_an_artifact(model_folder, scratch, text):
    folder = fresh(scratch)
    (folder / "recipe.yaml").write_text(text)
    out = folder / "out"
    args = ["compress", str(model_folder), "--recipe", str(folder / "recipe.yaml"), "-o", str(out)]
    assert_outcome(invoke(*args), out)


# --- command lines ------------------------------------------------------------------

# each flag's values: valid first, then invalid ones
FLAGS: dict[str, tuple[list[str], list[str]]] = {
    "--method": (["svd", "prune", "asvd", "kronecker", "k=svd;down=prune"], ["svdd", ""]),
    "--ratio": (["2", "1.5", "4"], ["1", "0", "-3", "nan", "inf", "1e9", "two"]),
    "--targets": (["k", "down,up", "embed", "re:.*q_proj"], ["kk", "", "re:(", "gate,kk"]),
    "--group": (["none", "layers", "layers:1"], ["layers:0", "x"]),
    "--option": (["index=int32"], ["x=1", "decoder=[1,", "pattern=2:4", "=", "a.b=1"]),
    "--pipeline": (["auto", "independent", "sequential"], ["x"]),
    "--refine": (["0", "2"], ["-1", "x"]),
    "--allocate": (["uniform"], ["x"]),
    "--storage-dtype": (["auto", "float16", "float32"], ["int8"]),
    "--device": (["cpu", "auto"], ["cuda", "tpu"]),
    "--seed": (["0", "4294967295"], ["x", "-1", "99999999999999999999999"]),
    "--rati": ([], ["2"]),
}
OUTPUTS = ["new", "new", "file", "foreign", "."]


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[str], str]:
    """compress flags with valid values, one of them made invalid two times in three, and
    where -o points."""
    flags = draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=5, unique=True))
    broken = draw(st.sampled_from([None, *flags])) if draw(st.integers(0, 2)) else None
    args: list[str] = []
    for flag in flags:
        valid, invalid = FLAGS[flag]
        args += [flag, draw(st.sampled_from(invalid if flag == broken or not valid else valid))]
    if draw(st.booleans()):
        args.append("--untie-embeddings")
    return args, draw(st.sampled_from(OUTPUTS))


def output_place(folder: Path, kind: str) -> Path:
    """Where -o points: a new folder, a file, a folder of someone else's files, or here."""
    if kind == "file":
        (folder / "file").write_text("mine")
    if kind == "foreign":
        (folder / "foreign").mkdir()
        (folder / "foreign" / "notes.txt").write_text("mine")
    return folder / kind


@fuzz(60)
@given(command=command_lines())
def test_a_fuzzed_command_line_is_refused_in_one_line_or_gives_an_artifact(
    model_folder, scratch, monkeypatch, command
):
    args, kind = command
    folder = fresh(scratch)
    monkeypatch.chdir(folder)
    output = output_place(folder, kind)
    before = sorted(folder.rglob("*"))
    result = invoke("compress", str(model_folder), *args, "-o", str(output))
    if kind == "new":
        assert_outcome(result, output)
    else:  # an existing file, a foreign folder or the current folder: never written
        event(f"-o {kind}")
        one_error(result[0], result[2])
        assert sorted(folder.rglob("*")) == before


# --- sweep recipes ------------------------------------------------------------------

TASK = {"task": "wikitext2", "options": {"windows": 1, "seq_len": 8}}
SWEEP_INVALID: dict[str, st.SearchStrategy[Any]] = {
    "methods": st.sampled_from([[{"method": "svdd"}], [{"method": "svd", "x": 1}], []]),
    "ratios": st.sampled_from([[0.5], ["two"], []]),
    "targets": st.sampled_from([["kk"], [3]]),
    "tasks": st.sampled_from(
        [[{"task": "nope"}], [{"task": "wikitext2", "options": {"windows": 0}}]]
    ),
    "models": st.sampled_from([["no-such-model"], []]),
    "colour": st.just("red"),
}


@st.composite
def sweeps(draw: st.DrawFn) -> dict[str, Any]:
    """A small grid on the tiny model (MODEL), with one field made invalid half the time;
    some valid cells fail (a ratio too large, a window longer than the model's)."""
    names = draw(
        st.lists(st.sampled_from(sorted(FAST_OPTIONS)), min_size=1, max_size=2, unique=True)
    )
    fields: dict[str, Any] = {
        "name": "grid",
        "models": ["MODEL"],
        "methods": [{"method": m, "options": FAST_OPTIONS[m]} for m in names],
        "ratios": draw(st.lists(st.sampled_from([2, 4, 1e9]), min_size=1, max_size=2, unique=True)),
        "targets": [draw(st.sampled_from(["k", "down", "embed"]))],
        "groups": [draw(st.sampled_from(["none", "layers"]))],
        "tasks": [draw(st.sampled_from([TASK, {**TASK, "options": {"seq_len": 100000}}]))],
        "calibration": CALIBRATION,
    }
    if draw(st.booleans()):
        broken = draw(st.sampled_from(sorted(SWEEP_INVALID)))
        fields[broken] = draw(SWEEP_INVALID[broken])
    return fields


@fuzz(20)
@given(grid=sweeps())
def test_a_fuzzed_sweep_is_refused_in_one_line_or_records_every_cell(model_folder, scratch, grid):
    folder = fresh(scratch)
    text = yaml.safe_dump(grid).replace("MODEL", str(model_folder))
    (folder / "grid.yaml").write_text(text)
    results = folder / "results.jsonl"
    code, _, err = invoke("sweep", str(folder / "grid.yaml"), "--results", str(results))
    event(f"exit status {code}")
    if code:
        one_error(code, err)
        assert not results.exists()
        return
    records = read_results(results)
    grid_cells = list(cells(SweepRecipe.from_yaml(folder / "grid.yaml")))
    assert len(current(records)) == 1 + len(grid_cells)  # the dense model and every cell
    assert (folder / "report.md").is_file()
    assert invoke("sweep", str(folder / "grid.yaml"), "--results", str(results))[0] == 0
    assert read_results(results) == records  # nothing recomputed, nothing lost


# --- output paths -------------------------------------------------------------------

PLACES = {
    "file": lambda path: path.write_text("mine"),
    "records": lambda path: path.write_text(
        '[{"model": "m", "role": "dense", "task": "t", "metrics": {}}]'
    ),
    "results": lambda path: path.write_text('{"cell": {}, "task": "t"}\n{"ce'),
    "empty": lambda path: path.mkdir(),
    "folder": lambda path: (path.mkdir(), (path / "report.md").write_text("mine")),
    "artifact": lambda path: make_artifact(path, notes=False),
    "artifact+notes": lambda path: make_artifact(path, notes=True),
    "model": lambda path: (
        path.mkdir(),
        (path / "config.json").write_text("{}"),
        (path / "model.safetensors").write_bytes(b"x"),
    ),
}
NAMES = ["a", "b", "c", "d"]
SUFFIXES = ["", "/x", "/x/y", "/1_Pooling/x", "/1_Pooling/config.json", "/config.json"]
OUTPUT_FLAGS = {  # the command whose output each flag names (its work is stubbed out)
    "-o": ["compress", "m"],
    "--dense": ["export", "art"],
    "--json": ["evaluate", "m"],
    "--results": ["sweep", "grid.yaml"],
}


def make_artifact(path: Path, notes: bool) -> None:
    (path / "1_Pooling").mkdir(parents=True)
    (path / "1_Pooling" / "config.json").write_text("{}")
    (path / MANIFEST).write_text(json.dumps({"files": [MANIFEST, "1_Pooling/config.json"]}))
    if notes:  # a user's file in a subfolder of the artifact
        (path / "1_Pooling" / "notes.txt").write_text("mine")


def acceptable(flag: str, overwrite: bool, target: Path, kinds: dict[Path, str]) -> bool:
    """What the guard may accept: outside model and artifact folders, a new place or an
    earlier output of the flag's kind (an empty folder for a folder output)."""
    if kinds.get(target.parent) == "model" or any(
        kinds.get(p, "").startswith("artifact") for p in target.parents
    ):
        return False
    if flag == "--results" and kinds.get(target.parent) == "folder":  # a user's report.md
        return False
    kind = kinds.get(target) or ("new" if not target.exists() else "inside")
    replaceable = {
        "-o": {"empty", *(["artifact"] if overwrite else [])},
        "--dense": {"empty"},
        "--json": {"records"} if overwrite else set(),
        "--results": {"results"},
    }
    return kind in {"new", *replaceable[flag]}


@fuzz(80)
@given(data=st.data())
def test_an_output_path_is_refused_untouched_or_is_new_or_ours(monkeypatch, scratch, data):
    folder = fresh(scratch)
    (folder / "grid.yaml").write_text(
        "name: g\nmodels: [m]\nmethods: [{method: svd}]\nratios: [2]\ntargets: [k]\n"
        "tasks: [{task: wikitext2}]\n"
    )
    kinds = {}
    for name in NAMES:
        kind = data.draw(st.sampled_from(["none", *PLACES, "link"]))
        if kind == "none":
            continue
        if kind == "link":  # to another place, into one, or nowhere
            other = data.draw(st.sampled_from([*NAMES, "grid.yaml"]))
            (folder / name).symlink_to(folder / other / data.draw(st.sampled_from(["", "x"])))
        else:
            PLACES[kind](folder / name)
            kinds[(folder / name).resolve()] = kind

    def checked(*args: Any, **kwargs: Any) -> None:
        raise AecompressError("the checks passed")

    for stub in ("models.load_model", "artifact.export_dense", "evaluation.runner.evaluate"):
        monkeypatch.setattr(f"aecompress.{stub}", checked)
    monkeypatch.setattr("aecompress.sweep.run_sweep", checked)
    monkeypatch.chdir(folder)
    flag = data.draw(st.sampled_from(sorted(OUTPUT_FLAGS)))
    overwrite = data.draw(st.booleans()) and flag in ("-o", "--json")
    target = data.draw(st.sampled_from([*NAMES, "grid.yaml"])) + data.draw(
        st.sampled_from(SUFFIXES)
    )
    before = tree(folder)
    command = [*OUTPUT_FLAGS[flag], flag, target, *(["--overwrite"] if overwrite else [])]
    code, _, err = invoke(*command)
    accepted = "the checks passed" in one_error(code, err)
    event(f"{flag} {'accepted' if accepted else 'refused'}")
    assert tree(folder) == before  # the guard writes nothing, refused or not
    if accepted:
        assert acceptable(flag, overwrite, (folder / target).resolve(), kinds), command


# --- sweep result lines -------------------------------------------------------------

RECORDS = [
    {
        "cell": {"model": "m", "label": "dense", "ratio": 1.0},
        "task": "wikitext2",
        "status": "ok",
        "split": "test",
        "metrics": {"perplexity": 30.0},
        "seconds": 1.0,
    },
    {
        "cell": {
            "model": "m",
            "label": "svd",
            "method": "svd",
            "options": {},
            "targets": "k",
            "group": "none",
            "ratio": 2,
            "seed": 0,
        },
        "task": "wikitext2",
        "status": "ok",
        "split": "test",
        "metrics": {"perplexity": 31.5},
        "compress_seconds": 0.5,
        "ratio": 2.0,
    },
    {
        "cell": {"model": "m", "label": "svd", "targets": "k", "ratio": 1e9, "seed": 0},
        "task": "wikitext2",
        "status": "failed",
        "error": "AecompressError: ratio is too large",
    },
]


@fuzz(30)
@given(data=st.data())
def test_damaged_result_lines_are_skipped_by_sweep_and_report(scratch, data):
    folder = fresh(scratch)
    lines, kept = [], []
    for record in RECORDS:
        if data.draw(st.booleans()):
            lines.append(json.dumps(record, sort_keys=True))
            kept.append(record)
        else:  # a damaged record, or a line of JSON written by something else
            damaged = mutate(data, copy.deepcopy(record)) if data.draw(st.booleans()) else None
            lines.append(json.dumps(damaged if damaged is not None else data.draw(JSON)))
    results = folder / "results.jsonl"
    results.write_text("\n".join(lines) + "\n")
    records = read_results(results)
    assert all(record in records for record in kept)  # no record is lost
    code, _, err = invoke("report", str(results))
    event(f"exit status {code}")
    if code:
        assert "holds no sweep records" in one_error(code, err)
    else:
        assert (folder / "report.md").is_file()


# --- cache entries ------------------------------------------------------------------


def damage_tensors(data: st.DataObject, tensors: dict[str, torch.Tensor]) -> None:
    """A statistic removed, renamed, reshaped, made NaN, integer, or added."""
    key = data.draw(st.sampled_from(sorted(tensors)))
    action = data.draw(st.sampled_from(["pop", "rename", "shape", "nan", "int", "add"]))
    if action == "pop":
        tensors.pop(key)
    elif action == "rename":
        tensors[key.replace("::", data.draw(st.sampled_from([":", "::x", "::"])))] = tensors.pop(
            key
        )
    elif action == "shape":
        tensors[key] = torch.zeros(data.draw(st.lists(st.integers(0, 3), max_size=3)))
    elif action == "nan":
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = torch.nan
    elif action == "int":
        tensors[key] = tensors[key].long()
    else:
        tensors[f"{key.partition('::')[0]}::{data.draw(st.text(max_size=4))}"] = torch.ones(2)


@pytest.fixture(scope="module")
def calibration_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model, its targets, and a pristine cache holding their statistics."""
    from aecompress.calibration import CalibrationConfig
    from aecompress.targets import resolve_targets

    model = make_tiny("llama")
    setup = {
        "model": model,
        "tokenizer": tiny_tokenizer(),
        "targets": resolve_targets(model, ["embed", "k", "down"]),
        "needed": {"xtx", "fisher"},
        "config": CalibrationConfig(**CALIBRATION),
        "pristine": tmp_path_factory.mktemp("pristine-cache"),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AECOMPRESS_CACHE", str(setup["pristine"]))
        cached(setup)
    return setup


def cached(setup: dict[str, Any]) -> dict[str, Any]:
    from aecompress.calibration import cached_statistics

    keys = ("model", "tokenizer", "targets", "needed", "config")
    return cached_statistics(*(setup[k] for k in keys), "h", progress=False)


def with_pristine_cache(monkeypatch: pytest.MonkeyPatch, scratch: Path, pristine: Path) -> Path:
    """A fresh copy of a pristine cache, in use from now on."""
    folder = fresh(scratch) / "cache"
    shutil.copytree(pristine, folder)
    monkeypatch.setenv("AECOMPRESS_CACHE", str(folder))
    return folder


@fuzz(15)
@given(data=st.data())
def test_a_damaged_calibration_entry_is_read_valid_or_rebuilt(
    monkeypatch, scratch, calibration_setup, data
):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from aecompress.calibration import check_statistics

    folder = with_pristine_cache(monkeypatch, scratch, calibration_setup["pristine"])
    (entry,) = (folder / "calibration").iterdir()
    with safe_open(str(entry), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(entry)
    if data.draw(st.booleans()):
        damage_tensors(data, tensors)
    else:
        metadata[data.draw(st.sampled_from(["tokens", "aliases"]))] = json.dumps(data.draw(JSON))
    save_file(tensors, entry, metadata=metadata)
    model, targets = calibration_setup["model"], calibration_setup["targets"]
    full = calibration_setup["needed"] | {"abs_mean", "counts", "l1", "out_fisher"}
    check_statistics(cached(calibration_setup), model, targets, full)  # valid, or rebuilt
    check_statistics(cached(calibration_setup), model, targets, full)  # the entry is valid now


@pytest.fixture(scope="module")
def dense_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model and a pristine cache holding its dense result."""
    model = LoadedModel(make_tiny("llama"), tiny_tokenizer(), "tiny", "AutoModelForCausalLM")
    setup = {"model": model, "pristine": tmp_path_factory.mktemp("pristine-dense")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AECOMPRESS_CACHE", str(setup["pristine"]))
        setup["truth"] = dense_result(setup)
    return setup


def dense_result(setup: dict[str, Any]) -> Any:
    from aecompress.evaluation.runner import cached_dense_result

    options = {"windows": 1, "seq_len": 8}
    return cached_dense_result(lambda: setup["model"], "sha", "wikitext2", options, progress=False)


@fuzz(15)
@given(data=st.data())
def test_a_damaged_dense_entry_is_read_valid_or_rebuilt(monkeypatch, scratch, dense_setup, data):
    folder = with_pristine_cache(monkeypatch, scratch, dense_setup["pristine"])
    (entry,) = (folder / "dense").iterdir()
    entry.write_text(json.dumps(mutate(data, json.loads(entry.read_text()))))
    found = dense_result(dense_setup)
    assert found.task == "wikitext2" and all(type(v) is float for v in found.metrics.values())
    event("same metrics" if found.metrics == dense_setup["truth"].metrics else "changed metrics")


# --- regex targets ------------------------------------------------------------------

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]


@st.composite
def target_lists(draw: st.DrawFn) -> str:
    """Regexes over some of the tiny Llama's projections (in some layers), maybe beside
    families that may select the same matrices."""
    chosen = draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True))
    layers = draw(st.sampled_from([r"\d+", "0", "1", "(0|1)"]))
    targets = [rf"re:model\.layers\.{layers}\..*\.({'|'.join(chosen)})"]
    if draw(st.booleans()):
        targets.append(draw(st.sampled_from(["re:.*_proj", "re:lm_head", "re:.*norm", "k"])))
    targets += draw(st.lists(st.sampled_from(["embed", "q", "up"]), max_size=2, unique=True))
    return ",".join(targets)


@fuzz(25)
@given(targets=target_lists(), group=st.sampled_from(["none", "layers", "layers:1"]))
def test_regex_targets_give_distinct_groups_or_one_error(model_folder, scratch, targets, group):
    out = fresh(scratch) / "art"
    args = ["--targets", targets, "--group", group, "--method", "svd", "-o", str(out)]
    result = invoke("compress", str(model_folder), *args)
    assert_outcome(result, out)
    if result[0]:
        return
    manifest = json.loads((out / MANIFEST).read_text())
    names = [g["name"] for g in manifest["groups"]]
    members = [m["path"] for g in manifest["groups"] for m in g["members"]]
    assert len(set(names)) == len(names) and len(set(members)) == len(members)
    code, out_text, err = invoke("inspect", str(out), "--per-matrix")
    assert code == 0 and all(name in out_text for name in names), err
