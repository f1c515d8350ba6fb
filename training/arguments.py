"""The options of `prepare` and `train`, and the constants their defaults name.

Plain dataclasses that import nothing heavy: the command line builds its parsers from them
without loading torch or transformers. Names follow transformers' run_clm.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LORA_RANK = 8
# RUN_DIR/adapter: the best LoRA adapter kept unmerged (`train --lora --save_adapter`), which
# `export --adapter` reads; here, not with training's code, so that reading it needs no torch.
ADAPTER_DIR = "adapter"


@dataclass
class ReadArgs:
    """How files are read, cleaned and deduplicated: the same for `prepare` and `train`."""

    text_field: str = field(
        default="text",
        metadata={
            "help": "the JSON field holding the text (chat records with 'messages' work too)"
        },
    )
    text_column: str = field(default="text", metadata={"help": "the CSV column holding the text"})
    min_chars: int = field(
        default=16, metadata={"help": "drop documents shorter than this, in characters"}
    )
    max_chars: int = field(
        default=200_000, metadata={"help": "drop documents longer than this, in characters"}
    )
    near_duplicate_threshold: float = field(
        default=0.85,
        metadata={"help": "drop a document this similar to a kept one (MinHash Jaccard; 1: off)"},
    )
    scrub_pii: bool = field(
        default=False,
        metadata={"help": "replace e-mails, phone and ID numbers, IPs with placeholders"},
    )


@dataclass(kw_only=True)
class PrepareArgs(ReadArgs):
    inputs: list[Path] = field(
        metadata={
            "positional": "INPUT",
            "help": ".txt .md .html .json .jsonl .csv files or folders, in any encoding",
        }
    )
    output_dir: Path = field(
        metadata={"aliases": ["--output"], "help": "the dataset folder to write (must not exist)"}
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "share of documents held out for validation"}
    )
    seed: int = field(default=42, metadata={"help": "seed of the train/validation draw"})
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "report tokens per character with this tokenizer (default: not reported)"
        },
    )


LEARNING_RATE = 5e-5  # for fine-tuning a pretrained model
TINY_LEARNING_RATE = 2e-3  # a random-init model needs a far larger step than fine-tuning


@dataclass
class TrainArgs:
    """The options of `tailorgpt train`, named as in transformers' run_clm.py."""

    train_file: Path = field(
        metadata={
            "aliases": ["--data"],
            "help": "a 'tailorgpt prepare' output, or any file or folder 'prepare' reads",
        }
    )
    model_name_or_path: str = field(
        metadata={
            "aliases": ["--base-model"],
            "help": "the model to fine-tune: 'tiny', a hub id (gpt2, distilgpt2, ...) or a dir",
        }
    )
    output_dir: Path = field(
        metadata={"aliases": ["--output"], "help": "the run folder to write (must not exist)"}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "tokens per training block (default: the model's context, at most 1024)"},
    )
    validation_split_percentage: float = field(
        default=10.0,
        metadata={
            "help": "share of blocks held out for validation (a prepared dataset keeps its own)"
        },
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "passes over the data"})
    max_steps: int = field(
        default=-1, metadata={"help": "stop after this many optimizer steps (-1: run every epoch)"}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"peak learning rate (default: {LEARNING_RATE}, {TINY_LEARNING_RATE} for tiny)"
        },
    )
    per_device_train_batch_size: int = field(
        default=8,
        metadata={"help": "blocks per step and device; lowered, with accumulation, to fit memory"},
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata={"help": "blocks per evaluation step and device"}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "steps whose gradients add up before each update"}
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "share of the steps the learning rate warms up over"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    save_steps: int = field(
        default=500, metadata={"help": "save a checkpoint every this many steps, to resume from"}
    )
    eval_steps: int | None = field(
        default=None,
        metadata={"help": "evaluate every this many steps (default: once per epoch)"},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "stop after this many evaluations without improvement (default: never)"},
    )
    lora: bool = field(
        default=False,
        metadata={
            "help": "train LoRA adapters (merged into the weights at the end), not all weights"
        },
    )
    save_adapter: bool = field(
        default=False,
        metadata={
            "help": f"keep the LoRA adapter unmerged too, in RUN_DIR/{ADAPTER_DIR}, for serving "
            "many adapters over one base; needs --lora"
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "shard weights, gradients and optimizer state across torchrun's "
            "processes (FSDP, full shard, one unit per GPT-2 block), not replicate them"
        },
    )
    lora_r: int = field(default=LORA_RANK, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling (alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    logging_steps: int = field(
        default=10, metadata={"help": "log the training loss every this many steps"}
    )
    seed: int = field(default=42, metadata={"help": "seed of the split, the order and the init"})
    resume_from_checkpoint: bool = field(
        default=False,
        metadata={"help": "continue from the newest checkpoint of an interrupted run"},
    )
    chat_template: Path | None = field(
        default=None,
        metadata={
            "help": "a Jinja chat template file kept with the run's tokenizer, for serving "
            "chat (default: the 'role: content' layout 'prepare' gives chat records)"
        },
    )
