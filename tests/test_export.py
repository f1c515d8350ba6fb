"""ONNX export, int8 quantization, parity and the BentoML store import."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
import onnx
from conftest import MODEL_NAME, run_cli
from test_train import assert_clean_failure

from export.graph import INT8_SCHEME
from service.numerics import cpu_flags


def test_export_writes_both_variants_and_a_manifest(export_dir: Path) -> None:
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["kind"] == "export" and manifest["task"] == "text-generation-shared-kv"
    fp32, int8 = (export_dir / "model.onnx"), (export_dir / "model_int8.onnx")
    assert fp32.is_file() and int8.is_file()
    assert int8.stat().st_size < fp32.stat().st_size
    assert manifest["size_bytes"] == {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}


def test_int8_quantizes_every_projection_including_the_tied_output(export_dir: Path) -> None:
    graph = onnx.load(export_dir / "model_int8.onnx").graph
    quantized = [n.name for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(quantized) == 2 * 4 + 1  # 2 layers x (qkv, attention out, MLP in, MLP out) + lm_head
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm", "DynamicQuantizeLinear")]
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2  # fused, with the KV cache shared between past and present


def test_parity_against_pytorch(export_dir: Path) -> None:
    """The README's figures: fp32 logits within 1e-5 of PyTorch's; int8 perplexity within
    0.05% and 98% of greedy next tokens the same, on every CPU kind (test_int8.py)."""
    parity = json.loads((export_dir / "parity.json").read_text())
    cpu = f"measured on a CPU with {parity['cpu_flags']}"
    assert parity["heldout_tokens"] > 500
    assert parity["cpu_flags"] == cpu_flags()
    pytorch = parity["pytorch"]["perplexity"]
    assert parity["fp32"]["max_abs_logit_diff"] < 1e-5, cpu
    assert parity["fp32"]["greedy_agreement"] == 1.0, cpu
    assert abs(parity["fp32"]["perplexity"] / pytorch - 1) < 1e-6, cpu
    assert abs(parity["int8"]["perplexity"] / pytorch - 1) < 5e-4, cpu
    assert parity["int8"]["greedy_agreement"] >= 0.98, cpu
    assert parity["int8"]["scheme"] == INT8_SCHEME


def test_fp16_variant_for_gpus(run_dir: Path, tmp_path: Path) -> None:
    run_cli("export", str(run_dir), "--output", str(tmp_path / "e"), "--fp16")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["variants"]["fp16"] == "model_fp16.onnx"
    parity = json.loads((tmp_path / "e" / "parity.json").read_text())
    assert parity["fp16"]["greedy_agreement"] > 0.95  # checked on the CPU, same graph as on CUDA


def test_store_holds_the_model_with_its_metadata(export_dir: Path) -> None:
    model = bentoml.models.get(f"tailorgpt-{MODEL_NAME}:latest")
    assert (Path(model.path) / "model_int8.onnx").is_file()
    assert (Path(model.path) / "tokenizer.json").is_file()
    assert not (Path(model.path) / "model.safetensors").exists()
    metadata = model.info.metadata
    assert metadata["context"] == 256
    assert metadata["config"]["n_layer"] == 2
    assert metadata["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert metadata["parity"] == json.loads((export_dir / "parity.json").read_text())
    assert (Path(model.path) / "parity_sample.json").is_file()
    assert metadata["training"]["validation_after"]["perplexity"] > 1


def test_export_of_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notarun").mkdir()
    out = tmp_path / "export"
    result = run_cli("export", str(tmp_path / "notarun"), "--output", str(out), check=False)
    assert_clean_failure(result, str(tmp_path / "notarun"), "tailorgpt train")
    assert not out.exists() and not out.with_name("export.partial").exists()


def test_bad_store_name(export_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "export",
        str(export_dir.parent / "run"),
        "--output",
        str(tmp_path / "e"),
        "--name",
        "My Notes",
        check=False,
    )
    assert_clean_failure(result, "--name 'My Notes'")
    assert not (tmp_path / "e").exists()
