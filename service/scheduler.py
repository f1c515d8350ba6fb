"""Who runs each step: iteration-level (continuous) batching, as in Orca, vLLM and TGI.

The scheduler only decides; it never touches the model. `schedule()` returns the step's plan:
the sequences to prefill, grouped into calls, the chunks of long prompts (at most
`max_prefill_tokens` prompt tokens per step in all, so decoding is never stalled by a long
prompt), the samples forked from a prefilled prompt, and those cancelled since the last step.
Waiting sequences are admitted while a slot is free and the KV budget allows (each reserves prompt +
max_new_tokens, as TGI does, so no running sequence ever has to be evicted); after the
prefill, every running sequence decodes one token. `update_from_output()` applies the
token-level stops (end token, length); a sequence leaves at the step it finishes and its slot
is free for the next one at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service.params import FinishReason, GenerationRequest, QueueFull, TokenLogprob


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int  # max_new_tokens, capped so prompt + output fits the context and budget
    sample: int = 0  # which of the request's n samples
    fork_of: Sequence | None = None  # sample 0, whose prefilled cache this one may copy
    arrived: float = field(default_factory=time.perf_counter)
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache: a long prompt is prefilled in chunks
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asks
    cancelled: bool = False
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        # Sample 0 draws as a lone request with the same seed would; the others each their own.
        seed = self.request.seed
        self.rng = np.random.default_rng(
            seed if seed is None or not self.sample else [seed, self.sample]
        )

    @property
    def reserved(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def cached(self) -> int:
        """Tokens in the KV cache: the newest token is fed at the next step."""
        return self.prefilled + max(len(self.generated) - 1, 0)


@dataclass
class SchedulerOutput:
    prefill: list[list[Sequence]]  # one model call per group: consecutive slots
    chunks: list[tuple[Sequence, int, int]]  # (seq, start, end): part of a long prompt, alone
    forks: list[Sequence]  # admitted with their sample 0: copy its prompt's cache, no prefill
    cancelled: list[tuple[Sequence, int]]  # running sequences cancelled, and the slots freed


class Scheduler:
    def __init__(
        self,
        slots: int,
        eos_token_id: int,
        max_batch_total_tokens: int,
        max_queue: int,
        max_prefill_tokens: int,
        fork_prefills: bool = True,
    ) -> None:
        self.eos_token_id = eos_token_id
        self.fork_prefills = fork_prefills  # the runner can copy one slot's cache to another
        self.max_batch_total_tokens = max_batch_total_tokens
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.slots: list[Sequence | None] = [None] * slots
        self.waiting: deque[Sequence] = deque()
        self.reserved = 0
        self.wakeup = threading.Condition()  # submitters wake the engine loop

    def add(self, seqs: list[Sequence]) -> None:
        """Queue a request's samples together, or none of them."""
        with self.wakeup:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(seqs)
            self.wakeup.notify()

    def abort(self, seq: Sequence) -> bool:
        """Mark a sequence cancelled; True when it was still waiting and has left the queue
        (a running one frees its slot at the next `schedule()`)."""
        seq.cancelled = True
        with self.wakeup:
            self.wakeup.notify()
            if seq in self.waiting:
                self.waiting.remove(seq)
                seq.finish_reason = "cancelled"
                return True
            return False

    def wait_for_work(self) -> None:
        with self.wakeup:
            self.wakeup.wait_for(lambda: self.waiting or any(self.slots))

    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def schedule(self) -> SchedulerOutput:
        cancelled = [(s, self.finish(s, "cancelled")) for s in self.running() if s.cancelled]
        prefill_left = self.max_prefill_tokens
        chunks: list[tuple[Sequence, int, int]] = []
        for seq in self.running():  # prompts already being prefilled go first
            if seq.prefilling and prefill_left:
                end = min(len(seq.prompt_ids), seq.prefilled + prefill_left)
                chunks.append((seq, seq.prefilled, end))
                prefill_left -= end - seq.prefilled
        admitted: list[Sequence] = []
        granted: dict[Sequence, int] = {}  # prompt tokens each admitted one prefills now
        free = [slot for slot, seq in enumerate(self.slots) if seq is None]
        while seq := self._next_admissible(granted, len(free) - len(admitted), prefill_left):
            admitted.append(seq)
            prefill_left -= granted[seq]
        # Shortest first into the lowest free slots: neighbours pad little when grouped.
        admitted.sort(key=lambda s: len(s.prompt_ids))
        for seq, slot in zip(admitted, free, strict=False):
            seq.slot = slot
            self.slots[slot] = seq
        forks = [s for s in admitted if self._forks(s, granted)]
        whole = [s for s in admitted if s not in forks and granted[s] == len(s.prompt_ids)]
        chunks += [(s, 0, granted[s]) for s in admitted if 0 < granted[s] < len(s.prompt_ids)]
        return SchedulerOutput(prefill_groups(whole), chunks, forks, cancelled)

    def _forks(self, seq: Sequence, granted: dict[Sequence, int]) -> bool:
        """Whether the sequence starts from a copy of its sample 0's cache: both admitted in
        this step, and sample 0's whole prompt prefilled in it."""
        first = seq.fork_of
        return (
            self.fork_prefills
            and first is not None
            and granted.get(first, 0) == len(first.prompt_ids)
        )

    def _next_admissible(
        self, granted: dict[Sequence, int], free_slots: int, prefill_left: int
    ) -> Sequence | None:
        """Pop the head of the queue if it may start now, first come first served, and
        grant it the prompt tokens it prefills in this step (a long prompt gets what is left
        of the step's prefill budget, and the rest in the next steps)."""
        with self.wakeup:
            if not self.waiting or not free_slots:
                return None
            head = self.waiting[0]
            if self.reserved + head.reserved > self.max_batch_total_tokens:
                return None
            prefill = 0 if self._forks(head, granted) else len(head.prompt_ids)
            if prefill and not prefill_left:
                return None  # next step: this step's prefill budget is spent
            self.reserved += head.reserved
            granted[head] = min(prefill, prefill_left)
            return self.waiting.popleft()

    def update_from_output(self, seq: Sequence, token: int) -> FinishReason | None:
        """Take the sequence's new token; the reason it ends here, if it does (the end token
        is not kept)."""
        if token == self.eos_token_id and not seq.request.ignore_eos:
            return "stop"
        seq.generated.append(token)
        return "length" if len(seq.generated) >= seq.max_tokens else None

    def finish(self, seq: Sequence, reason: FinishReason) -> int:
        """Free the sequence's slot and budget; the slot it held, or -1."""
        slot = seq.slot
        if slot >= 0:
            self.slots[slot] = None
            self.reserved -= seq.reserved
            seq.slot = -1
        seq.finish_reason = reason
        return slot


def prefill_groups(admitted: list[Sequence]) -> list[list[Sequence]]:
    """Runs of consecutive slots (one call binds one block of the cache), split where a
    prompt is over twice the group's shortest (right padding would waste more than half)."""
    groups: list[list[Sequence]] = []
    for seq in admitted:
        group = groups[-1] if groups else []
        if (
            group
            and seq.slot == group[-1].slot + 1
            and len(seq.prompt_ids) <= 2 * len(group[0].prompt_ids)
        ):
            group.append(seq)
        else:
            groups.append([seq])
    return groups
