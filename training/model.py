"""Load a GPT-2-architecture base model, or build the `tiny` preset from the user's corpus."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from artifacts import UserError
from service.engine import ChatTemplateError, template_file

T = TypeVar("T")
TINY = "tiny"
END_OF_TEXT = "<|endoftext|>"
# Small enough to train in seconds on 2 cores, same architecture as GPT-2 124M.
TINY_CONFIG = {"n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 2}
TINY_VOCAB_SIZE = 1024


def build_tiny(documents: list[str], directory: Path, seed: int) -> Path:
    """Write a random-init small GPT-2 and a byte-level BPE tokenizer trained on `documents`.

    The result is an ordinary local model directory, so training goes on exactly as it
    does for `gpt2` or any other checkpoint.
    """
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        documents,
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        show_progress=False,  # off a terminal it prints only blank lines, on stdout
    )
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT
    )
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, **TINY_CONFIG
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # transformers 5 writes tokenizer.json only; GPT-2's vocab.json and merges.txt too, as
    # the hub checkpoints carry them.
    bpe.save_model(str(directory))
    return directory


def load_or_explain(load: Callable[[str], T], name_or_dir: str, what: str) -> T:
    """`load(name_or_dir)`, or a one-line UserError saying what to pass instead."""
    try:
        return load(name_or_dir)
    except (OSError, ValueError) as err:
        raise UserError(
            f"{name_or_dir}: cannot load {what} ({first_line(err)}): pass a hub id such as "
            f"'gpt2' (needs internet), a local model directory, or '{TINY}'"
        ) from None


def load_tokenizer(name_or_dir: str) -> PreTrainedTokenizerBase:
    tokenizer = load_or_explain(AutoTokenizer.from_pretrained, name_or_dir, "a tokenizer")
    if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:
        # BERT-style vocabularies (the uer/gpt2-chinese-* family) end a text with [SEP].
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"{name_or_dir}: the tokenizer has no end-of-text token: add one")
    return tokenizer


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_base_config(name_or_dir: str) -> PretrainedConfig:
    """The config of a GPT-2-architecture checkpoint (hub id or local directory)."""
    config = load_or_explain(AutoConfig.from_pretrained, name_or_dir, "a model config")
    if config.model_type != "gpt2":
        raise UserError(
            f"{name_or_dir}: is a '{config.model_type}' model, not GPT-2: pass a GPT-2 "
            f"checkpoint (gpt2, distilgpt2, gpt2-medium, ...) or '{TINY}'"
        )
    return config


def load_base_model(
    name_or_dir: str, config: PretrainedConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    hf_logging.disable_progress_bar()  # 5.x draws a bar per load; training draws its own
    tokenizer = load_tokenizer(name_or_dir)
    # The config's end token is what export and serving stop on: make it the tokenizer's.
    config.eos_token_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(name_or_dir, config=config)
    # transformers finds no loss for the class name GPT2LMHeadModel and warns at the first
    # step before using the causal-LM loss anyway; naming it keeps that line off the terminal.
    model.loss_type = "ForCausalLM"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def chat_template_option(path: Path | None) -> str | None:
    """The text of a --chat_template file, checked before any long work; UserError if bad."""
    try:
        return template_file(path) if path else None
    except ChatTemplateError as e:
        raise UserError(f"--chat_template {e}") from None


def weights_fingerprint(model: PreTrainedModel) -> str:
    """What identifies a model's weights, so that a LoRA adapter loads only on the base it
    was trained on: a digest of the first and last blocks' projections and the final norm
    (a full fine-tune changes them all; an adapter's base keeps them)."""
    transformer = model.transformer
    tensors = (
        transformer.h[0].attn.c_attn.weight,
        transformer.h[-1].mlp.c_proj.weight,
        transformer.ln_f.weight,
    )
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
