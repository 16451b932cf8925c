import json

import pytest

from aecompress.data import local_text
from aecompress.errors import AecompressError


def test_a_text_file_is_read_whole(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    assert local_text(tmp_path / "a.txt") == "one\ntwo\n"


def test_jsonl_parquet_and_datasets_folders_give_their_text_field(tmp_path):
    records = [{"text": "first", "id": 1}, {"text": "second", "id": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert local_text(tmp_path / "a.jsonl") == "first\n\nsecond"
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "a.parquet"))
    assert local_text(tmp_path / "a.parquet") == "first\n\nsecond"
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dict"))
    table.save_to_disk(str(tmp_path / "plain"))
    assert local_text(tmp_path / "dict") == local_text(tmp_path / "plain") == "first\n\nsecond"


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("a.jsonl", '{"text": "x"}\n{"body": "y"}\n', "line 2 has no string field 'text'"),
        ("a.jsonl", "{not json\n", "line 1 is not JSON"),
        ("a.txt", b"\xff\xfe\xff", "cannot read text file"),
    ],
)
def test_unreadable_text_is_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AecompressError, match=message):
        local_text(path)


def test_a_table_without_a_text_column_names_its_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"body": "x"}]).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(AecompressError, match=r"no 'text' column \(columns: body\)"):
        local_text(tmp_path / "a.parquet")
    with pytest.raises(AecompressError, match="no such text file or dataset folder"):
        local_text(tmp_path / "none.txt")
