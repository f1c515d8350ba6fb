"""Who runs each step: iteration-level (continuous) batching, as in Orca, vLLM and TGI.

The scheduler only decides; it never touches the model. `schedule()` returns the step's plan:
the prompt chunks to prefill (whole prompts, or parts of long ones: at most
`max_prefill_tokens` prompt tokens per step in all, so decoding is never stalled by a long
prompt), the samples forked from a prefilled prompt, the cached prompt starts to copy
(service/engine/prefix_cache.py), and those cancelled since the last step. The running
sequences that are not prefilling decode one token in the same step: the runner puts them and
the prompt chunks in one graph call (a mixed step) where that costs no more.
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
from typing import Any

import numpy as np

from service.engine.params import FinishReason, GenerationRequest, QueueFull, TokenLogprob
from service.engine.prefix_cache import Hit, PrefixCache, longest_prefix


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int  # max_new_tokens, capped so prompt + output fits the context and budget
    sample: int = 0  # which of the request's n samples
    fork_of: Sequence | None = None  # sample 0, whose prefilled cache this one may copy
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0  # when it got a slot (perf_counter), 0 while waiting
    first_token_at: float = 0.0
    lora_id: int = 0  # its LoRA adapter's (service/engine/lora.py), 0 for the base model
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache: a long prompt is prefilled in chunks
    reused: int = 0  # of those, found in the prefix cache rather than prefilled
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asks
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # likewise
    cancelled: bool = False
    finish_reason: FinishReason | None = None
    matcher: Any = None  # its grammar's state (structured.Matcher) when the request has one

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
    chunks: list[tuple[Sequence, int, int]]  # (seq, start, end): prompt positions to prefill
    forks: list[Sequence]  # admitted with their sample 0: copy its prompt's cache, no prefill
    copies: list[tuple[int, int, int]]  # (source, target, positions): a cached prefix, first
    cancelled: list[Sequence]  # running sequences cancelled since the last step
    released: list[int]  # slots whose cache memory goes back to the system, after the copies


class Scheduler:
    def __init__(
        self,
        slots: int,
        eos_token_id: int,
        max_batch_total_tokens: int,
        max_queue: int,
        max_prefill_tokens: int,
        can_copy: bool = True,
        enable_prefix_caching: bool = True,
        policy: str = "fcfs",
        max_loras: int = 0,
    ) -> None:
        self.eos_token_id = eos_token_id
        self.max_loras = max_loras  # the most adapters running at once: the runner's stacks
        self.policy = policy  # "priority": lower `priority` first, then first come
        self.can_copy = can_copy  # the runner can copy one slot's cache to another
        self.max_batch_total_tokens = max_batch_total_tokens
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.slots: list[Sequence | None] = [None] * slots
        self.waiting: deque[Sequence] = deque()
        self.reserved = 0
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        self.wakeup = threading.Condition()  # submitters wake the engine loop
        self.stopped = False

    def add(self, seqs: list[Sequence]) -> None:
        """Queue a request's samples together, or none of them."""
        with self.wakeup:
            if self.stopped:  # no loop would ever run them
                raise RuntimeError("the engine is shut down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            if self.policy == "priority":
                # Behind every waiting one of the same or a lower priority; a request's
                # samples stay together (its forks are admitted with their first).
                rank = seqs[0].request.priority
                at = next(
                    (i for i, w in enumerate(self.waiting) if w.request.priority > rank),
                    len(self.waiting),
                )
                for offset, seq in enumerate(seqs):
                    self.waiting.insert(at + offset, seq)
            else:
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

    def wait_for_work(self) -> bool:
        """Block until there is something to run; False once stopped."""
        with self.wakeup:
            self.wakeup.wait_for(lambda: self.stopped or self.waiting or any(self.slots))
            return not self.stopped

    def stop(self) -> None:
        """Refuse new sequences and wake the loop so that it ends."""
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify()

    def drain(self) -> list[Sequence]:
        """Once stopped and the loop has ended: every sequence left, waiting or running,
        finished as cancelled."""
        with self.wakeup:
            left = [*self.waiting, *self.running()]
            self.waiting.clear()
        for seq in left:
            self.finish(seq, "cancelled")
        return left

    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def schedule(self) -> SchedulerOutput:
        cancelled = [s for s in self.running() if s.cancelled]
        released = [slot for s in cancelled if (slot := self.finish(s, "cancelled")) >= 0]
        prefill_left = self.max_prefill_tokens
        chunks: list[tuple[Sequence, int, int]] = []
        for seq in self.running():  # prompts already being prefilled go first
            if seq.prefilling and prefill_left:
                end = min(len(seq.prompt_ids), seq.prefilled + prefill_left)
                chunks.append((seq, seq.prefilled, end))
                prefill_left -= end - seq.prefilled
        admitted: list[Sequence] = []
        ends: dict[Sequence, int] = {}  # prompt position each admitted one is prefilled to
        hits: dict[Sequence, Hit] = {}
        free = [slot for slot, seq in enumerate(self.slots) if seq is None]
        while seq := self._next_admissible(ends, hits, len(free) - len(admitted), prefill_left):
            admitted.append(seq)
            seq.admitted = time.perf_counter()
            prefill_left -= ends[seq] - (hits[seq].tokens if seq in hits else 0)
        copies = self._place(admitted, hits, free)
        forks = [s for s in admitted if self._forks(s, ends)]
        chunks += [(s, s.prefilled, ends[s]) for s in admitted if s not in forks]
        if self.prefix_cache:
            released += self.prefix_cache.evict(self.max_batch_total_tokens - self.reserved)
        return SchedulerOutput(chunks, forks, copies, cancelled, released)

    def _place(
        self, admitted: list[Sequence], hits: dict[Sequence, Hit], free: list[int]
    ) -> list[tuple[int, int, int]]:
        """Give each admitted sequence a slot: a hit's own slot when it takes it, else the
        lowest free slot that keeps nothing, then the least recently kept (low slots keep a
        step's calls narrow). The copies that cached prefixes need."""
        taken = {hit.slot for hit in hits.values() if hit.in_place}
        kept_at = self.prefix_cache.kept_at if self.prefix_cache else lambda slot: 0.0
        pool = deque(sorted((s for s in free if s not in taken), key=kept_at))
        copies = []
        for seq in admitted:
            hit = hits.get(seq)
            seq.slot = hit.slot if hit and hit.in_place else pool.popleft()
            self.slots[seq.slot] = seq
            if self.prefix_cache:
                self.prefix_cache.take(seq.slot)
            if hit:
                seq.prefilled = seq.reused = hit.tokens
                if not hit.in_place:
                    copies.append((hit.slot, seq.slot, hit.tokens))
        return copies

    def _forks(self, seq: Sequence, ends: dict[Sequence, int]) -> bool:
        """Whether the sequence starts from a copy of its sample 0's cache: both admitted in
        this step, and sample 0's whole prompt prefilled in it."""
        first = seq.fork_of
        return self.can_copy and first is not None and ends.get(first) == len(first.prompt_ids)

    def _lookup(self, seq: Sequence, hits: dict[Sequence, Hit]) -> Hit | None:
        """The longest cached start of the sequence's prompt: in a free slot it can take,
        or, when the runner can copy, in any slot that holds one (running ones too)."""
        if self.prefix_cache is None or seq.request.prompt_logprobs is not None:
            return None  # prompt log-probabilities need every prompt position run
        taken = {hit.slot for hit in hits.values() if hit.in_place}
        kept = self.prefix_cache.candidates(taken, seq.lora_id)
        slot, tokens = longest_prefix(seq.prompt_ids, kept)
        if slot >= 0:
            return Hit(slot, tokens, in_place=True)
        if not self.can_copy:
            return None
        caches = self.prefix_cache.candidates(set(), seq.lora_id) | {
            s.slot: np.asarray((s.prompt_ids + s.generated)[: s.cached])
            for s in self.running()
            if s.cached and s.lora_id == seq.lora_id
        }
        slot, tokens = longest_prefix(seq.prompt_ids, caches)
        return Hit(slot, tokens, in_place=False) if slot >= 0 else None

    def _next_admissible(
        self,
        ends: dict[Sequence, int],
        hits: dict[Sequence, Hit],
        free_slots: int,
        prefill_left: int,
    ) -> Sequence | None:
        """Pop the head of the queue if it may start now, first come first served, and
        say how far its prompt is prefilled in this step (a cached start costs nothing; a
        long prompt gets what is left of the step's prefill budget, and the rest in the
        next steps)."""
        with self.wakeup:
            if not free_slots:
                return None
            # One whose adapter waits for a row of the stacks (max_loras running) keeps its
            # place; the next behind it may start, as vLLM skips such a request.
            adapters = {s.lora_id for s in [*self.running(), *ends] if s.lora_id}
            head = next(
                (
                    s
                    for s in self.waiting
                    if not s.lora_id or s.lora_id in adapters or len(adapters) < self.max_loras
                ),
                None,
            )
            if head is None or self.reserved + head.reserved > self.max_batch_total_tokens:
                return None
            if self._forks(head, ends):
                start, end = 0, 0
            else:
                hit = self._lookup(head, hits)
                start = hit.tokens if hit else 0
                if not prefill_left:
                    return None  # next step: this step's prefill budget is spent
                end = min(len(head.prompt_ids), start + prefill_left)
                if hit:
                    hits[head] = hit
            self.reserved += head.reserved
            ends[head] = end
            self.waiting.remove(head)
            return head

    def update_from_output(self, seq: Sequence, token: int) -> FinishReason | None:
        """Take the sequence's new token; the reason it ends here, if it does (the end token
        is not kept)."""
        request = seq.request
        if (token == self.eos_token_id and not request.ignore_eos) or (
            token in request.stop_token_ids
        ):
            return "stop"
        seq.generated.append(token)
        return "length" if len(seq.generated) >= seq.max_tokens else None

    def finish(self, seq: Sequence, reason: FinishReason) -> int:
        """Free the sequence's slot and budget; the slot if its cache memory should go back
        to the system now, else -1 (it held none, or it keeps its tokens for prompts that
        start as this one did)."""
        slot, seq.finish_reason = seq.slot, reason
        if slot < 0:
            return -1
        self.slots[slot] = None
        self.reserved -= seq.reserved
        seq.slot = -1
        if self.prefix_cache is None or reason == "error" or not seq.cached:
            return slot  # nothing worth keeping: a failed step's cache is suspect
        self.prefix_cache.keep(slot, (seq.prompt_ids + seq.generated)[: seq.cached], seq.lora_id)
        return -1
