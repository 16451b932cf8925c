import pytest
import torch
import transformers

from aecompress.errors import AecompressError
from aecompress.estimate import (
    FLOAT32,
    FLOAT64,
    MemoryEstimate,
    check_fits,
    describe,
    estimate_memory,
)
from aecompress.recipe import Recipe

HIDDEN, INTERMEDIATE = 64, 176


def skeleton(layers: int) -> transformers.PreTrainedModel:
    """A Llama of `layers` layers on the meta device (shapes only)."""
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def fp32_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()]) * FLOAT32


def recipe(**fields) -> Recipe:
    chosen = {
        "method": "sparsegpt",
        "ratio": 1.25,
        "targets": "q,k,v,o,up,gate,down",
        "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        **fields,
    }
    return Recipe.parse(chosen)


def estimate(layers: int = 4, streamed: bool = False, pipeline: str = "sequential", **fields):
    return estimate_memory(skeleton(layers), recipe(pipeline=pipeline, **fields), streamed=streamed)


def test_the_parts_add_up_to_the_total():
    found = estimate()
    assert found.total == sum(found.parts().values())
    assert set(found.parts()) >= {"weights", "hidden_states", "statistics", "workspace"}
    assert all(size >= 0 for size in found.parts().values())
    assert found.weights == fp32_bytes(skeleton(4))
    assert found.hidden_states == 8 * 32 * HIDDEN * FLOAT32  # one stream: no refinement


def test_streaming_holds_one_block_whatever_the_depth():
    shallow, deep = estimate(2, streamed=True), estimate(24, streamed=True)
    assert deep.total == shallow.total
    assert deep.total < estimate(24).total
    block = fp32_bytes(skeleton(1).model.layers[0])
    assert estimate(24).weights - estimate(2).weights == 22 * block


def test_the_sequential_statistics_are_the_largest_input_gram():
    # down reads the intermediate activations: its X^T X is the largest, held alone
    assert estimate().statistics == INTERMEDIATE**2 * FLOAT64
    ffn = estimate(method="ffn-neurons", targets="ffn")
    assert ffn.statistics == INTERMEDIATE**2 * FLOAT64  # an ffn target's input: down's
    attn = estimate(method="attn-dims", targets="attn")
    assert attn.statistics == HIDDEN**2 * FLOAT64  # an attn target's input: the hidden states
    # the independent pipeline holds every target's X^T X at once
    independent = estimate(pipeline="independent")
    assert independent.statistics == 4 * (INTERMEDIATE**2 + 3 * HIDDEN**2) * FLOAT64


def test_refinement_keeps_a_dense_copy_and_more_hidden_states():
    plain, refined = estimate(), estimate(refine=5)
    assert plain.dense_copy == 0 and refined.dense_copy > 0
    assert refined.hidden_states == 3 * plain.hidden_states
    assert refined.workspace > plain.workspace  # the backward pass keeps activations


def test_a_run_beyond_the_available_memory_is_refused_in_one_line():
    found = estimate()
    check_fits(found, found.total)  # exactly fits
    check_fits(found, None)  # unknown: nothing to check
    with pytest.raises(AecompressError, match="--ignore-memory-estimate") as error:
        check_fits(found, found.total - 1)
    assert "\n" not in str(error.value) and "in memory" in str(error.value)


def test_the_table_has_one_column_per_path():
    table = describe([estimate(), estimate(streamed=True)])
    lines = table.splitlines()
    assert lines[0] == "| part | in memory | streamed |"
    assert lines[2] == "| pipeline | sequential | sequential |"
    assert lines[-1].startswith("| **total** |") and "GiB" in lines[-1]
    assert len(lines) == 3 + len(MemoryEstimate.__dataclass_fields__) - 3 + 1


@pytest.mark.parametrize(
    ("fields", "uncounted"),
    [
        ({}, []),
        ({"allocate": "sensitivity"}, ["allocation"]),
        ({"method": "fwsvd"}, ["Fisher"]),
        ({"method": "ae"}, ["AE"]),
    ],
)
def test_what_the_estimate_does_not_count_is_named(fields, uncounted):
    notes = estimate(**fields).notes
    assert len(notes) == len(uncounted)
    assert all(word in note for word, note in zip(uncounted, notes, strict=True))


def test_loading_a_bf16_checkpoint_whole_holds_its_pages_beside_the_fp32_model():
    model = skeleton(4)
    model.config.dtype = torch.bfloat16
    whole = estimate_memory(model, recipe(), streamed=False)
    assert whole.total >= whole.runtime + whole.weights * 3 // 2
    assert estimate_memory(model, recipe(), streamed=True).loading == 0
    assert estimate().loading < whole.loading  # fp32: one converted tensor only


def test_the_skeleton_of_a_folder_keeps_its_checkpoint_dtype(tmp_path):
    from aecompress.models import model_skeleton
    from tests.conftest import make_tiny

    for dtype in (torch.float32, torch.bfloat16):
        make_tiny("llama").to(dtype).save_pretrained(tmp_path / str(dtype))
        model = model_skeleton(str(tmp_path / str(dtype)))
        assert all(p.is_meta for p in model.parameters())
        assert model.config.dtype == dtype  # what the loading part reads
        assert estimate_memory(model, recipe(), streamed=False).weights == fp32_bytes(model)
