"""Convert a trained run to the serving graph, quantize it (onnxruntime) and check parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from transformers import AutoModelForCausalLM

from export.graph import INT8_SCHEME, build
from service.numerics import PARITY_SAMPLE, cpu_flags, decode_logits, nll, perplexity
from service.runner import VARIANT_FILES, ModelRunner
from tailorgpt.artifacts import atomic_dir, read_manifest, write_json, write_manifest
from training.train import HELDOUT

TASK = "text-generation-shared-kv"
# What serving needs besides the graph; checkpoints and PyTorch weights stay behind.
RUN_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "metrics.json",
)
PARITY_TOKENS = 128  # per held-out block: enough to cover the cache, quick on GPT-2 sizes
SAMPLE_BLOCKS, SAMPLE_TOKENS = 2, 32  # what a server re-checks at start on another CPU


def save(model: onnx.ModelProto, path: Path) -> None:
    # Protobuf stops at 2 GB: big models keep their weights in a side file (gpt2-xl).
    external = sum(init.ByteSize() for init in model.graph.initializer) > 1_500_000_000
    onnx.save_model(
        model,
        path,
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + "_data",
    )


def parity_report(run_dir: Path, export_dir: Path, variants: list[str]) -> dict[str, Any]:
    """Each variant against PyTorch on held-out blocks, decoded token by token through the cache.

    Every logit compared comes from the engine's own decode path (KV cache, IOBinding), so
    the check covers what serving runs, not just the graph. The CPU's flags are recorded (int8
    kernels depend on them), and the first blocks' losses go to PARITY_SAMPLE so that a server
    on another CPU can re-check them (service.numerics.recheck).
    """
    blocks = np.array(json.loads((run_dir / HELDOUT).read_text())["input_ids"])[:, :PARITY_TOKENS]
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    with torch.no_grad():
        reference = model(torch.from_numpy(blocks)).logits.float().numpy()[:, :-1]
    tokens = blocks.size - len(blocks)  # the last token of a block has nothing to predict
    sample = blocks[:SAMPLE_BLOCKS, : SAMPLE_TOKENS + 1]
    report: dict[str, Any] = {"heldout_tokens": tokens, "cpu_flags": cpu_flags()}
    report["pytorch"] = {"perplexity": perplexity(nll(reference, blocks), tokens)}
    sample_nll = {}
    for variant in variants:
        logits = decode_logits(ModelRunner(export_dir, variant, slots=len(blocks)), blocks)
        report[variant] = {
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "perplexity": perplexity(nll(logits, blocks), tokens),
            "greedy_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        }
        sample_nll[variant] = nll(logits[:SAMPLE_BLOCKS, :SAMPLE_TOKENS], sample)
    if "int8" in report:
        report["int8"]["scheme"] = INT8_SCHEME
    write_json(export_dir / PARITY_SAMPLE, {"input_ids": sample.tolist(), "nll": sample_nll})
    return report


def export(run_dir: Path, output: Path, fp16: bool = False) -> dict[str, Any]:
    """Write EXPORT_DIR: model.onnx, model_int8.onnx (and model_fp16.onnx for GPUs), the
    tokenizer and config, parity.json."""
    train_manifest = read_manifest(run_dir, "train")
    variants = {"fp32": VARIANT_FILES["fp32"], "int8": VARIANT_FILES["int8"]}
    with atomic_dir(output) as work:
        model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
        save(build(model), work / variants["fp32"])
        save(build(model, int8=True), work / variants["int8"])
        if fp16:  # for CUDA, whose GroupQueryAttention takes half precision only
            variants["fp16"] = VARIANT_FILES["fp16"]
            save(build(model, "float16"), work / variants["fp16"])
        del model
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, work / name)
        parity = parity_report(run_dir, work, list(variants))
        write_json(work / "parity.json", parity)
        sizes = {v: (work / f).stat().st_size for v, f in variants.items()}
        write_manifest(
            work,
            "export",
            {"run_dir": str(run_dir)},
            task=TASK,
            variants=variants,
            size_bytes=sizes,
            base_model=train_manifest["args"]["base_model"],
        )
    return parity
