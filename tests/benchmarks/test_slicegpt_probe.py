import torch
from slicegpt_probe import principal_directions, sliced_stream

from aecompress.models import load_model
from tests.benchmarks.conftest import run_script

IDS = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(0))


def final_norm_input(model, ids) -> torch.Tensor:
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
    basis = principal_directions(model, IDS)
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[0]), atol=1e-5, rtol=0)
    _, dense = final_norm_input(model, IDS)
    with sliced_stream(model, basis):
        _, whole = final_norm_input(model, IDS)
    torch.testing.assert_close(whole, dense, atol=1e-4, rtol=1e-4)
    kept = basis[:, :8]
    with sliced_stream(model, kept):
        stream, cut = final_norm_input(model, IDS)
    torch.testing.assert_close(stream @ kept @ kept.T, stream, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cut, dense, atol=1e-3)
    _, after = final_norm_input(model, IDS)  # the hooks are gone
    torch.testing.assert_close(after, dense)


def test_the_probe_writes_dense_and_each_width(llama_folder, tmp_path):
    out = tmp_path / "probe.md"
    run_script(
        "slicegpt_probe",
        "--model",
        llama_folder,
        "--widths",
        "16",
        "8",
        "--windows",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(out),
    )
    rows = [line for line in out.read_text().splitlines() if line.startswith("| d'")]
    assert [r.split("|")[2].strip() for r in rows] == ["16", "8"]
    assert "| dense |" in out.read_text()
