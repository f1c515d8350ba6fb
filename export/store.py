"""Import an export into the BentoML model store as `tailorgpt-<name>:<version>`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import bentoml

from artifacts import (
    METRICS,
    PARITY,
    SERVED_FILES,
    ModelConfig,
    UserError,
    read_manifest,
)

MODEL_PREFIX = "tailorgpt-"
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9_.-]*[a-z0-9])?$")


def without_none(values: dict[str, Any]) -> dict[str, Any]:
    """BentoML metadata rejects None; a missing key says the same."""
    return {
        k: without_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None
    }


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise UserError(
            f"--name {name!r}: use lowercase letters, digits, '-', '_' or '.' (e.g. 'my-notes')"
        )


def import_to_store(export_dir: Path, name: str) -> str:
    """Copy the served files into a new store version; return its tag."""
    check_name(name)
    manifest = read_manifest(export_dir, "export")
    config = ModelConfig.read(export_dir)
    tokenizer = json.loads((export_dir / "tokenizer_config.json").read_text())
    metadata = {
        "base_model": manifest["base_model"],
        "context": config.n_positions,
        "eos_token_id": config.eos_token_id,
        "config": {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size")},
        "tokenizer": {k: tokenizer[k] for k in ("tokenizer_class", "eos_token") if k in tokenizer},
        "variants": manifest["variants"],
        "size_bytes": manifest["size_bytes"],
        "parity": json.loads((export_dir / PARITY).read_text()),
    }
    if (export_dir / METRICS).is_file():  # a checkpoint exported as it is has none
        metadata["training"] = without_none(json.loads((export_dir / METRICS).read_text()))
    with bentoml.models.create(
        MODEL_PREFIX + name, labels={"stage": "export"}, metadata=metadata
    ) as model:
        for file_name in SERVED_FILES:
            if (export_dir / file_name).is_file():
                shutil.copy(export_dir / file_name, Path(model.path) / file_name)
    return str(model.tag)
