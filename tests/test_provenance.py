import subprocess

import torch
import transformers

from aecompress import provenance


def test_the_environment_names_versions_kernel_level_and_cpu():
    found = provenance.environment()
    assert found["torch"] == torch.__version__
    assert found["transformers"] == transformers.__version__
    assert found["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert found["cpu"] == provenance.cpu_model() != ""


def test_the_commit_of_a_checkout_says_when_its_files_differ(monkeypatch):
    answers = {
        "ls-files": "provenance.py\n",
        "rev-parse": "abc1234\n",
        "status": " M src/aecompress/sweep.py\n",
    }

    def git(command, **_):
        return subprocess.CompletedProcess(command, 0, answers[command[1]], "")

    monkeypatch.setattr(provenance.subprocess, "run", git)
    assert provenance._source_commit() == "abc1234+changes"
    answers["status"] = ""
    assert provenance._source_commit() == "abc1234"
    answers["ls-files"] = ""  # an installed copy inside another repository
    assert provenance._source_commit() == ""


def test_no_git_gives_no_commit(monkeypatch):
    def missing(command, **_):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", missing)
    assert provenance._source_commit() == ""
