import json
from pathlib import Path

import pytest

from aecompress.engine import compress
from aecompress.errors import AecompressError
from aecompress.evaluation.runner import cached_dense_result, evaluate
from aecompress.models import LoadedModel, load_model
from tests.conftest import tiny_model

OPTIONS = {"windows": 1, "seq_len": 16}


@pytest.fixture
def dense(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path))  # an empty cache
    model = tiny_model("llama")
    return LoadedModel(model, tokenizer, "tiny", "AutoModelForCausalLM")


def measure(dense, calls):
    def load():
        calls.append(1)
        return dense

    return cached_dense_result(load, "sha", "wikitext2", OPTIONS, progress=False)


def test_the_dense_result_is_measured_once(dense):
    calls = []
    first, again = measure(dense, calls), measure(dense, calls)
    assert calls == [1] and first.metrics == again.metrics


def test_a_corrupt_dense_cache_file_is_discarded_and_rebuilt(dense, tmp_path, caplog):
    calls = []
    first = measure(dense, calls)
    (entry,) = (tmp_path / "dense").iterdir()
    entry.write_text('{"task": "wikitext2", "metr')
    assert measure(dense, calls).metrics == first.metrics
    assert "discarding unreadable cache file" in caplog.text and len(calls) == 2
    measure(dense, calls)
    assert len(calls) == 2  # rebuilt: read from now on


@pytest.mark.parametrize(
    "change",
    [
        lambda entry: entry["metrics"].update(perplexity="12.5"),  # a string
        lambda entry: entry.pop("metrics"),
        lambda entry: entry.update(task="sts-b"),
        lambda entry: entry["data_sha256"].update({"wikitext-2-raw/missing.raw": "0" * 64}),
        lambda entry: entry["data_sha256"].update({"../../etc/passwd": "0" * 64}),
        lambda entry: entry.update(seconds=[]),
    ],
)
def test_an_invalid_dense_cache_entry_is_discarded_and_rebuilt(dense, tmp_path, caplog, change):
    calls = []
    first = measure(dense, calls)
    (path,) = (tmp_path / "dense").iterdir()
    entry = json.loads(path.read_text())
    change(entry)
    path.write_text(json.dumps(entry))
    assert measure(dense, calls).metrics == first.metrics
    assert "discarding invalid cache file" in caplog.text and len(calls) == 2
    measure(dense, calls)
    assert len(calls) == 2  # rebuilt: read from now on


def test_two_processes_writing_one_dense_entry_do_not_collide(dense, monkeypatch):
    """A second writer finishes the same entry while the first is writing it."""
    real_write, calls = Path.write_text, []

    def write_then_let_the_other_process_write(path, text, *args, **kwargs):
        written = real_write(path, text, *args, **kwargs)
        if len(calls) == 1:
            measure(dense, calls)
        return written

    with monkeypatch.context() as patched:
        patched.setattr(Path, "write_text", write_then_let_the_other_process_write)
        first = measure(dense, calls)
    assert len(calls) == 2 and measure(dense, calls).metrics == first.metrics
    assert len(calls) == 2


def save_tiny(folder: Path, tokenizer, seed: int) -> None:
    tiny_model("llama", seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def compress_from(folder: str, out: Path) -> None:
    compressed = compress(load_model(folder), method="svd", ratio=2, targets=["k"], progress=False)
    compressed.save_pretrained(str(out))


def test_a_base_model_with_other_weights_is_refused_and_nothing_cached(
    tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path / "cache"))
    save_tiny(tmp_path / "base", tokenizer, seed=0)
    compress_from(str(tmp_path / "base"), tmp_path / "art")
    save_tiny(tmp_path / "base", tokenizer, seed=1)  # the base folder now holds other weights
    with pytest.raises(AecompressError, match="does not hold the weights"):
        evaluate(str(tmp_path / "art"), ["wikitext2"], OPTIONS, progress=False)
    assert not (tmp_path / "cache" / "dense").exists()


def test_a_relative_base_path_is_recorded_absolute(tokenizer, tmp_path, monkeypatch):
    """Evaluated from another folder holding another model of the same relative name."""
    for where, seed in (("here", 0), ("elsewhere", 1)):
        save_tiny(tmp_path / where / "llama", tokenizer, seed)
    monkeypatch.chdir(tmp_path / "here")
    compress_from("llama", tmp_path / "art")
    monkeypatch.chdir(tmp_path / "elsewhere")
    _, (dense,) = evaluate(str(tmp_path / "art"), ["wikitext2"], OPTIONS, progress=False)
    (true_base,), _ = evaluate("../here/llama", ["wikitext2"], OPTIONS, progress=False)
    (other,), _ = evaluate("llama", ["wikitext2"], OPTIONS, progress=False)
    assert dense.metrics == true_base.metrics != other.metrics
    manifest = json.loads((tmp_path / "art" / "aecompress.json").read_text())
    assert manifest["base_model"] == str(tmp_path / "here" / "llama")


def test_the_base_model_is_freed_before_the_compressed_one_is_built(
    tokenizer, tmp_path, monkeypatch
):
    import weakref

    import aecompress.evaluation.runner as runner

    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path / "cache"))  # the dense one is run
    save_tiny(tmp_path / "base", tokenizer, seed=0)
    compress_from(str(tmp_path / "base"), tmp_path / "art")
    real_base, real_compressed, bases = runner.load_base_model, runner.load_compressed, []

    def load_base(*args):
        base = real_base(*args)
        bases.append(weakref.ref(base.model))
        return base

    def load_compressed(*args, **kwargs):
        assert len(bases) == 1 and bases[0]() is None  # built, measured and freed
        return real_compressed(*args, **kwargs)

    monkeypatch.setattr(runner, "load_base_model", load_base)
    monkeypatch.setattr(runner, "load_compressed", load_compressed)
    results, dense = evaluate(str(tmp_path / "art"), ["wikitext2"], OPTIONS, progress=False)
    assert len(results) == len(dense) == 1 and len(bases) == 1


def test_probe_runs_the_glue_tasks_as_probes_beside_a_probed_dense_model(
    tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path / "cache"))
    tiny_model("bert").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    compressed = compress(
        load_model(str(tmp_path / "base")), method="svd", ratio=2, targets=["k"], progress=False
    )
    compressed.save_pretrained(str(tmp_path / "art"))
    options = {"max_train": 10}
    results, dense = evaluate(
        str(tmp_path / "art"), ["glue-rte", "stsb"], options, probe=True, progress=False
    )
    assert [r.task for r in results] == [r.task for r in dense] == ["glue-rte-probe", "stsb"]
    assert results[0].settings["max_train"] == dense[0].settings["max_train"] == 10
    (tuned,), _ = evaluate(
        str(tmp_path / "base"), ["glue-rte"], {"train_fraction": 0.004}, progress=False
    )
    assert tuned.task == "glue-rte" and "max_train" not in tuned.settings
