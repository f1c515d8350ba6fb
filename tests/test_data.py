"""Reading the user's text: every supported format, and a clear error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailorgpt.artifacts import UserError
from training.data import read_documents


def test_reads_every_format_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# 标题\n中文内容", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "second"}) + "\n",
        encoding="utf-8",
    )
    (tmp_path / "d.csv").write_text('id,text\n1,"from, csv"\n2,\n', encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert read_documents(tmp_path) == [
        "plain text",
        "# 标题\n中文内容",
        "from jsonl",
        "second",
        "from, csv",
    ]


def test_utf8_with_bom_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode())
    assert read_documents(path) == ["hello"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "holds no text"),
        ("gbk.txt", "中文文本".encode("gbk"), "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{broken\n', "bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", b'{"body": "x"}\n', "no string field 'text'"),
        ("nocolumn.csv", b"id,body\n1,x\n", "no 'text' column"),
    ],
)
def test_bad_file_names_the_path_and_the_fix(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        read_documents(path)
    assert str(path) in str(err.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or folder"):
        read_documents(tmp_path / "nope")


def test_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match=r"no \.txt, \.md, \.jsonl, \.csv files"):
        read_documents(tmp_path)


def test_folder_of_empty_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(UserError, match="no readable text"):
        read_documents(tmp_path)
