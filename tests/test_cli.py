import signal
import subprocess
import sys

import pytest
import torch

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


def one_error(code: int, err: str) -> str:
    """The one `aecompress: error:` line of a failed run (exit status 2, no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("aecompress: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    return errors[0]


def forbid_loading(monkeypatch) -> None:
    """From now on loading a model fails the test: the command must stop before."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("aecompress.models.load_model", fail)


@pytest.mark.parametrize(
    "output,message",
    [
        ("file", "exists and is not a folder"),
        ("file/art", "is not a folder"),
        ("full", "exists and is not an aecompress artifact"),
        (".", "cannot replace the current folder"),
        ("..", "cannot replace the current folder"),
        ("/proc/art", "cannot write in /proc"),
    ],
)
def test_an_unwritable_output_is_refused_before_any_work(
    monkeypatch, capsys, tiny_folder, tmp_path, output, message
):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    forbid_loading(monkeypatch)
    target = output if output in (".", "..") or output.startswith("/") else f"../{output}"
    code, _, err = run(monkeypatch, capsys, "compress", str(tiny_folder), "-o", target)
    assert message in one_error(code, err)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_invalid_yaml_is_one_line(monkeypatch, capsys, tiny_folder, tmp_path):
    forbid_loading(monkeypatch)
    args = ["compress", str(tiny_folder), "-o", str(tmp_path / "o"), "--method", "ae"]
    code, _, err = run(monkeypatch, capsys, *args, "--option", "decoder=[1,")
    assert "--option 'decoder=[1,' is not valid YAML" in one_error(code, err)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: svd\nratio: [2\n")
    code, _, err = run(monkeypatch, capsys, *args, "--recipe", str(recipe))
    assert f"recipe {recipe} is not valid YAML" in one_error(code, err)


@pytest.mark.parametrize(
    "args,message",
    [
        (["compress", "--rati", "2"], "No such option: --rati"),
        (["compress", "m", "-o", "o", "--ratio", "two"], "Invalid value for '--ratio'"),
        (["evaluate"], "Missing argument 'model'"),
        (["nonsense"], "No such command 'nonsense'"),
        ([], "Missing command"),
    ],
)
def test_command_line_usage_errors_are_one_line(monkeypatch, capsys, args, message):
    code, _, err = run(monkeypatch, capsys, *args)
    assert message in one_error(code, err)


def test_calibration_that_overflows_is_one_line(monkeypatch, capsys, tmp_path, tokenizer):
    model = tiny_model("llama")
    for layer in model.model.layers:  # huge, finite weights outside the targets
        layer.input_layernorm.weight.data.fill_(1e30)
    model.save_pretrained(tmp_path / "huge")
    tokenizer.save_pretrained(tmp_path / "huge")
    for method in ("fwsvd", "asvd"):
        args = ["compress", str(tmp_path / "huge"), "--targets", "k", "--method", method]
        code, _, err = run(monkeypatch, capsys, *args, "-o", str(tmp_path / method))
        assert "calibration statistics" in one_error(code, err)
        assert not (tmp_path / method).exists()


def test_ctrl_c_is_one_line_and_exit_130(tiny_folder, tmp_path):
    """SIGINT while compressing (stood in for by a long sleep) in a real process."""
    script = (
        "import sys, time\n"
        "import aecompress.engine\n"
        "def slow(*args, **kwargs):\n"
        "    print('compressing', flush=True)\n"
        "    time.sleep(120)\n"
        "aecompress.engine.compress = slow\n"
        "from aecompress.cli import main\n"
        f"sys.argv = ['aecompress', 'compress', {str(tiny_folder)!r}, '-o', "
        f"{str(tmp_path / 'art')!r}]\n"
        "main()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "compressing\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.splitlines()[-1] == "aecompress: interrupted" and "Traceback" not in err
    assert not (tmp_path / "art").exists()


def test_a_numerical_failure_is_one_line(monkeypatch, capsys, tiny_folder, tmp_path):
    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr("aecompress.engine.compress", fail)
    args = ["compress", str(tiny_folder), "--method", "asvd", "-o", str(tmp_path / "o")]
    code, _, err = run(monkeypatch, capsys, *args)
    assert "asvd failed numerically: linalg.svd" in one_error(code, err)


def test_an_environment_error_is_one_line(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(
        "name: g\nmodels: [m]\nmethods: [{method: svd}]\nratios: [2]\ntargets: [k]\n"
        "tasks: [{task: wikitext2}]\n"
    )
    forbid_loading(monkeypatch)
    args = ["sweep", str(recipe), "--results", "/proc/aecompress/results.jsonl"]
    code, _, err = run(monkeypatch, capsys, *args)
    assert "/proc/aecompress" in one_error(code, err)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--executor", "ray"], "--executor ray needs Ray: pip install 'aecompress[ray]'"),
        (["--executor", "dask"], "--executor must be serial or ray (got 'dask')"),
        (["--address", "auto"], "--address needs --executor ray"),
    ],
)
def test_a_bad_executor_is_one_line_before_any_work(monkeypatch, capsys, tmp_path, args, message):
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(
        "name: g\nmodels: [m]\nmethods: [{method: svd}]\nratios: [2]\ntargets: [k]\n"
        "tasks: [{task: wikitext2}]\nresources: {cpus: 2, gpus: 1}\n"
    )

    def fail(*args, **kwargs):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr("aecompress.sweep.run_sweep", fail)
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray is not installed
    code, _, err = run(monkeypatch, capsys, "sweep", str(recipe), *args)
    assert message in one_error(code, err)


def test_report_merges_the_results_files_of_shards(monkeypatch, capsys, tiny_folder, tmp_path):
    from aecompress.sweep import parse_shard, run_sweep
    from tests.test_sweep import recipe

    plan = recipe(str(tiny_folder))
    for index in (0, 1):
        path = tmp_path / f"shard-{index}.jsonl"
        run_sweep(plan, path, progress=False, shard=parse_shard(f"{index}/2"))
    files = [str(tmp_path / "shard-0.jsonl"), str(tmp_path / "shard-1.jsonl")]
    code, stdout, _ = run(monkeypatch, capsys, "report", *files)
    assert code == 0 and f"wrote {tmp_path / 'report.md'}" in stdout
    report = (tmp_path / "report.md").read_text()
    assert "from shard-0.jsonl, shard-1.jsonl" in report
    assert "dense: " in report and "| svd | " in report
    (row,) = [line for line in report.splitlines() if line.startswith("| svd |")]
    assert row.count("(") == 2  # ratio 2 (shard 0) and ratio 4 (shard 1), each beside dense
    code, _, err = run(monkeypatch, capsys, "report", files[0], str(tmp_path / "none.jsonl"))
    assert "no such results file" in one_error(code, err)
