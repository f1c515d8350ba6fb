"""ONNX export, int8 quantization, parity and the BentoML store import."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import bentoml
import onnx
import pytest
from helpers import CORPUS, MODEL_NAME, assert_clean_failure, cli, make_bert_gpt2, run_cli
from tokenizers import Tokenizer
from transformers import BertTokenizerFast

from artifacts import UserError
from export.graph import INT8_SCHEME
from export.onnx import BUILT_IN_SAMPLE, export
from service.engine import GenerationRequest, LLMEngine, TextCodec, cpu_flags
from training.model import build_tiny
from training.prepare import read_documents


def test_export_writes_both_variants_and_a_manifest(export_dir: Path) -> None:
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["kind"] == "export" and manifest["task"] == "text-generation-shared-kv"
    assert manifest["variants"] == {
        "fp32": "model.onnx",
        "int8": "model_int8.onnx",
        "fp32_kv_int8": "model_kv_int8.onnx",
        "int8_kv_int8": "model_int8_kv_int8.onnx",
    }
    # Each variant's weights once, in a side file that its int8-cache graph reads too.
    weights = {v: export_dir / f"model{v}.onnx_data" for v in ("", "_int8")}
    assert weights["_int8"].stat().st_size < weights[""].stat().st_size
    # Readable by a container's server user, as the graphs are (onnx writes it 0600).
    assert all(w.stat().st_mode & 0o004 for w in weights.values())
    for variant, graph in manifest["variants"].items():
        data = weights["_int8" if variant.startswith("int8") else ""]
        size = (export_dir / graph).stat().st_size + data.stat().st_size
        assert manifest["size_bytes"][variant] == size
        assert (export_dir / graph).stat().st_size < 100_000  # the weights are not copied
    assert not list(export_dir.glob("*kv_int8.onnx_data"))


def test_int8_quantizes_every_projection_including_the_tied_output(export_dir: Path) -> None:
    graph = onnx.load(export_dir / "model_int8.onnx").graph
    quantized = [n.name for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(quantized) == 2 * 4 + 1  # 2 layers x (qkv, attention out, MLP in, MLP out) + lm_head
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm", "DynamicQuantizeLinear")]
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2  # fused, with the KV cache shared between past and present


def test_parity_against_pytorch(export_dir: Path) -> None:
    """The README's figures: fp32 logits within 1e-5 of PyTorch's; int8 perplexity within
    0.1% and 98% of greedy next tokens the same, on every CPU kind (test_int8.py)."""
    parity = json.loads((export_dir / "parity.json").read_text())
    cpu = f"measured on a CPU with {parity['cpu_flags']}"
    assert parity["parity_text"] == "heldout.json"
    assert parity["heldout_tokens"] > 500
    assert parity["cpu_flags"] == cpu_flags()
    pytorch = parity["pytorch"]["perplexity"]
    assert parity["fp32"]["max_abs_logit_diff"] < 1e-5, cpu
    assert parity["fp32"]["padded_prefill_max_abs_logit_diff"] < 1e-5, cpu
    int8 = parity["int8"]
    assert int8["padded_prefill_max_abs_logit_diff"] <= 2 * int8["max_abs_logit_diff"], cpu
    assert parity["fp32"]["greedy_agreement"] == 1.0, cpu
    assert abs(parity["fp32"]["perplexity"] / pytorch - 1) < 1e-6, cpu
    assert abs(parity["int8"]["perplexity"] / pytorch - 1) < 1e-3, cpu
    assert parity["int8"]["greedy_agreement"] >= 0.98, cpu
    assert parity["int8"]["scheme"] == INT8_SCHEME
    # The int8 KV cache: its perplexity gap at most 0.2% more than the same weights' with an
    # fp32 cache, and 97% of greedy next tokens the same as PyTorch's (README, "KV cache").
    for weights in ("fp32", "int8"):
        with_int8_cache = parity[f"{weights}_kv_int8"]
        gap = abs(with_int8_cache["perplexity"] / pytorch - 1)
        assert gap <= abs(parity[weights]["perplexity"] / pytorch - 1) + 0.002, cpu
        assert with_int8_cache["greedy_agreement"] >= 0.97, cpu


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face GPT-2 directory, as save_pretrained leaves it: a random-init
    2-layer, 64-wide model and its byte-level BPE tokenizer, no tailorgpt files."""
    directory = tmp_path_factory.mktemp("checkpoint") / "gpt2"
    return build_tiny(read_documents([CORPUS]), directory, seed=0)


