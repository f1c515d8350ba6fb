"""Read training text: a `tailorgpt prepare` dataset, or a file or folder of UTF-8 text."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from tailorgpt.artifacts import MANIFEST, UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".csv")


def find_files(data: Path) -> list[Path]:
    if not data.exists():
        raise UserError(f"{data}: no such file or folder: pass --data a text file or a folder")
    if data.is_file():
        return [data]
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(
            f"{data}: no {', '.join(SUFFIXES)} files in this folder: add some text files"
        )
    return files


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 (byte {err.start}): convert it, e.g. "
            f"'iconv -f GBK -t UTF-8 {path} > fixed.txt', or remove it from the folder"
        ) from None


def _jsonl_documents(path: Path, text: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg}): fix the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number}: no string field 'text': each line needs one")
        yield record["text"]


def _csv_documents(path: Path, text: str) -> Iterator[str]:
    reader = csv.DictReader(text.splitlines())
    if "text" not in (reader.fieldnames or []):
        raise UserError(f"{path}: no 'text' column (columns: {reader.fieldnames}): add one")
    for row in reader:
        yield row["text"] or ""


def read_documents(data: Path) -> list[str]:
    """Every non-empty document under `data`; a .txt or .md file is one document."""
    data = Path(data)
    documents: list[str] = []
    for path in find_files(data):
        text = read_text(path)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            found = list(_jsonl_documents(path, text))
        elif suffix == ".csv":
            found = list(_csv_documents(path, text))
        else:
            found = [text]
        found = [doc.strip() for doc in found if doc.strip()]
        if not found and data.is_file():
            raise UserError(f"{path}: the file holds no text: pass a file with some text in it")
        documents.extend(found)
    if not documents:
        raise UserError(f"{data}: no readable text in these files: add text to them")
    return documents


def read_prepared(data: Path) -> tuple[list[str], list[str]] | None:
    """The (train, validation) documents of a `tailorgpt prepare` output, else None."""
    data = Path(data)
    manifest = data / MANIFEST
    if not (data.is_dir() and manifest.is_file()):
        return None
    if json.loads(manifest.read_text(encoding="utf-8")).get("kind") != "prepare":
        return None
    splits = []
    for name in ("train.jsonl", "validation.jsonl"):
        documents = list(_jsonl_documents(data / name, read_text(data / name)))
        if not documents:
            raise UserError(
                f"{data / name}: the prepared split is empty: prepare more text or change "
                "--validation_split_percentage in 'tailorgpt prepare'"
            )
        splits.append(documents)
    return splits[0], splits[1]
