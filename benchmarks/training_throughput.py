"""Does tailorgpt's training loop cost speed? Against a plain transformers Trainer script.

Same model shape (random init), same token blocks, same batch, same number of optimizer
steps, same logging interval, fp32 on this machine's CPU; each side reports tokens per
second over Trainer's train_runtime. Neither side evaluates inside the timed loop (the
corpus is the bundled one repeated, so the steps stay inside the first epoch, and
tailorgpt evaluates before and after): this compares the training loops themselves,
tailorgpt's callbacks and TensorBoard logging included.
Median of 3 runs after a warm-up run.

  .venv/bin/python benchmarks/training_throughput.py --workdir /tmp/tailorgpt-train-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from training.arguments import TrainArgs
from training.data import pack_blocks
from training.model import TINY_CONFIG, build_tiny
from training.prepare import read_documents
from training.train import train

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (config, block size, batch, steps)
    "tiny": (TINY_CONFIG, 64, 8, 60),
    "gpt2-124M": ({}, 128, 8, 6),
}
RUNS = 3
REPEAT = 40


def base_model(workdir: Path, shape: dict) -> Path:
    """A local random-init model of the shape, with a tokenizer trained on the corpus."""
    directory = workdir / "base"
    shutil.rmtree(directory, ignore_errors=True)
    tokenizer_dir = build_tiny(read_documents([REPO / "samples" / "corpus"]), workdir / "tok", 0)
    tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), **shape)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_corpus(workdir: Path) -> Path:
    """The bundled corpus, 40 times over, as one JSONL file (about 0.8 MB)."""
    path = workdir / "corpus.jsonl"
    documents = read_documents([REPO / "samples" / "corpus"]) * REPEAT
    path.write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents),
        encoding="utf-8",
    )
    return path


def plain_trainer(base: Path, data: Path, block: int, batch: int, steps: int) -> float:
    tokenizer = GPT2TokenizerFast.from_pretrained(base)
    blocks = pack_blocks(read_documents([data]), tokenizer, block)
    model = GPT2LMHeadModel.from_pretrained(base)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=5e-5,
            logging_steps=TrainArgs.logging_steps,  # the same arguments as tailorgpt's run
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=default_data_collator
        )
        runtime = trainer.train().metrics["train_runtime"]
    return steps * batch * block / runtime


def tailorgpt_train(
    base: Path, data: Path, block: int, batch: int, steps: int, workdir: Path
) -> float:
    output = workdir / "run"
    shutil.rmtree(output, ignore_errors=True)
    metrics = train(
        TrainArgs(
            train_file=data,
            model_name_or_path=str(base),
            output_dir=output,
            block_size=block,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=5e-5,
            validation_split_percentage=1,
            eval_steps=10**9,  # evaluate before and after, not inside the timed loop
        )
    )
    return metrics["train_tokens_per_second"]


def median_of_runs(measure) -> float:
    measure()  # warm-up
    return statistics.median(measure() for _ in range(RUNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-train-bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = write_corpus(args.workdir)
    rows = {}
    for name, (shape, block, batch, steps) in SHAPES.items():
        base = base_model(args.workdir, shape)
        plain = median_of_runs(partial(plain_trainer, base, data, block, batch, steps))
        ours = median_of_runs(
            partial(tailorgpt_train, base, data, block, batch, steps, args.workdir)
        )
        rows[name] = {
            "block": block,
            "batch": batch,
            "steps": steps,
            "plain_trainer": plain,
            "tailorgpt": ours,
            "ratio": ours / plain,
        }
    print("| shape | block x batch | steps | plain Trainer tok/s | tailorgpt train tok/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['block']} x {r['batch']} | {r['steps']} | {r['plain_trainer']:.0f} "
            f"| {r['tailorgpt']:.0f} | {r['ratio']:.2f}x |"
        )
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
