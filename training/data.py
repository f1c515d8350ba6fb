"""The data training sees: documents packed into blocks of tokens (cached between runs),
split into train and held-out blocks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from artifacts import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

BLOCKS = "blocks"  # the cache's folder of tokenized corpora


def pack_blocks(
    documents: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> list[list[int]]:
    """Tokenize, end every document with EOS, concatenate and cut into equal blocks."""
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    usable = len(ids) // block_size * block_size
    return [ids[i : i + block_size] for i in range(0, usable, block_size)]


def cache_dir() -> Path:
    """Where tokenized corpora are kept between runs: $TAILORGPT_CACHE, else the user's cache."""
    if os.environ.get("TAILORGPT_CACHE"):
        return Path(os.environ["TAILORGPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tailorgpt"


def blocks_key(documents: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> str:
    """A hash of everything the blocks depend on: the texts, the tokenizer, the block size."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(f"{tokenizer.eos_token_id} {block_size}".encode())
    for document in documents:
        encoded = document.encode()
        digest.update(len(encoded).to_bytes(8, "little"))  # so no two lists hash alike
        digest.update(encoded)
    return digest.hexdigest()


def cached_blocks(
    documents: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> tuple[list[list[int]], bool]:
    """pack_blocks, from the cache when these texts were tokenized so before; and whether
    they were."""
    path = cache_dir() / BLOCKS / f"{blocks_key(documents, tokenizer, block_size)}.npy"
    if path.is_file():
        return np.load(path).tolist(), True
    blocks = pack_blocks(documents, tokenizer, block_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # renamed once whole
    with temporary.open("wb") as f:
        np.save(f, np.array(blocks, dtype=np.int32).reshape(-1, block_size))
    temporary.replace(path)
    return blocks, False


def split_blocks(
    blocks: list[list[int]], validation_percentage: float, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """A seeded random hold-out; at least one block on each side."""
    if len(blocks) < 2:
        raise UserError(
            f"the corpus makes {len(blocks)} block(s) of tokens; training needs at least 2: "
            "add text or lower --block_size"
        )
    order = np.random.default_rng(seed).permutation(len(blocks))
    n_validation = min(len(blocks) - 1, max(1, round(len(blocks) * validation_percentage / 100)))
    validation = [blocks[i] for i in order[:n_validation]]
    train = [blocks[i] for i in order[n_validation:]]
    return train, validation


def nonempty_blocks(blocks: list[list[int]], block_size: int) -> list[list[int]]:
    if not blocks:
        raise UserError(
            f"a prepared split has fewer than {block_size} tokens, one block: "
            "prepare more text or lower --block_size"
        )
    return blocks


def resolve_block_size(requested: int | None, config: PretrainedConfig) -> int:
    context = config.n_positions
    if requested is None:
        return min(context, 1024)
    if not 8 <= requested <= context:
        raise UserError(
            f"--block_size {requested} is outside 8..{context} (the model's context): "
            f"use at most {context}"
        )
    return requested
