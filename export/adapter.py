"""Export a run's LoRA adapter unmerged, to serve over its base (`serve --lora_modules`).

No graphs and no parity: the server adds the adapter's updates beside the base export's own
graphs (its LoRA twins), so the export is peft's two files and a manifest naming the base
they were trained on. Plain json and shutil: no torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG,
    METRICS,
    UserError,
    atomic_dir,
    read_manifest,
    tokenizer_fingerprint,
    write_manifest,
)
from training.arguments import ADAPTER_DIR


def export_adapter(run_dir: Path, output: Path) -> dict[str, Any]:
    """Write OUTPUT from RUN_DIR/adapter: peft's files and the manifest (kind "adapter");
    return the manifest."""
    run_dir = Path(run_dir)
    read_manifest(run_dir, "train")  # another stage's output, or none: says which
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"{run_dir}: the run kept no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_CONFIG}): "
            "train with --lora --save_adapter to keep one"
        )
    metrics = json.loads((run_dir / METRICS).read_text())
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    manifest = {
        "base_model": base_model(run_dir, metrics),
        "base_fingerprint": metrics["base_fingerprint"],
        "tokenizer_fingerprint": tokenizer_fingerprint(run_dir),
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "target_modules": sorted(config["target_modules"]),
    }
    with atomic_dir(output) as work:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy(adapter / name, work / name)
        write_manifest(work, "adapter", {"run_dir": str(run_dir)}, **manifest)
    return read_manifest(output, "adapter")


def base_model(run_dir: Path, metrics: dict[str, Any]) -> str:
    """The base the run was trained on; `tiny`, built inside the run, is kept there with its
    adapter (RUN_DIR/base), the directory to export and serve it from."""
    built = run_dir / "base"
    return str(built.resolve()) if (built / CONFIG).is_file() else metrics["base_model"]
