"""Streamed evaluation gives the in-memory numbers: every batch through one block at a time,
then the model's own head on the replayed final hidden states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aecompress.engine import compress
from aecompress.errors import AecompressError
from aecompress.evaluation import runner
from aecompress.evaluation import streamed as streamed_module
from aecompress.evaluation.multiple_choice import multiple_choice
from aecompress.evaluation.perplexity import perplexity
from aecompress.evaluation.runner import evaluate
from aecompress.evaluation.streamed import StreamedForward, chunks, replaying
from aecompress.models import load_model
from aecompress.streaming import CheckpointBlocks
from aecompress.targets import transformer_blocks
from tests.conftest import tiny_model


class ModelBlocks:
    """A BlockSource of a model already in memory: loading and releasing only record the
    calls, and check that a block runs only between its load and its release."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks_path, self.blocks = transformer_blocks(model)
        self.calls: list[tuple[str, int]] = []
        self.loaded: int | None = None
        self.handles = [  # its parts compute only when it runs
            part.register_forward_pre_hook(self._check_loaded(index))
            for index, block in enumerate(self.blocks)
            for part in block.children()
        ]

    def remove_hooks(self) -> None:
        """Leave the model as it was (a session fixture's model is shared)."""
        for handle in self.handles:
            handle.remove()

    def _check_loaded(self, index: int):
        def hook(_module: nn.Module, _args: object) -> None:
            assert self.loaded == index, f"block {index} runs while block {self.loaded} is loaded"

        return hook

    def load(self, index: int, device: torch.device) -> None:
        assert self.loaded is None
        self.calls.append(("load", index))
        self.loaded = index

    def release(self, index: int) -> None:
        self.calls.append(("release", index))
        self.loaded = None


def _streamed(model: nn.Module, **kwargs) -> tuple[StreamedForward, ModelBlocks]:
    source = ModelBlocks(model)
    return StreamedForward(source, torch.device("cpu"), **kwargs), source  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_perplexity_equals_the_in_memory_one(arch, tokenizer):
    model = tiny_model(arch)
    settings = {"windows": 3, "seq_len": 32, "batch_size": 2, "progress": False}
    expected = perplexity(model, tokenizer, **settings).perplexity
    forward, source = _streamed(model)
    streamed = perplexity(model, tokenizer, forward=forward, **settings).perplexity
    assert streamed == pytest.approx(expected, rel=1e-6)
    # one pass over the blocks for both batches: each loaded once, released before the next
    layers = len(source.blocks)
    assert source.calls == [(c, i) for i in range(layers) for c in ("load", "release")]


def test_streamed_multiple_choice_equals_the_in_memory_one(tokenizer):
    model = tiny_model("llama")
    settings = {"limit": 6, "batch_size": 4, "progress": False}
    expected = multiple_choice("arc-easy", model, tokenizer, **settings)
    forward, _ = _streamed(model)
    streamed = multiple_choice("arc-easy", model, tokenizer, forward=forward, **settings)
    assert streamed == pytest.approx(expected, rel=1e-6)


def test_chunks_that_fit_a_small_budget_give_the_same_numbers(tokenizer):
    model = tiny_model("llama")
    settings = {"windows": 3, "seq_len": 16, "batch_size": 1, "progress": False}
    expected = perplexity(model, tokenizer, **settings).perplexity
    forward, source = _streamed(model, budget=1)  # every batch its own chunk
    assert perplexity(model, tokenizer, forward=forward, **settings).perplexity == pytest.approx(
        expected, rel=1e-6
    )
    assert source.calls.count(("load", 0)) == 3  # the blocks pass once per chunk


def test_chunks_keep_the_order_and_the_budget():
    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)} for _ in range(5)]
    one = 4 * 4 * 8  # four tokens of hidden size 8 in float32
    found = list(chunks(batches, 2 * one, hidden_size=8))
    assert [len(c) for c in found] == [2, 2, 1]
    assert [b for c in found for b in c] == batches


