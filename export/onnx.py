"""Convert a trained run to ONNX (optimum), quantize it (onnxruntime) and check parity."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoModelForCausalLM

from tailorgpt.artifacts import atomic_dir, read_manifest, write_json, write_manifest
from training.train import HELDOUT

TASK = "text-generation-with-past"
VARIANTS = {"fp32": "model.onnx", "int8": "model_int8.onnx"}


def gemm_to_matmul(model: onnx.ModelProto) -> None:
    """Rewrite Gemm(x, W, b) as MatMul(x, W) + b, in place.

    GPT-2's Conv1D layers export as plain Gemm, and onnxruntime's weight-only quantizer
    takes only MatMul; no library pass does this rewrite for an unfused graph.
    """
    weights = {init.name for init in model.graph.initializer}
    default = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = all(default.get(name) == value for name, value in attrs.items())
        with_weight = len(node.input) == 3 and node.input[1] in weights
        if node.op_type != "Gemm" or not plain or not with_weight:
            nodes.append(node)
            continue
        product = node.output[0] + "/matmul"
        nodes.append(helper.make_node("MatMul", node.input[:2], [product], name=node.name + "/mm"))
        nodes.append(helper.make_node("Add", [product, node.input[2]], node.output, name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def untie_output_projection(model: onnx.ModelProto) -> None:
    """Give a MatMul fed by Transpose(initializer) its own transposed initializer, in place.

    The exporter shares GPT-2's tied embedding with the output projection through a
    Transpose node, and the quantizer only takes constant MatMul weights: untied, the
    largest matrix of the model (vocabulary x width) is quantized too.
    """
    weights = {init.name: init for init in model.graph.initializer}
    transposes = {
        node.output[0]: node
        for node in model.graph.node
        if node.op_type == "Transpose" and node.input[0] in weights
    }
    consumers = [name for node in model.graph.node for name in node.input]
    targets = [
        node
        for node in model.graph.node
        if node.op_type == "MatMul"
        and consumers.count(node.input[1]) == 1
        and node.input[1] in transposes
    ]
    for node in targets:  # collected first: the loop below edits the node list
        transpose = transposes[node.input[1]]
        array = numpy_helper.to_array(weights[transpose.input[0]]).T.copy()
        model.graph.initializer.append(numpy_helper.from_array(array, node.input[1]))
        model.graph.node.remove(transpose)


def quantize_int8(fp32: Path, int8: Path) -> None:
    """8-bit weights in blocks of 32, int8 arithmetic (MatMulNBits, accuracy level 4).

    Chosen by measurement over per-tensor dynamic quantization (quantize_dynamic): on a
    2-core CPU it decodes GPT-2 124M about 2x faster, and because activations are quantized
    per row and block rather than per tensor, a prompt's output does not depend on what
    else is in its batch. See BENCHMARKS.md.
    """
    model = onnx.load(fp32)
    gemm_to_matmul(model)
    untie_output_projection(model)
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4
    )
    # The quantizer logs a line per graph node at INFO; keep the user's terminal readable.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer.process()
    quantized = quantizer.model.model
    # Protobuf stops at 2 GB: big models keep their weights in a side file (gpt2-xl).
    external = sum(init.ByteSize() for init in quantized.graph.initializer) > 1_500_000_000
    onnx.save_model(
        quantized,
        int8,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=int8.name + "_data",
    )


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
            work,
            "export",
            {"run_dir": str(run_dir)},
            task=TASK,
            variants=VARIANTS,
            size_bytes=sizes,
            base_model=train_manifest["args"]["base_model"],
        )
    return parity
