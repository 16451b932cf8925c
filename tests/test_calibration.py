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
