"""The artifact contract shared by every stage.

Each stage writes a directory with a small JSON manifest. It is built under a temporary
sibling path and renamed into place only when complete, so a crash never leaves a
half-written directory that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


@contextmanager
def atomic_dir(
    output: Path, *, keep_on_failure: Callable[[Path], bool] | None = None, reuse: bool = False
) -> Iterator[Path]:
    """Yield a work directory that becomes `output` only if the block completes.

    keep_on_failure(work) decides whether a failed block leaves its work behind (training
    keeps it when it holds a checkpoint); reuse continues in the one an earlier run left.
    """
    output = Path(output)
    if output.exists():
        raise UserError(f"{output} already exists: choose another --output_dir or remove it")
    work = partial_path(output)
    if work.exists() and not reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        if keep_on_failure is None or not keep_on_failure(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    os.replace(work, output)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(directory: Path, kind: str, inputs: dict[str, Any], **fields: Any) -> None:
    write_json(directory / MANIFEST, {"kind": kind, "inputs": inputs, **fields})


def read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{directory} is not a tailorgpt {kind} directory (no {MANIFEST}): "
            f"pass the --output_dir of 'tailorgpt {kind}'"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("kind") != kind:
        raise UserError(
            f"{directory} holds a '{manifest.get('kind')}' artifact, not '{kind}': "
            f"pass the --output_dir of 'tailorgpt {kind}'"
        )
    return manifest