def test_replay_leaves_the_blocks_as_they_were():
    model = tiny_model("llama")
    _, blocks = transformer_blocks(model)
    ids = torch.tensor([[5, 6, 7]])
    before = model(input_ids=ids).logits
    final = torch.zeros(1, 3, model.config.hidden_size)
    with replaying(blocks, final, as_tuple=False):
        replayed = model(input_ids=ids).logits
    norm_of_zero = model.model.norm(final)  # the head sees exactly the replayed states
    assert torch.allclose(replayed, model.lm_head(norm_of_zero))
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.real
def test_streamed_smollm2_perplexity_equals_the_in_memory_one(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    settings = {"windows": 2, "seq_len": 128, "batch_size": 1, "progress": False}
    expected = perplexity(model, tokenizer, **settings).perplexity
    forward, source = _streamed(model)
    try:
        streamed = perplexity(model, tokenizer, forward=forward, **settings).perplexity
    finally:
        source.remove_hooks()
    assert streamed == pytest.approx(expected, rel=1e-6)


# --- evaluate: a safetensors folder or an artifact, streamed ------------------------------

OPTIONS = {"windows": 2, "seq_len": 16, "batch_size": 1}


def _folder(tmp_path, tokenizer, arch="llama"):
    folder = tmp_path / "base"
    tiny_model(arch).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _metric(results):
    return [value for result in results for value in result.metrics.values()]


def test_a_checkpoint_folder_streams_to_the_in_memory_numbers(tokenizer, tmp_path):
    folder = _folder(tmp_path, tokenizer)
    tasks = ["wikitext2", "arc-easy"]
    options = {**OPTIONS, "limit": 3}
    whole, _ = evaluate(folder, tasks, options, progress=False, stream=False)
    streamed, _ = evaluate(folder, tasks, options, progress=False, stream=True)
    assert _metric(streamed) == pytest.approx(_metric(whole), rel=1e-6)


def test_an_artifact_and_its_base_stream_to_the_in_memory_numbers(tokenizer, tmp_path):
    folder = _folder(tmp_path, tokenizer)
    compressed = compress(load_model(folder), method="svd", ratio=2, targets=["k"], progress=False)
    compressed.save_pretrained(str(tmp_path / "art"))
    art = str(tmp_path / "art")
    whole, whole_dense = evaluate(art, ["wikitext2"], OPTIONS, progress=False, stream=False)
    cache_dir = tmp_path / "cache-streamed"  # the dense number measured again, streamed
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AECOMPRESS_CACHE", str(cache_dir))
        streamed, dense = evaluate(art, ["wikitext2"], OPTIONS, progress=False, stream=True)
    assert _metric(streamed) == pytest.approx(_metric(whole), rel=1e-6)
    assert _metric(dense) == pytest.approx(_metric(whole_dense), rel=1e-6)
    assert _metric(streamed) != _metric(dense)


def test_a_task_that_cannot_stream_is_refused_in_one_line(tokenizer, tmp_path):
    folder = _folder(tmp_path, tokenizer)
    with pytest.raises(AecompressError, match="task 'stsb' cannot run streamed") as error:
        evaluate(folder, ["wikitext2", "stsb"], progress=False, stream=True)
    assert "\n" not in str(error.value)


def test_forcing_a_gguf_model_to_stream_is_refused():
    with pytest.raises(AecompressError, match="GGUF file is de-quantised whole"):
        evaluate("smollm2-135m", ["wikitext2"], progress=False, stream=True)


def test_auto_streams_a_model_that_does_not_fit(tokenizer, tmp_path, monkeypatch, caplog):
    folder = _folder(tmp_path, tokenizer)
    whole, _ = evaluate(folder, ["wikitext2"], OPTIONS, progress=False)
    opened = []
    monkeypatch.setattr("aecompress.memory.available_memory", lambda: 1000)
    monkeypatch.setattr(runner, "open_streamed", _spy(runner.open_streamed, opened))
    found, _ = evaluate(folder, ["wikitext2"], OPTIONS, progress=False)
    assert opened and "available: streaming it" in caplog.text
    assert _metric(found) == pytest.approx(_metric(whole), rel=1e-6)
    # a task that cannot stream: loaded whole, with a note
    assert not streamed_module.choose_streaming(folder, ["wikitext2", "stsb"], None)
    assert "task stsb cannot stream: loading it whole" in caplog.text


def _spy(function, calls):
    def spy(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return spy


# --- devices: one block at a time on the device ---------------------------------------


def test_streaming_on_a_device_moves_one_block_at_a_time(tokenizer, tmp_path, monkeypatch):
    """The CUDA path on the CPU: `cuda` resolves to a CPU device, and every block's
    parameters are put on it when loaded and taken off (meta) when released."""
    folder = _folder(tmp_path, tokenizer)
    device = torch.device("cpu")
    asked, events = [], []
    monkeypatch.setattr(runner, "resolve_device", lambda name: asked.append(name) or device)
    load, release = CheckpointBlocks.load, CheckpointBlocks.release

    def loading(self, index, where):
        load(self, index, where)
        placed = {p.device for p in self.blocks[index].parameters()}
        events.append(("load", index, where, placed))

    def releasing(self, index):
        release(self, index)
        assert all(p.is_meta for p in self.blocks[index].parameters())
        events.append(("release", index))

    monkeypatch.setattr(CheckpointBlocks, "load", loading)
    monkeypatch.setattr(CheckpointBlocks, "release", releasing)
    evaluate(folder, ["wikitext2"], OPTIONS, progress=False, device="cuda", stream=True)
    assert asked == ["cuda"]
    layers = tiny_model("llama").config.num_hidden_layers
    expected = []
    for index in range(layers):
        expected += [("load", index, device, {device}), ("release", index)]
    assert events == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_streaming_on_cuda_gives_the_cpu_numbers(tokenizer, tmp_path):
    folder = _folder(tmp_path, tokenizer)
    cpu, _ = evaluate(folder, ["wikitext2"], OPTIONS, progress=False, device="cpu")
    cuda, _ = evaluate(folder, ["wikitext2"], OPTIONS, progress=False, device="cuda", stream=True)
    assert _metric(cuda) == pytest.approx(_metric(cpu), rel=1e-4)  # other kernels
