"""Perplexity of a trained run on any text: the number to compare runs by."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from artifacts import UserError, read_manifest
from training.data import pack_blocks, resolve_block_size
from training.prepare import read_documents
from training.train import as_dataset, loss_metrics


def evaluate(run_dir: Path, data: Path, block_size: int | None = None) -> dict[str, Any]:
    """Loss and perplexity on `data`, in blocks as long as the run trained on by default."""
    read_manifest(run_dir, "train")
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    trained_block_size = json.loads((run_dir / "metrics.json").read_text())["block_size"]
    block_size = resolve_block_size(block_size or trained_block_size, model.config)
    blocks = pack_blocks(read_documents([data]), tokenizer, block_size)
    if not blocks:
        raise UserError(f"{data}: too little text for one block of {block_size} tokens")
    with tempfile.TemporaryDirectory() as scratch:  # the run directory stays as it was
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=scratch,
                report_to=[],
                dataloader_pin_memory=torch.cuda.is_available(),  # 5.x warns on CPUs
            ),
            eval_dataset=as_dataset(blocks),
        )
        metrics = loss_metrics(trainer.evaluate()["eval_loss"])
    return {"blocks": len(blocks), "block_size": block_size, **metrics}
