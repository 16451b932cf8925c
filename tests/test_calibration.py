import pytest
import torch

from aecompress.calibration import (
    CalibrationConfig,
    cached_statistics,
    collect_statistics,
    split_ids,
)
from aecompress.errors import AecompressError
from aecompress.targets import resolve_targets
from tests.conftest import tiny_model

CONFIG = CalibrationConfig(samples=3, seq_len=16, batch_size=2)


def forbid_collection(monkeypatch) -> None:
    """From now on a calibration pass fails the test: statistics must come from the cache."""

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr("aecompress.calibration.collect_statistics", fail)


def test_statistics_are_reproducible_and_correct(tokenizer):
    model = tiny_model("llama")
    targets = resolve_targets(model, ["embed", "down"])
    first = collect_statistics(
        model, tokenizer, targets, {"xtx", "abs_mean", "counts", "fisher"}, CONFIG, progress=False
    )
    again = collect_statistics(
        model, tokenizer, targets, {"xtx", "abs_mean", "counts", "fisher"}, CONFIG, progress=False
    )
    for name, entry in first.items():
        for field in ("xtx", "abs_mean", "counts", "fisher"):
            a, b = getattr(entry, field), getattr(again[name], field)
            assert (a is None and b is None) or torch.equal(a, b), (name, field)
    down = first["model.layers.0.mlp.down_proj"]
    assert down.tokens == 3 * 16 and down.xtx.shape == (64, 64) and down.xtx.dtype == torch.float64
    torch.testing.assert_close(down.xtx, down.xtx.T)
    assert torch.all(torch.linalg.eigvalsh(down.xtx) > -1e-6)
    embed = first["model.embed_tokens"]
    split_tokens = split_ids(tokenizer, "train").numel()  # counts cover the whole split
    assert embed.counts.sum() == embed.tokens == split_tokens > 3 * 16
    assert embed.fisher.shape == (30522, 32)


def test_fisher_needs_an_lm_head(tokenizer):
    model = tiny_model("bert").bert
    targets = resolve_targets(model, ["k"])
    try:
        collect_statistics(model, tokenizer, targets, {"fisher"}, CONFIG, progress=False)
    except AecompressError as error:
        assert "no LM head" in str(error)
    else:
        raise AssertionError("expected an error")


def test_cache_returns_the_same_statistics(tokenizer, monkeypatch):
    model = tiny_model("gpt2")
    targets = resolve_targets(model, ["k"])
    stats = cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "hash", progress=False)

    forbid_collection(monkeypatch)
    again = cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "hash", progress=False)
    for name in stats:
        assert (
            torch.equal(stats[name].xtx, again[name].xtx)
            and stats[name].tokens == again[name].tokens
        )


def test_one_cached_pass_serves_every_statistic_it_collects(tokenizer, monkeypatch):
    model = tiny_model("llama")
    targets = resolve_targets(model, ["k"])
    first = cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "hash", progress=False)

    forbid_collection(monkeypatch)
    asvd = cached_statistics(
        model, tokenizer, targets, {"abs_mean"}, CONFIG, "hash", progress=False
    )
    for name, entry in asvd.items():
        assert entry.abs_mean is not None and torch.equal(entry.xtx, first[name].xtx)


def test_two_processes_building_one_entry_do_not_collide(tokenizer, monkeypatch):
    """A second writer finishes the same cache entry while the first is writing it."""
    import aecompress.calibration as calibration

    model = tiny_model("gpt2")
    targets = resolve_targets(model, ["k"])
    real_save, calls = calibration.save_file, []

    def save_then_let_the_other_process_write(tensors, filename, metadata):
        real_save(tensors, filename, metadata=metadata)
        calls.append(filename)
        if len(calls) == 1:
            cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "race", progress=False)

    monkeypatch.setattr(calibration, "save_file", save_then_let_the_other_process_write)
    stats = cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "race", progress=False)
    assert len(calls) == 2 and calls[0] != calls[1]
    forbid_collection(monkeypatch)
    again = cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "race", progress=False)
    assert all(torch.equal(stats[n].xtx, again[n].xtx) for n in stats)


def test_a_corrupt_cache_file_is_discarded_and_rebuilt(tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path))
    model = tiny_model("gpt2")
    targets = resolve_targets(model, ["k"])
    stats = cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "hash", progress=False)
    (entry,) = (tmp_path / "calibration").iterdir()
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    again = cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "hash", progress=False)
    assert "discarding unreadable cache file" in caplog.text
    assert all(torch.equal(stats[n].xtx, again[n].xtx) for n in stats)
    forbid_collection(monkeypatch)  # rebuilt: the next run reads it
    cached_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, "hash", progress=False)


def test_statistics_that_overflow_are_refused(tokenizer):
    model = tiny_model("llama")
    for layer in model.model.layers:  # huge, finite weights before the targets
        layer.input_layernorm.weight.data.fill_(1e30)
    targets = resolve_targets(model, ["k"])
    with pytest.raises(AecompressError, match=r"calibration statistics \(\w+\) of .* not finite"):
        collect_statistics(model, tokenizer, targets, {"xtx", "fisher"}, CONFIG, progress=False)


def test_windows_longer_than_the_model_positions_are_refused(tokenizer):
    model = tiny_model("gpt2")
    targets = resolve_targets(model, ["k"])
    config = CalibrationConfig(samples=1, seq_len=1024)
    with pytest.raises(AecompressError, match="seq_len=1024 is longer than the 512 positions"):
        collect_statistics(model, tokenizer, targets, {"xtx"}, config, progress=False)
