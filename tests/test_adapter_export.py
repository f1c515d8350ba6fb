"""A LoRA adapter kept unmerged (`train --lora --save_adapter`) and exported on its own
(`export RUN_DIR --adapter`): peft's files and a manifest naming the base it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CORPUS, assert_clean_failure, cli, run_cli, train_args
from peft import PeftModel
from transformers import GPT2LMHeadModel

from artifacts import tokenizer_fingerprint, write_json, write_manifest
from training.model import build_tiny, load_tokenizer, weights_fingerprint
from training.plan import LORA_TARGETS
from training.prepare import read_documents

PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.model  # trains
def test_adapter_is_kept_beside_the_merged_model_and_exports_with_its_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A base directory rather than `tiny`, which the run builds inside itself.
    base = build_tiny(read_documents([CORPUS]), tmp_path / "base", seed=0)
    run = tmp_path / "run"
    lora = ["--lora", "--save_adapter", "--lora_r", "4", "--lora_alpha", "8"]
    steps = ["--block_size", "32", "--max_steps", "5", "--learning_rate", "0.01"]
    run_cli(*train_args(run, *lora, *steps, base_model=str(base)))

    assert sorted(p.name for p in (run / "adapter").iterdir()) == PEFT_FILES
    base_model = GPT2LMHeadModel.from_pretrained(base)
    fingerprint = weights_fingerprint(base_model)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["save_adapter"] and metrics["base_fingerprint"] == fingerprint
    assert metrics["best_step"] > 0
    # The run's model is still the merged one, and the kept adapter is the one merged.
    merged = GPT2LMHeadModel.from_pretrained(run).state_dict()
    rebuilt = PeftModel.from_pretrained(base_model, run / "adapter").merge_and_unload()
    for name, tensor in rebuilt.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, msg=name)
    assert weights_fingerprint(rebuilt) != fingerprint

    # The tokenizer as an export of the base writes it (a saved tokenizer.json is not
    # byte for byte the one build_tiny wrote), which the server compares with the adapter's.
    load_tokenizer(str(base)).save_pretrained(tmp_path / "base-tokenizer")
    out = tmp_path / "adapter-export"
    result = cli(capsys, "export", str(run), "--adapter", "--output_dir", str(out), "--name", "a")
    assert result.returncode == 0, result.stderr
    for name in PEFT_FILES:
        assert (out / name).read_bytes() == (run / "adapter" / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {
        "kind": "adapter",
        "inputs": {"run_dir": str(run)},
        "base_model": str(base),
        "base_fingerprint": fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint(tmp_path / "base-tokenizer"),
        "r": 4,
        "lora_alpha": 8,
        "target_modules": sorted(LORA_TARGETS),
    }
    assert "not imported into the BentoML store" in result.stdout
    assert result.stdout.rstrip().endswith(
        f"tailorgpt serve --model tailorgpt-base:latest --lora_modules a={out}"
    )


def test_save_adapter_needs_lora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, *train_args(tmp_path / "run", "--save_adapter"))
    assert_clean_failure(result, "--save_adapter", "add --lora")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_export_of_a_run_without_an_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"  # what export reads of a run trained without --save_adapter
    run.mkdir()
    write_manifest(run, "train", {})
    write_json(run / "metrics.json", {"base_model": "gpt2", "base_fingerprint": "0" * 16})
    out = tmp_path / "out"
    result = cli(capsys, "export", str(run), "--adapter", "--output_dir", str(out))
    assert_clean_failure(result, str(run), "--lora --save_adapter")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_adapter_export_has_no_onnx_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", str(tmp_path), "--adapter", "--output_dir", str(tmp_path / "out")]
    result = cli(capsys, *args, "--fp16")
    assert_clean_failure(result, "--adapter", "drop --fp16")
