"""Convert a trained run to ONNX (optimum), quantize it (onnxruntime) and check parity."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoModelForCausalLM

from tailorgpt.artifacts import atomic_dir, read_manifest, write_json, write_manifest
from training.train import HELDOUT

TASK = "text-generation-with-past"
VARIANTS = {"fp32": "model.onnx", "int8": "model_int8.onnx"}


def quantize_int8(fp32: Path, int8: Path) -> None:
    """Dynamic int8 weights, activations quantized at run time: the CPU default.

    Quantizing the plain graph (before any ORT fusion) avoids the quantizer's failure on
    fused GPT-2 graphs.
    """
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)


def logits_of(model: Any, input_ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return np.asarray(out.logits, dtype=np.float64)


def perplexity(logits: np.ndarray, input_ids: np.ndarray) -> float:
    shifted = logits[:, :-1]
    targets = input_ids[:, 1:]
    log_norm = np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1))
    log_norm += shifted.max(-1)
    picked = np.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
    return math.exp(float((log_norm - picked).mean()))


def parity_report(run_dir: Path, export_dir: Path) -> dict[str, Any]:
    """ONNX fp32 and int8 against PyTorch on held-out blocks of the training run."""
    input_ids = torch.tensor(json.loads((run_dir / HELDOUT).read_text())["input_ids"])
    reference = logits_of(AutoModelForCausalLM.from_pretrained(run_dir).eval(), input_ids)
    report: dict[str, Any] = {
        "heldout_tokens": int(input_ids.numel()),
        "pytorch": {"perplexity": perplexity(reference, input_ids.numpy())},
    }
    for variant, file_name in VARIANTS.items():
        model = ORTModelForCausalLM.from_pretrained(export_dir, file_name=file_name)
        logits = logits_of(model, input_ids)
        report[variant] = {
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "perplexity": perplexity(logits, input_ids.numpy()),
            "greedy_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        }
    return report


def export(run_dir: Path, output: Path) -> dict[str, Any]:
    """Write EXPORT_DIR: model.onnx, model_int8.onnx, tokenizer, config, parity.json."""
    train_manifest = read_manifest(run_dir, "train")
    with atomic_dir(output) as work:
        main_export(str(run_dir), output=work, task=TASK, local_files_only=True)
        quantize_int8(work / VARIANTS["fp32"], work / VARIANTS["int8"])
        parity = parity_report(run_dir, work)
        write_json(work / "parity.json", parity)
        shutil.copy(run_dir / "metrics.json", work / "metrics.json")
        sizes = {v: (work / f).stat().st_size for v, f in VARIANTS.items()}
        write_manifest(
            work, "export", {"run_dir": str(run_dir)}, task=TASK, variants=VARIANTS,
            size_bytes=sizes, base_model=train_manifest["args"]["base_model"],
        )
    return parity
