import torch
from slicegpt_probe import (
    per_block_directions,
    per_block_width,
    residual_points,
    sliced_stream,
    stream_numbers,
)

from aecompress.models import load_model
from aecompress.pipeline.slicing import stream_directions
from tests.benchmarks.conftest import run_script

IDS = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(0))


def final_norm_input(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    handle.remove()
    return seen[0], logits


def test_the_whole_basis_is_the_dense_model_and_a_cut_one_keeps_the_stream_in_its_span(
    llama_folder,
):
    model = load_model(llama_folder).model.eval()
    basis = stream_directions(model, IDS, progress=False).float()
    points = residual_points(model)
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[0]), atol=1e-5, rtol=0)
    _, dense = final_norm_input(model, IDS)
    with sliced_stream(model, [basis] * points):
        _, whole = final_norm_input(model, IDS)
    torch.testing.assert_close(whole, dense, atol=1e-4, rtol=1e-4)
    kept = basis[:, :8]
    with sliced_stream(model, [kept] * points):
        stream, cut = final_norm_input(model, IDS)
    torch.testing.assert_close(stream @ kept @ kept.T, stream, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cut, dense, atol=1e-3)
    _, after = final_norm_input(model, IDS)  # the hooks are gone
    torch.testing.assert_close(after, dense)


def test_per_block_bases_are_fitted_in_order_on_the_sliced_stream(llama_folder):
    model = load_model(llama_folder).model.eval()
    size = model.config.hidden_size
    whole = per_block_directions(model, IDS, size)
    assert len(whole) == residual_points(model)
    _, dense = final_norm_input(model, IDS)
    with sliced_stream(model, whole):
        _, kept_all = final_norm_input(model, IDS)
    torch.testing.assert_close(kept_all, dense, atol=1e-4, rtol=1e-4)

    bases = per_block_directions(model, IDS, 8)
    assert {tuple(b.shape) for b in bases} == {(size, 8)}
    assert not torch.allclose(bases[0], bases[-1], atol=1e-2)  # each point its own
    with sliced_stream(model, bases):
        stream, cut = final_norm_input(model, IDS)
    torch.testing.assert_close(stream @ bases[-1] @ bases[-1].T, stream, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cut, dense, atol=1e-3)
    # the last basis is the principal directions of the stream that reached it, cut
    with sliced_stream(model, [*bases[:-1], torch.eye(size)]):
        reached, _ = final_norm_input(model, IDS)
    n = reached.reshape(-1, size).double()
    n = n / n.pow(2).mean(-1, keepdim=True).sqrt()
    top = torch.linalg.eigh(n.T @ n).eigenvectors[:, -8:].float()
    torch.testing.assert_close(top @ top.T, bases[-1] @ bases[-1].T, atol=1e-4, rtol=0)


def test_per_block_width_pays_the_shortcuts_out_of_the_budget(llama_folder):
    model = load_model(llama_folder).model.eval()
    size, layers, numbers = model.config.hidden_size, len(model.model.layers), stream_numbers(model)
    linear = sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    assert numbers * size == linear
    width = per_block_width(size, numbers, layers, 1.25)
    stored = lambda w: w * numbers + 2 * layers * w**2  # noqa: E731
    assert stored(width) <= linear / 1.25 < stored(width + 1)
    assert width < round(size / 1.25)


def test_the_probe_writes_dense_and_both_forms_at_each_ratio(llama_folder, tmp_path):
    out = tmp_path / "probe.md"
    run_script(
        "slicegpt_probe",
        "--model",
        llama_folder,
        "--ratios",
        "1.25",
        "2",
        "--windows",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(out),
    )
    text = out.read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "dense",
        "one rotation, 1.25",
        "per block, 1.25",
        "one rotation, 2.0",
        "per block, 2.0",
    ]