@pytest.mark.model  # exports
def test_checkpoint_exports_imports_and_generates(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    run_cli("export", str(checkpoint), "--output", str(out), "--name", "plain-gpt2")
    parity = json.loads((out / "parity.json").read_text())
    assert parity["parity_text"] == BUILT_IN_SAMPLE
    assert parity["heldout_tokens"] > 500  # English and Chinese, several blocks
    assert parity["fp32"]["max_abs_logit_diff"] < 1e-5
    assert parity["fp32"]["greedy_agreement"] == 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"] == str(checkpoint.resolve())
    assert manifest["inputs"] == {"model_dir": str(checkpoint)}

    metadata = bentoml.models.get("tailorgpt-plain-gpt2:latest").info.metadata
    assert metadata["base_model"] == str(checkpoint.resolve())
    assert metadata["parity"] == parity
    assert "training" not in metadata  # no run, no training metrics

    with LLMEngine(out, "fp32", max_running=2) as engine:
        [result] = engine.generate([GenerationRequest(prompt="The morning", max_new_tokens=8)])
    assert result.completion_tokens > 0 and result.text


@pytest.mark.model  # exports
def test_checkpoint_without_tokenizer_json_gets_one_and_a_validation_file(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Only vocab.json + merges.txt: the export writes the tokenizer.json the server reads,
    encoding as the original does; parity is measured on the --validation_file given."""
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    validation = CORPUS / "letters.md"
    out = tmp_path / "export"
    run_cli("export", str(bare), "--output", str(out), "--validation_file", str(validation))
    [text] = read_documents([validation])
    ids = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(text).ids
    assert TextCodec(out).encode(text) == ids
    parity = json.loads((out / "parity.json").read_text())
    assert parity["parity_text"] == str(validation)
    blocks = min(16, (len(ids) + 1) // 128)  # the text and its end token, in blocks of 128
    assert parity["heldout_tokens"] == blocks * 127  # the last of a block predicts nothing
    assert parity["fp32"]["max_abs_logit_diff"] < 1e-5


@pytest.mark.model  # exports
def test_bert_vocabulary_checkpoint_ends_with_sep(tmp_path: Path) -> None:
    """The uer/gpt2-chinese-* shape, only vocab.txt: the export's tokenizer.json encodes as
    BERT's, and its config ends texts with [SEP] (the checkpoint's own says 50256)."""
    model_dir, _ = make_bert_gpt2(tmp_path)
    bert = BertTokenizerFast.from_pretrained(model_dir)
    (model_dir / "tokenizer.json").unlink()
    run_cli("export", str(model_dir), "--output", str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["eos_token_id"] == bert.sep_token_id
    text = "今天早上下了一场小雨"
    ids = bert(text, add_special_tokens=False)["input_ids"]
    assert TextCodec(tmp_path / "export").encode(text) == ids
    parity = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert parity["fp32"]["max_abs_logit_diff"] < 1e-5


def test_export_of_a_directory_that_is_neither_a_run_nor_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notarun").mkdir()
    out = tmp_path / "export"
    result = cli(capsys, "export", str(tmp_path / "notarun"), "--output", str(out))
    assert_clean_failure(result, str(tmp_path / "notarun"), "tailorgpt train", "GPT-2 directory")
    assert not out.exists() and not out.with_name("export.partial").exists()


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "no such directory"),
        ("bert", "a 'bert' model, not GPT-2"),
        ("no_weights", "no weights"),
        ("no_tokenizer", "no tokenizer"),
    ],
)
def test_export_of_an_incomplete_checkpoint(
    checkpoint: Path, tmp_path: Path, case: str, fragment: str
) -> None:
    """In-process, the CLI's one-line error is the UserError's message (test above)."""
    source = tmp_path / "source"
    if case != "missing":
        shutil.copytree(checkpoint, source)
    weights, tokenizer = ["model.safetensors"], ["tokenizer.json", "vocab.json"]  # merges.txt stays
    for name in {"no_weights": weights, "no_tokenizer": tokenizer}.get(case, []):
        (source / name).unlink()
    if case == "bert":
        (source / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "export"
    with pytest.raises(UserError, match=f"^{re.escape(f'{source}: {fragment}: pass')}.*GPT-2 dir"):
        export(source, out)
    assert not out.exists() and not out.with_name("export.partial").exists()


def test_bad_store_name(
    export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = str(export_dir.parent / "run")
    result = cli(capsys, "export", run, "--output", str(tmp_path / "e"), "--name", "My Notes")
    assert_clean_failure(result, "--name 'My Notes'")
    assert not (tmp_path / "e").exists()
