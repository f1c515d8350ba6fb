"""int8 numerics: the same sums on every x86 CPU, rows independent of their batch, a re-check
at start on a CPU unlike the exporter's.

CPUs with VNNI sum u8 x s8 products in int32; AVX2-only CPUs sum pairs in int16 first, which
saturates unless the weights keep 7 bits. The AVX2 path is run here under qemu-x86_64 with a
Haswell CPU (no AVX-512, no VNNI), whatever CPU this machine has.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import REPO
from onnx import numpy_helper

from service.engine import LLMEngine, ModelRunner
from service.engine.numerics import PARITY_SAMPLE, cpu_flags, decode_logits, recheck

INT16_MAX = 2**15 - 1


def test_int8_weights_never_saturate_a_pair_of_products(export_dir: Path) -> None:
    graph = onnx.load(export_dir / "model_int8.onnx").graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_int8")]
    assert len(weights) == 2 * 4 + 1
    widest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert 2 * 255 * widest <= INT16_MAX, f"|w| up to {widest}: vpmaddubsw saturates"


def test_the_token_embedding_is_stored_once_in_int8(export_dir: Path) -> None:
    config = json.loads((export_dir / "config.json").read_text())
    graph = onnx.load(export_dir / "model_int8.onnx").graph
    vocab_sized = {
        t.name: numpy_helper.to_array(t).dtype
        for t in graph.initializer
        if config["vocab_size"] in t.dims
    }
    # The output projection's weights and scales; the input side gathers from them.
    assert vocab_sized == {"lm_head.weight_int8": np.int8, "lm_head.column_scale": np.float32}


def sample_ids(export_dir: Path) -> np.ndarray:
    return np.array(json.loads((export_dir / PARITY_SAMPLE).read_text())["input_ids"])


def emulated_avx2_logits(
    export_dir: Path, blocks: np.ndarray, tmp_path: Path, kv_cache_dtype: str
) -> np.ndarray:
    ids, out = tmp_path / "ids.npy", tmp_path / "logits.npy"
    np.save(ids, blocks)
    emulator = ["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-m", "service.engine.numerics"]
    result = subprocess.run(
        [*emulator, str(export_dir), str(ids), str(out), "--kv_cache_dtype", kv_cache_dtype],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return np.load(out)


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (make tools)")
@pytest.mark.parametrize("kv_cache_dtype", ["fp32", "int8"])
def test_an_avx2_cpu_computes_what_this_one_does(
    export_dir: Path, tmp_path: Path, kv_cache_dtype: str
) -> None:
    blocks = sample_ids(export_dir)
    runner = ModelRunner(export_dir, "int8", len(blocks), kv_cache_dtype=kv_cache_dtype)
    native = decode_logits(runner, blocks[:, :9])
    avx2 = emulated_avx2_logits(export_dir, blocks[:, :9], tmp_path, kv_cache_dtype)
    # The int32 sums are exact on both paths; only float kernels of other widths differ.
    assert np.abs(avx2 - native).max() < 1e-4, f"this CPU has {cpu_flags()}"
    alone = emulated_avx2_logits(export_dir, blocks[:1, :9], tmp_path, kv_cache_dtype)
    assert np.array_equal(alone[0], avx2[0]), "on AVX2 a row's logits depend on its batch"


def rewrite_json(path: Path, change: dict) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def test_parity_is_rechecked_on_a_cpu_unlike_the_exporters(
    export_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = shutil.copytree(export_dir, tmp_path / "export")
    runner = ModelRunner(model_dir, "int8", slots=2)
    assert recheck(runner, model_dir, "int8") is None  # same CPU: nothing to re-check

    # Parity measured on the other CPU kind, whichever this machine is.
    other = ["avx2"] if "avx512_vnni" in cpu_flags() else ["avx512_vnni", "avx2"]
    rewrite_json(model_dir / "parity.json", {"cpu_flags": other})
    with caplog.at_level(logging.INFO, logger="service.engine.numerics"):
        LLMEngine(model_dir, "int8", threads=1, max_running=2).shutdown()  # logs its re-check
        result = recheck(runner, model_dir, "int8")
    assert result is not None and abs(result["perplexity_drift"]) < 1e-6
    assert caplog.text.count("within tolerance") == 2 and str(other) in caplog.text

    # A CPU whose int8 sums differ: the sample's loss moves, and the server says so.
    sample = json.loads((model_dir / PARITY_SAMPLE).read_text())
    tokens = sample_ids(model_dir)[:, 1:].size
    rewrite_json(
        model_dir / PARITY_SAMPLE, {"nll": {"int8": sample["nll"]["int8"] + 0.01 * tokens}}
    )
    caplog.clear()
    result = recheck(runner, model_dir, "int8")
    assert result is not None and result["perplexity_drift"] == pytest.approx(np.exp(-0.01) - 1)
    assert "past the 0.001 tolerance: serve the fp32 variant" in caplog.text
