"""One reader: `train --data` reads a folder as `prepare` does, and tokenizes it once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import CORPUS, ZH, kept_texts, run_cli, train_args
from transformers import AutoTokenizer

from artifacts import UserError
from training.data import cached_blocks, pack_blocks
from training.model import build_tiny
from training.prepare import PrepareArgs, prepare, read_documents, read_prepared

CACHE_USED = "tokenized data: from the cache in "


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """What `prepare` reads and the old strict UTF-8 reader refused or skipped."""
    data = tmp_path / "messy"
    data.mkdir()
    (data / "gb18030.txt").write_bytes((ZH * 3).encode("gb18030"))
    (data / "utf16.md").write_bytes(("# UTF-16\n\n" + ZH[::-1]).encode("utf-16"))
    chat = [{"role": "user", "content": "How do I start?"}, {"role": "assistant", "content": ZH}]
    (data / "chat-export.json").write_text(json.dumps([{"messages": chat}]))
    (data / "copy.txt").write_bytes((ZH * 3).encode("utf-8"))  # a duplicate, dropped
    (data / "short.txt").write_text("too short")
    return data


def test_train_reads_a_folder_as_prepare_keeps_it(messy: Path, tmp_path: Path) -> None:
    prepare(PrepareArgs(inputs=[messy], output_dir=tmp_path / "out", validation_split_percentage=0))
    assert read_documents([messy]) == kept_texts(tmp_path / "out")
    assert len(kept_texts(tmp_path / "out")) == 3


def test_a_prepared_folder_is_read_with_its_split(messy: Path, tmp_path: Path) -> None:
    prepare(
        PrepareArgs(inputs=[messy], output_dir=tmp_path / "out", validation_split_percentage=50)
    )
    train, validation = read_prepared(tmp_path / "out")
    assert sorted(train + validation) == sorted(read_documents([messy]))
    assert read_prepared(messy) is None


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file or folder"),
        ("no_text_files", "no .txt/.md/.html/.htm/.jsonl/.json/.csv files found"),
        ("all_short", "no document kept from 1 file(s) (dropped: too_short 1)"),
    ],
)
def test_nothing_to_read_names_the_data(tmp_path: Path, case: str, message: str) -> None:
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "no_text_files":
        (data / "image.png").write_bytes(b"\x89PNG")
    if case == "all_short":
        (data / "a.txt").write_text("  hi \n")
    with pytest.raises(UserError) as err:
        read_documents([data])
    assert str(err.value).startswith(str(data)) and message in str(err.value)


@pytest.mark.model  # trains
def test_train_reads_the_messy_folder_and_tokenizes_it_once(messy: Path, tmp_path: Path) -> None:
    # The corpus too: the messy files alone make too few blocks to train on.
    for path in CORPUS.iterdir():
        (messy / path.name).write_bytes(path.read_bytes())
    env = {"TAILORGPT_CACHE": str(tmp_path / "cache")}

    def train(name: str) -> str:
        args = train_args(tmp_path / name, "--block_size", "32", "--max_steps", "1", data=messy)
        return run_cli(*args, env=env).stdout

    first = train("first")
    assert "tokenized data: cached for the next run in " in first and CACHE_USED not in first
    documents = json.loads((tmp_path / "first" / "metrics.json").read_text())["documents"]
    assert documents == len(read_documents([messy]))
    assert CACHE_USED in train("again")


def test_the_cache_holds_the_blocks_of_these_texts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAILORGPT_CACHE", str(tmp_path / "cache"))
    documents = read_documents([CORPUS])
    tokenizer = AutoTokenizer.from_pretrained(build_tiny(documents, tmp_path / "tiny", seed=0))
    blocks = pack_blocks(documents, tokenizer, 32)
    assert cached_blocks(documents, tokenizer, 32) == (blocks, False)
    assert cached_blocks(documents, tokenizer, 32) == (blocks, True)
    edited = [documents[0] + " One more line.", *documents[1:]]
    assert not cached_blocks(edited, tokenizer, 32)[1]
    assert not cached_blocks(documents, tokenizer, 64)[1]
    assert not cached_blocks([*documents[:-1], "", documents[-1]], tokenizer, 32)[1]
    assert not list((tmp_path / "cache").rglob("*.tmp"))
