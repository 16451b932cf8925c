import json
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from aecompress import calibration
from aecompress.calibration import (
    CalibrationConfig,
    InputAccumulator,
    InputMoments,
    cached_statistics,
    calibration_ids,
    collect_statistics,
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
    split_tokens = calibration_ids(tokenizer, CONFIG).numel()  # counts cover the whole split
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


def test_a_cached_entry_of_token_counts_serves_linear_targets_too(tokenizer, monkeypatch):
    """The AE asks for token counts whatever its targets; on linear layers the pass gives
    them nothing, and its cache entry must still be read back, not discarded each run."""
    model = tiny_model("bert").bert
    targets = resolve_targets(model, ["k"])
    cached_statistics(model, tokenizer, targets, {"counts"}, CONFIG, "hash", progress=False)

    forbid_collection(monkeypatch)
    again = cached_statistics(model, tokenizer, targets, {"counts"}, CONFIG, "hash", progress=False)
    assert set(again) == {t.name for t in targets}


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


def _forge(entry, tensors, metadata):
    """Rewrite a cache file with its tensors and metadata changed in place."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(entry), framework="pt") as handle:
        meta = handle.metadata()
    loaded = load_file(entry)
    tensors(loaded)
    metadata(meta)
    save_file(loaded, entry, metadata=meta)


def _first(name):
    return lambda tensors: next(k for k in sorted(tensors) if k.endswith(name))


def _nan(tensors):
    tensors[_first("::xtx")(tensors)][0, 0] = float("nan")


def _wrong_shape(tensors):
    key = _first("::xtx")(tensors)
    tensors[key] = tensors[key][:-1]


def _missing(tensors):
    tensors.pop(_first("::abs_mean")(tensors))


def _int_counts(tensors):
    key = _first("::counts")(tensors)
    tensors[key] = tensors[key].long()


def _unknown(tensors):
    tensors["model.layers.0.mlp.down_proj::colour"] = torch.zeros(1)


def _keep(value):
    return None


@pytest.mark.parametrize(
    "tensors,metadata",
    [
        (_nan, _keep),
        (_wrong_shape, _keep),
        (_missing, _keep),
        (_int_counts, _keep),
        (_unknown, _keep),
        (_keep, lambda meta: meta.update(tokens="[1, 2]")),  # a list
        (_keep, lambda meta: meta.update(tokens=json.dumps({"model.embed_tokens": "3"}))),
        (_keep, lambda meta: meta.update(aliases=json.dumps({"a::xtx": "b::xtx"}))),
    ],
)
def test_an_invalid_cache_entry_is_discarded_and_rebuilt(
    tokenizer, tmp_path, monkeypatch, caplog, tensors, metadata
):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path))
    model = tiny_model("llama")
    targets = resolve_targets(model, ["embed", "down"])
    needed = {"xtx"}
    stats = cached_statistics(model, tokenizer, targets, needed, CONFIG, "hash", progress=False)
    (entry,) = (tmp_path / "calibration").iterdir()
    _forge(entry, tensors, metadata)
    again = cached_statistics(model, tokenizer, targets, needed, CONFIG, "hash", progress=False)
    assert "discarding invalid cache file" in caplog.text
    assert all(torch.equal(stats[n].xtx, again[n].xtx) for n in stats if stats[n].xtx is not None)
    forbid_collection(monkeypatch)  # rebuilt: the next run reads it
    cached_statistics(model, tokenizer, targets, needed, CONFIG, "hash", progress=False)


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


def batches(count: int, rows: int, width: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, rows, width, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("chunk", [3, 4, 1024])  # blocks of 3, 3, 3, 1; 4, 4, 2; one
def test_input_moments_match_a_float64_reference(monkeypatch, chunk):
    monkeypatch.setattr(calibration, "CHUNK_ROWS", chunk)
    live, dense = batches(3, 25, 10, seed=0), batches(3, 25, 10, seed=1)
    moments = InputMoments()
    for x, xd in zip(live, dense, strict=True):
        moments.add(x, xd)
    x = torch.cat(live).reshape(-1, 10).double()
    xd = torch.cat(dense).reshape(-1, 10).double()
    stats = moments.statistics()
    assert stats.tokens == moments.tokens == 150
    assert {t.dtype for t in (stats.xtx, stats.abs_mean, moments.cross)} == {torch.float64}
    torch.testing.assert_close(stats.xtx, x.T @ x, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(moments.cross, xd.T @ x, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0), rtol=1e-6, atol=1e-6)


def test_modules_reading_one_input_share_its_moments_added_once():
    accumulator = InputAccumulator(["q", "k", "o"])
    seen = []
    for attention in batches(2, 5, 6, seed=0):
        accumulator.new_pass()
        accumulator.add("q", attention)
        accumulator.add("k", attention)  # the same tensor: q's entry
        accumulator.add("o", attention.clone())  # equal values, another tensor
        seen.append(attention)
    moments = accumulator.moments
    assert moments["q"] is moments["k"] and moments["o"] is not moments["q"]
    x = torch.cat(seen).reshape(-1, 6).double()
    torch.testing.assert_close(moments["q"].gram, x.T @ x, rtol=1e-6, atol=1e-5)  # once
    stats = accumulator.statistics()
    assert stats["q"] is stats["k"] and stats["q"].tokens == 20


def test_the_accumulator_keeps_no_input_alive():
    accumulator = InputAccumulator(["q"])
    (x,) = batches(1, 4, 3, 0)
    accumulator.add("q", x)
    alive = weakref.ref(x)
    del x
    assert alive() is None


class Allocations(TorchDispatchMode):
    """Every tensor that an op makes in new memory (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.made.append((str(func), t.dtype, t.numel()))
        return out


def test_a_batch_is_never_copied_to_float64_nor_multiplied_whole(monkeypatch):
    """Beside the sums, adding a batch of 60 rows x 10 channels makes nothing larger than
    a chunk of the product (4 x 10): no `x.double()` (600 numbers), no whole X^T X (100)."""
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 4)
    first, second = batches(2, 30, 10, seed=0)
    dense = second + 1
    moments = InputMoments()
    moments.add(first, first)  # the sums exist from here on
    with Allocations() as allocations:
        moments.add(second, dense)
    assert allocations.made and max(n for _, _, n in allocations.made) <= 4 * 10, allocations.made
    assert any(n == 4 * 10 for _, _, n in allocations.made)  # the chunks are made


def test_collected_statistics_match_a_float64_reference(tokenizer):
    """xtx and abs_mean of every target against hooks doing the sums in float64; q, k, v
    read one input: one set of tensors."""
    model = tiny_model("llama")
    targets = resolve_targets(model, ["q", "k", "v", "down"])
    reference: dict[str, list[torch.Tensor]] = {t.path: [] for t in targets}
    hooks = [
        model.get_submodule(path).register_forward_pre_hook(
            lambda _module, args, path=path: reference[path].append(
                args[0].reshape(-1, args[0].shape[-1]).double()
            )
        )
        for path in reference
    ]
    stats = collect_statistics(model, tokenizer, targets, {"xtx"}, CONFIG, progress=False)
    for hook in hooks:
        hook.remove()
    for target in targets:
        x = torch.cat(reference[target.path])
        entry = stats[target.name]
        assert entry.tokens == x.shape[0] == 3 * 16
        torch.testing.assert_close(entry.xtx, x.T @ x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entry.abs_mean, x.abs().mean(0), rtol=1e-6, atol=1e-7)
    q, k = stats["model.layers.0.self_attn.q_proj"], stats["model.layers.0.self_attn.k_proj"]
    assert q.xtx is k.xtx and q.abs_mean is k.abs_mean


def test_calibration_reads_a_local_text_and_keys_its_cache_by_its_content(tmp_path, tokenizer):
    from aecompress.calibration import cache_key, calibration_windows

    path = tmp_path / "mine.txt"
    path.write_text("alpha beta gamma delta " * 40)
    config = CalibrationConfig(samples=2, seq_len=16, data=str(path))
    assert config.data == str(path.resolve())
    windows = calibration_windows(tokenizer, config)
    assert set(windows.flatten().tolist()) <= set(tokenizer("alpha beta gamma delta")["input_ids"])
    key = cache_key("hash", [], {"xtx"}, config)
    path.write_text("other words entirely " * 40)
    assert cache_key("hash", [], {"xtx"}, config) != key


def test_an_attn_target_measures_the_hidden_states_entering_q_k_and_v(tokenizer):
    model = tiny_model("llama")
    (attn,) = [t for t in resolve_targets(model, ["attn"]) if t.layer == 1]
    (q,) = [t for t in resolve_targets(model, ["q"]) if t.layer == 1]
    (k,) = [t for t in resolve_targets(model, ["k"]) if t.layer == 1]
    stats = collect_statistics(model, tokenizer, [attn], {"xtx"}, CONFIG, progress=False)
    plain = collect_statistics(model, tokenizer, [q, k], {"xtx"}, CONFIG, progress=False)
    hidden = model.config.hidden_size
    assert stats[attn.name].xtx.shape == (hidden, hidden)
    torch.testing.assert_close(stats[attn.name].xtx, plain[q.name].xtx)
    torch.testing.assert_close(stats[attn.name].xtx, plain[k.name].xtx)
