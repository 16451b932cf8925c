import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

import aecompress
from aecompress.artifact import MANIFEST, WEIGHTS, read_manifest
from aecompress.errors import AecompressError
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("grouping", ["none", "layers"])
def test_round_trip_gives_identical_logits(arch, grouping, tokenizer, tmp_path, input_ids):
    model = tiny_model(arch)
    cm = aecompress.compress(
        model,
        method="svd",
        ratio=2.5,
        targets=FAMILIES[arch],
        group=grouping,
        tokenizer=tokenizer,
        progress=False,
    )
    expected = cm.model(input_ids=input_ids).logits
    cm.save_pretrained(str(tmp_path / "art"))
    loaded = aecompress.load(tmp_path / "art")
    assert torch.equal(loaded(input_ids=input_ids).logits, expected)
    decoded = aecompress.load(tmp_path / "art", decode=True)
    torch.testing.assert_close(decoded(input_ids=input_ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_manifest_ratios_match_the_stored_tensors(tmp_path):
    cm = aecompress.compress(
        tiny_model("llama"), method="svd", ratio=2, targets=["embed", "down"], progress=False
    )
    cm.save_pretrained(str(tmp_path / "art"))
    manifest = read_manifest(tmp_path / "art")
    with safe_open(str(tmp_path / "art" / WEIGHTS), framework="pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118
    for group in manifest["groups"]:
        prefix = f"aecompress.{group['name']}."
        stored = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith(prefix))
        members = len(group["members"])
        assert stored == group["stored_params"]
        assert group["ratio"] == pytest.approx(
            members * group["shape"][0] * group["shape"][1] / stored
        )
    assert manifest["tied_output"] == "lm_head"
    assert "lm_head.weight" not in shapes and "model.embed_tokens.weight" not in shapes
    assert manifest["totals"]["model_params_artifact"] == sum(
        torch.Size(s).numel() for s in shapes.values()
    )


def test_truncated_or_foreign_artifacts_fail_clearly(tmp_path):
    cm = aecompress.compress(
        tiny_model("bert"), method="svd", ratio=2, targets=["k"], progress=False
    )
    cm.save_pretrained(str(tmp_path / "art"))
    weights = tmp_path / "art" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AecompressError, match="truncated"):
        aecompress.load(tmp_path / "art")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(tmp_path / "foreign")


def test_writes_are_atomic_and_never_clobber_foreign_folders(tmp_path, monkeypatch):
    cm = aecompress.compress(
        tiny_model("bert"), method="svd", ratio=2, targets=["k"], progress=False
    )
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        cm.save_pretrained(str(tmp_path / "keep"))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("aecompress.artifact.write_safetensors", crash)
    with pytest.raises(OSError):
        cm.save_pretrained(str(tmp_path / "art"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_overwriting_an_artifact_replaces_it(tmp_path, input_ids):
    for ratio in (2, 4):
        cm = aecompress.compress(
            tiny_model("bert"), method="svd", ratio=ratio, targets=["k"], progress=False
        )
        cm.save_pretrained(str(tmp_path / "art"))
    assert read_manifest(tmp_path / "art")["recipe"]["ratio"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.fixture
def artifact(tmp_path):
    cm = aecompress.compress(
        tiny_model("bert"), method="svd", ratio=2, targets=["k"], progress=False
    )
    cm.save_pretrained(str(tmp_path / "art"))
    return tmp_path / "art"


def edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("groups"), "groups"),
        (lambda m: m.update(format_version="2"), "format_version"),
        (lambda m: m.update(auto_class="AutoModelForSpeechSeq2Seq"), "auto_class"),
        (lambda m: m["weights_file"].update(name="../elsewhere.safetensors"), "file name"),
        (lambda m: m.update(colour="red"), "colour"),
        (lambda m: m["groups"][0]["members"][0].update(path="no.such.module"), "not a 'k' matrix"),
        (lambda m: m["groups"][0]["members"][0].update(kind="embedding"), "not a 'k' matrix"),
        (lambda m: m["groups"][0]["members"][0].update(layer=1), "not a 'k' matrix"),
        (lambda m: m["groups"][0].update(family="q"), "not a 'q' matrix"),
        (lambda m: m["groups"][0].update(width=99), "width 99 is not what it stores"),
        (lambda m: m["groups"][0].update(width=[2, 2]), "is not what it stores"),
        (lambda m: m.update(storage_dtype="float16"), "holds float32 tensors"),
        (lambda m: m.update(tied_output="bert.encoder"), "not the output head"),
        (lambda m: m["files"].append("vocab.json"), "vocab.json, a file of the artifact"),
        (lambda m: m["files"].append("/etc/passwd"), "'/etc/passwd' is not a path inside"),
        (lambda m: m["files"].append("../art/config.json"), "is not a path inside"),
        (lambda m: m["files"].append("1_Pooling//x"), "is not a path inside"),
        (lambda m: m["recipe"].update(targets=[None]), "recipe.targets.0"),
        (lambda m: m["groups"][0].update(ratio=99.0), "ratio is wrong"),
        (lambda m: m["groups"][0].update(stored_params=1), "counts are wrong"),
        (lambda m: m["groups"][0]["tensors"].update({"0.a": [1, 1]}), "tensors do not match"),
    ],
)
def test_a_forged_or_damaged_manifest_is_one_clear_error(artifact, change, message):
    from aecompress.summary import describe_artifact

    edit_manifest(artifact, change)
    with pytest.raises(AecompressError, match=message):
        aecompress.load(artifact)
    with pytest.raises(AecompressError, match=message):
        describe_artifact(artifact)


def test_a_manifest_that_is_a_list_or_missing_weights_is_refused(artifact):
    from aecompress.summary import describe_artifact

    (artifact / WEIGHTS).unlink()
    with pytest.raises(AecompressError, match="missing"):
        describe_artifact(artifact)
    (artifact / MANIFEST).write_text("[1, 2]")
    with pytest.raises(AecompressError, match="not an aecompress artifact"):
        aecompress.load(artifact)


def test_overwriting_refuses_a_folder_with_foreign_files_and_cleans_leftovers(artifact, tmp_path):
    cm = aecompress.compress(
        tiny_model("bert"), method="svd", ratio=3, targets=["k"], progress=False
    )
    (artifact / "notes.txt").write_text("mine")
    with pytest.raises(AecompressError, match=r"notes\.txt"):
        cm.save_pretrained(str(artifact))
    (artifact / "notes.txt").unlink()
    stale = [tmp_path / ".art.tmp-999999999-x", tmp_path / ".art.old-999999999"]
    for folder in stale:
        folder.mkdir()
    cm.save_pretrained(str(artifact))
    assert not any(folder.exists() for folder in stale)
    assert read_manifest(artifact)["recipe"]["ratio"] == 3


@pytest.fixture
def sentence_artifact(tmp_path):
    """An artifact of a sentence encoder: its pooling set-up in a subfolder."""
    tiny_model("bert-encoder").save_pretrained(tmp_path / "encoder")
    (tmp_path / "encoder" / "modules.json").write_text("[]")
    (tmp_path / "encoder" / "1_Pooling").mkdir()
    (tmp_path / "encoder" / "1_Pooling" / "config.json").write_text("{}")
    cm = aecompress.compress(str(tmp_path / "encoder"), ratio=2, targets=["k"], progress=False)
    cm.save_pretrained(tmp_path / "art")
    return cm, tmp_path / "art"


def test_files_in_an_artifacts_subfolders_are_its_own_or_kept(sentence_artifact):
    cm, art = sentence_artifact
    assert "1_Pooling/config.json" in read_manifest(art)["files"]
    cm.save_pretrained(art)  # its own files: replaced
    (art / "1_Pooling" / "notes.txt").write_text("mine")
    with pytest.raises(AecompressError, match=r"not part of its artifact \(1_Pooling/notes\.txt"):
        cm.save_pretrained(art)
    assert (art / "1_Pooling" / "notes.txt").read_text() == "mine"


def test_a_folder_linked_out_of_an_artifact_is_refused(sentence_artifact, tmp_path):
    _, art = sentence_artifact
    (tmp_path / "elsewhere").mkdir()
    for name in ("config.json", "secret.txt"):
        (tmp_path / "elsewhere" / name).write_text("{}")
    shutil.rmtree(art / "1_Pooling")
    (art / "1_Pooling").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(AecompressError, match="1_Pooling is a link out of the folder"):
        aecompress.export_dense(art, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_values_beyond_the_storage_dtype_are_not_saved(tmp_path):
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.key.weight[0, 0] = 1e6  # > float16's max
    cm = aecompress.compress(
        model, method="svd", ratio=2, targets=["k"], storage_dtype="float16", progress=False
    )
    with pytest.raises(AecompressError, match="NaN or infinite values in float16"):
        cm.save_pretrained(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


# A fresh interpreter in which importing aecompress fails: prints the exported model's logits.
PLAIN_LOAD = """
import sys
sys.modules["aecompress"] = None
import torch, transformers
model = getattr(transformers, sys.argv[2]).from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
print(model(input_ids=ids).logits.flatten().tolist())
"""


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_export_dense_loads_with_plain_transformers(arch, tokenizer, tmp_path):
    targets = FAMILIES[arch]  # embed included: a tied head must follow the decoded embedding
    cm = aecompress.compress(
        tiny_model(arch),
        method="svd",
        ratio=2.5,
        targets=targets,
        tokenizer=tokenizer,
        progress=False,
    )
    cm.save_pretrained(tmp_path / "art")
    aecompress.export_dense(tmp_path / "art", tmp_path / "plain")
    files = {p.name for p in (tmp_path / "plain").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and MANIFEST not in files
    assert "aecompress" not in (tmp_path / "plain" / "config.json").read_text()
    auto = read_manifest(tmp_path / "art")["auto_class"]
    plain = getattr(transformers, auto).from_pretrained(tmp_path / "plain").eval()
    decoded = aecompress.load(tmp_path / "art", decode=True)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    expected = decoded(input_ids=ids).logits
    # the same weights through other kernels (GPT-2's Conv1D is an addmm of the transposed
    # weight, the decoded model a Linear): equal up to float32 rounding, which differs
    # between CPUs; a wrong or missing weight moves the logits by orders of magnitude more
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    head, embed = plain.get_output_embeddings(), plain.get_input_embeddings()
    assert torch.equal(head.weight, embed.weight)
    assert torch.equal(embed.weight, decoded.get_input_embeddings().weight)
    if arch == "llama":  # and without aecompress importable at all
        script = [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "plain"), auto]
        printed = subprocess.run(script, capture_output=True, text=True, check=True).stdout
        torch.testing.assert_close(torch.tensor(json.loads(printed)), expected.flatten())


def test_export_dense_refuses_a_folder_with_content(tmp_path):
    cm = aecompress.compress(
        tiny_model("llama"), method="svd", ratio=2, targets=["down"], progress=False
    )
    cm.save_pretrained(tmp_path / "art")
    with pytest.raises(AecompressError, match="exists and is not an empty folder"):
        aecompress.export_dense(tmp_path / "art", tmp_path / "art")


def test_tie_weights_leaves_a_head_served_from_the_embeddings_factors(tmp_path):
    cm = aecompress.compress(
        tiny_model("llama"), method="svd", ratio=2, targets=["embed"], progress=False
    )
    cm.save_pretrained(tmp_path / "art")
    model = aecompress.load(tmp_path / "art")
    ids = torch.tensor([[5, 17, 42]])
    expected = model(input_ids=ids).logits
    model.tie_weights()  # lm-eval's HFLM and other tools call it
    assert torch.equal(model(input_ids=ids).logits, expected)
