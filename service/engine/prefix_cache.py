"""Automatic prefix caching over a slot cache: what each slot's KV cache still holds.

A sequence that leaves keeps its tokens' keys and values in its slot until the slot is taken
or the memory is needed. A new prompt that starts as a cached sequence did (a system prompt,
the chat history of the turn before) starts from those positions: in the same slot when it
is free, else from a copy of them; only the rest of the prompt is prefilled, the costly part
on a CPU. vLLM shares fixed-size blocks for this; here a slot is contiguous, so a hit reuses
or copies one run of positions, which serves the common cases (one shared start, or a
conversation that grows) at the cost of a copy.

Keys and values depend on the adapter that computed them (service/engine/lora.py): a slot
keeps its adapter's id with its tokens, and only a prompt of the same adapter reuses them.

Kept tokens count against the KV budget with what running sequences reserve, so memory stays
bounded: admitting a sequence drops the least recently kept slots until both fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

MIN_PREFIX_TOKENS = 16  # a shorter shared start saves less than it costs in a call of its own


@dataclass
class Hit:
    slot: int  # the slot whose cache holds the prefix
    tokens: int  # how many positions of it the prompt shares
    in_place: bool  # the sequence takes that (free) slot; else it copies the positions


class PrefixCache:
    def __init__(self) -> None:
        # free slot -> (tokens, kept at, adapter)
        self.kept: dict[int, tuple[np.ndarray, float, int]] = {}

    @property
    def tokens(self) -> int:
        return sum(len(kept[0]) for kept in self.kept.values())

    def kept_at(self, slot: int) -> float:
        """When the slot's tokens were kept; 0 for a slot that keeps none."""
        kept = self.kept.get(slot)
        return kept[1] if kept else 0.0

    def keep(self, slot: int, tokens: list[int], lora_id: int = 0) -> None:
        self.kept[slot] = (np.asarray(tokens), time.monotonic(), lora_id)

    def take(self, slot: int) -> None:
        """The slot has a new sequence: what it kept is overwritten from here on."""
        self.kept.pop(slot, None)

    def candidates(self, exclude: set[int], lora_id: int = 0) -> dict[int, np.ndarray]:
        """Kept tokens by slot, of the adapter `lora_id`'s slots but those in `exclude`."""
        return {
            slot: tokens
            for slot, (tokens, _, kept_by) in self.kept.items()
            if slot not in exclude and kept_by == lora_id
        }

    def evict(self, room: int) -> list[int]:
        """Drop least recently kept slots until at most `room` tokens are kept; the slots
        dropped, whose memory can go back to the system."""
        dropped = []
        for slot, _ in sorted(self.kept.items(), key=lambda item: item[1][1]):
            if self.tokens <= room:
                break
            del self.kept[slot]
            dropped.append(slot)
        return dropped


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def longest_prefix(prompt: list[int], caches: dict[int, np.ndarray]) -> tuple[int, int]:
    """(slot, shared tokens) of the cache that holds the longest start of the prompt, at
    least one prompt token short of all of it (its logits give the first new token);
    (-1, 0) when none shares MIN_PREFIX_TOKENS."""
    ids = np.asarray(prompt[:-1])
    best = (-1, 0)
    for slot, tokens in caches.items():
        shared = common_prefix(ids, tokens)
        if shared >= MIN_PREFIX_TOKENS and shared > best[1]:
            best = (slot, shared)
    return best
