"""The on-disk contract between the stages: what a run and an export directory hold.

training, export, service and the CLI all import this module; it imports none of them (an
import-linter contract in pyproject.toml keeps it so). Each stage writes a directory with a
small JSON manifest. It is built under a temporary sibling path and renamed into place only
when complete, so a crash never leaves a half-written directory that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CONFIG = "config.json"  # Hugging Face's model config, read through ModelConfig

# A training run (`tailorgpt train --output_dir`).
METRICS = "metrics.json"
HELDOUT = "heldout.json"  # held-out blocks of token ids: export measures parity on them
HELDOUT_BLOCKS = 16
# What an export copies from a run besides the graph; checkpoints and PyTorch weights stay.
RUN_FILES = (
    CONFIG,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    METRICS,
)

# An export (`tailorgpt export --output_dir`): one ONNX graph per variant, and for the CPU
# variants one more that keeps keys and values in int8 (`graph_name`); the two graphs of a
# variant share one weights file (model.onnx_data, model_int8.onnx_data).
KV_CACHE_DTYPES = ("fp32", "int8")
VARIANT_FILES = {
    "fp32": "model.onnx",
    "int8": "model_int8.onnx",
    "fp16": "model_fp16.onnx",
    "fp32_kv_int8": "model_kv_int8.onnx",
    "int8_kv_int8": "model_int8_kv_int8.onnx",
}
PARITY = "parity.json"  # each variant against PyTorch on held-out text
# A LoRA adapter (`tailorgpt train --lora --save_adapter`, then `tailorgpt export --adapter`,
# or any peft GPT-2 LoRA directory): peft's two files, and for tailorgpt's own a manifest
# (kind "adapter") naming the base it was trained on: `base_fingerprint` (the base export's
# `weights_fingerprint`), `tokenizer_fingerprint`, `base_model`, `r`, `lora_alpha`.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Each export's graphs again with per-row LoRA updates beside every projection
# (export.graph.with_lora): the server runs them only for steps that hold an adapter's row.
LORA_SUFFIX = "_lora"
# The projections of each block an adapter may target, by their GPT-2 names (peft's
# "c_proj" targets both the attention's output projection and the MLP's).
LORA_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PARITY_SAMPLE = "parity_sample.json"  # a few held-out tokens, each variant's loss on them


# What the serving engine reads: the files an import copies into the model store.
def lora_file(graph_file: str) -> str:
    """The file of a graph's LoRA twin: model_int8.onnx -> model_int8_lora.onnx."""
    return graph_file.removesuffix(".onnx") + LORA_SUFFIX + ".onnx"


SERVED_FILES = (
    *(f"{name}{data}" for name in VARIANT_FILES.values() for data in ("", "_data")),
    *(lora_file(name) for name in VARIANT_FILES.values()),
    *RUN_FILES,
    PARITY,
    PARITY_SAMPLE,
    MANIFEST,
)


def graph_name(variant: str, kv_cache_dtype: str) -> str:
    """The VARIANT_FILES key of a variant whose cache keeps `kv_cache_dtype`."""
    return variant if kv_cache_dtype == "fp32" else f"{variant}_kv_{kv_cache_dtype}"


def tokenizer_fingerprint(directory: Path) -> str | None:
    """What identifies a tokenizer: a digest of tokenizer.json's model (vocabulary and
    merges); None when the directory has no tokenizer.json."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    canonical = json.dumps(model, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


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


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a GPT-2 config.json that the stages after training read."""

    model_type: str
    n_positions: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    eos_token_id: int

    @classmethod
    def read(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / CONFIG
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{model_dir}: no {CONFIG}: pass a model or export directory") from None
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot read the model config ({err})") from None
        if config.get("model_type") != "gpt2":
            raise UserError(f"{path}: a {config.get('model_type')!r} model, not GPT-2")
        try:
            return cls(
                "gpt2", *(int(config[f.name]) for f in fields(cls) if f.name != "model_type")
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: a GPT-2 config needs {err} as a number") from None
