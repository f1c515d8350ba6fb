"""The options of the commands that only the command line has (train's and prepare's live with
their code); help texts in the field metadata, names as in transformers' run_clm.py."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal

from service.engine import GenerationRequest
from service.server.settings import Settings, env_name
from training.arguments import LORA_RANK

DEFAULT_PORT = 3000


class Count(int):
    """A whole number of at least 1; 1e6 and 1_000_000 are accepted too."""

    def __new__(cls, text: str | int) -> Count:
        try:
            value = float(text)
        except ValueError:
            value = 0
        if value < 1 or value != int(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
        return super().__new__(cls, int(value))


def port_option() -> Any:
    return field(
        default_factory=lambda: int(os.environ.get("PORT", DEFAULT_PORT)),
        metadata={"help": "the port to listen on ($PORT when set)"},
    )


@dataclass
class PlanArgs:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--base-model"],
            "help": "the model to plan for: a built-in size (see --all), a hub id or a dir",
        },
    )
    all: bool = field(default=False, metadata={"help": "a table of every built-in size instead"})
    block_size: int | None = field(
        default=None,
        metadata={"help": "tokens per training block (default: the model's context, at most 1024)"},
    )
    per_device_train_batch_size: Count = field(
        default=8,
        metadata={"help": "the batch you want; the plan lowers it and accumulates to fit"},
    )
    lora: bool = field(default=False, metadata={"help": "plan for LoRA instead of all weights"})
    lora_r: Count = field(default=LORA_RANK, metadata={"help": "LoRA rank"})
    measure: bool = field(
        default=False, metadata={"help": "time a few real training steps (random weights)"}
    )
    train_tokens: Count | None = field(
        default=None,
        metadata={
            "help": "with --measure: the time of an epoch of this many tokens (default: none)"
        },
    )
    gpus: Count | None = field(
        default=None,
        metadata={
            "help": "plan every built-in size for this many GPUs you do not have here: full, "
            "LoRA, or FSDP across them (with --gpu or --gpu_memory_gb)"
        },
    )
    gpu: str | None = field(
        default=None,
        metadata={"help": "with --gpus: the card, t4-16, a10-24, a100-40, h100-80, ..."},
    )
    gpu_memory_gb: float | None = field(
        default=None, metadata={"help": "with --gpus: memory of each card in GB (bf16)"}
    )


@dataclass
class EvaluateArgs:
    run_dir: Path = field(
        metadata={"positional": "RUN_DIR", "help": "a training run ('tailorgpt train' output)"}
    )
    validation_file: Path = field(
        metadata={
            "aliases": ["--data"],
            "help": "the text to measure perplexity on: any file or folder 'prepare' reads",
        }
    )
    block_size: int | None = field(
        default=None, metadata={"help": "tokens per block (default: the run's own)"}
    )


@dataclass
class ExportArgs:
    source: Path = field(
        metadata={
            "positional": "DIR",
            "help": "a training run, or any Hugging Face GPT-2 directory (save_pretrained)",
        }
    )
    output_dir: Path = field(
        metadata={"aliases": ["--output"], "help": "the export folder to write (must not exist)"}
    )
    name: str | None = field(
        default=None,
        metadata={
            "help": "import as tailorgpt-NAME into the BentoML store (default: no import); "
            "with --adapter, the adapter's name for 'serve --lora_modules' (not imported)"
        },
    )
    adapter: bool = field(
        default=False,
        metadata={
            "help": "export the run's LoRA adapter (train --lora --save_adapter) unmerged, to "
            "serve over its base with 'serve --lora_modules'; no ONNX, no parity"
        },
    )
    fp16: bool = field(
        default=False, metadata={"help": "also write model_fp16.onnx, for serving on a CUDA GPU"}
    )
    validation_file: Path | None = field(
        default=None,
        metadata={
            "help": "text to measure parity on (default: a run's held-out blocks, else a "
            "built-in sample)"
        },
    )
    chat_template: Path | None = field(
        default=None,
        metadata={
            "help": "a Jinja chat template file for /v1/chat/completions (default: the "
            "model's own, else the 'role: content' layout 'prepare' gives chat records)"
        },
    )


def setting_option(name: str) -> tuple[str, Any, Any]:
    """A `serve` flag for a server setting: unset, its environment variable or default holds."""
    info = Settings.model_fields[name]
    default = "none" if info.default is None else info.default
    return (
        name,
        info.annotation | None,
        field(
            default=None,
            metadata={"help": f"{info.description} (default: ${env_name(name)}, else {default})"},
        ),
    )


@dataclass
class ListenArgs:
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "the address to listen on; 0.0.0.0 for every interface"},
    )
    port: int = port_option()


# Every setting of service/server/settings.py, as a flag.
ServeArgs = make_dataclass(
    "ServeArgs", [setting_option(name) for name in Settings.model_fields], bases=(ListenArgs,)
)


@dataclass
class ModelArgs:
    model: str = field(
        metadata={
            "positional": "MODEL",
            "help": "an export dir, a training run dir, or a store tag tailorgpt-NAME[:version]",
        }
    )
    variant: Literal["int8", "fp32"] = field(
        default="int8", metadata={"help": "the ONNX model to run"}
    )
    lora: Path | None = field(
        default=None,
        metadata={
            "help": "a LoRA adapter to run over MODEL, unmerged: the output of 'tailorgpt "
            "export RUN --adapter', or a peft adapter directory"
        },
    )


@dataclass(kw_only=True)
class GenerateArgs(ModelArgs):
    prompt: str = field(metadata={"positional": "PROMPT", "help": "the text to continue"})


@dataclass
class ChatArgs(ModelArgs):
    system: str | None = field(
        default=None,
        metadata={"help": "a first system turn, e.g. 'You answer briefly.' (default: none)"},
    )


def api_default(name: str) -> Any:
    return GenerationRequest.model_fields[name].default


@dataclass
class SamplingArgs:
    """As on the API (GenerationRequest), with its defaults."""

    max_new_tokens: int = field(
        default=api_default("max_new_tokens"), metadata={"help": "the most tokens to generate"}
    )
    temperature: float = field(
        default=api_default("temperature"), metadata={"help": "0 means greedy decoding"}
    )
    top_k: int = field(
        default=api_default("top_k"),
        metadata={"help": "keep only the k likeliest tokens; 0 keeps all"},
    )
    top_p: float = field(
        default=api_default("top_p"),
        metadata={"help": "keep the likeliest tokens up to this probability in all"},
    )
    repetition_penalty: float = field(
        default=api_default("repetition_penalty"),
        metadata={"help": "above 1 makes repeating a token less likely; 1 means none"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "makes sampled output reproducible (default: random each time)"},
    )
    stop: list[str] = field(
        default_factory=list,
        metadata={
            "action": "extend",
            "help": "strings that end the output, not included in it; repeat for more "
            "(default: none)",
        },
    )


@dataclass
class QuickstartArgs:
    train_file: Path = field(
        default=Path("samples/corpus"),
        metadata={"aliases": ["--data"], "help": "the text to train the tiny preset on"},
    )
    name: str = field(default="demo", metadata={"help": "import as tailorgpt-NAME"})
    output_dir: Path = field(
        default=Path("runs/quickstart"),
        metadata={"aliases": ["--output"], "help": "the workspace, rebuilt on each run"},
    )
    num_train_epochs: float = field(default=20.0, metadata={"help": "passes over the data"})
    port: int = port_option()
    no_serve: bool = field(default=False, metadata={"help": "stop after the store import"})
