import sys

import pytest

from aecompress.cli import main
from tests.conftest import tiny_model


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["aecompress", *args])
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_compress_inspect_evaluate(monkeypatch, capsys, tiny_folder, tmp_path):
    out = tmp_path / "art"
    code, stdout, _ = run(
        monkeypatch,
        capsys,
        "compress",
        str(tiny_folder),
        "--method",
        "svd",
        "--ratio",
        "2",
        "--targets",
        "k,down",
        "--group",
        "layers",
        "-o",
        str(out),
    )
    assert code == 0, stdout
    assert "ratio" in stdout and out.is_dir()
    code, stdout, _ = run(monkeypatch, capsys, "inspect", str(out))
    assert code == 0
    assert "| k | 2 | 16x32 |" in stdout and "whole model" in stdout
    code, stdout, _ = run(
        monkeypatch,
        capsys,
        "evaluate",
        str(out),
        "--task",
        "wikitext2",
        "--windows",
        "2",
        "--seq-len",
        "16",
    )
    assert code == 0
    row = next(line for line in stdout.splitlines() if line.startswith("| wikitext2"))
    compressed, dense = (float(cell) for cell in row.split("|")[4:6])
    assert dense > 1 and compressed > 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratio", "1"], "ratio: Input should be greater than 1"),
        (["--ratio", "1e9"], "ratio is too large"),
        (["--targets", "kk"], "unknown target family 'kk'"),
        (["--targets", "gate", "--group", "layerz"], "unknown grouping 'layerz'"),
        (["--method", "svd", "--option", "rank=3"], "rank: Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(
    monkeypatch, capsys, tiny_folder, tmp_path, args, message
):
    code, _, err = run(
        monkeypatch, capsys, "compress", str(tiny_folder), "-o", str(tmp_path / "o"), *args
    )
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_model_with_no_such_family(monkeypatch, capsys, tmp_path, tokenizer):
    tiny_model("bert").save_pretrained(tmp_path / "bert")
    code, _, err = run(
        monkeypatch,
        capsys,
        "compress",
        str(tmp_path / "bert"),
        "--targets",
        "gate",
        "-o",
        str(tmp_path / "o"),
    )
    assert code == 2 and "model type 'bert' has no 'gate' matrices" in err


def test_unknown_model_and_empty_folder(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "compress", "no-such-model", "-o", str(tmp_path / "o"))
    assert code == 2 and "unknown model 'no-such-model'" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(monkeypatch, capsys, "evaluate", str(tmp_path / "empty"))
    assert code == 2 and "has no model weights" in err
