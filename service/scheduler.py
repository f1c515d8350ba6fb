"""Who runs each step: iteration-level (continuous) batching, as in Orca, vLLM and TGI.

Every step, waiting sequences are admitted while a slot is free and the KV budget allows
(each reserves prompt + max_new_tokens, as TGI does, so no running sequence ever has to be
evicted), their prompts are prefilled, and then one decode step runs for every running
sequence. A sequence leaves at the step it finishes or is cancelled, and its slot is free for
the next one at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import metrics
from service.runner import ModelRunner
from service.sampling import choose, penalize_repetition
from service.text import IncrementalDecoder

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later."""


@dataclass
class Event:
    """New text for one request; the last event of a request carries its finish_reason."""

    text: str
    finish_reason: str | None  # stop | length | cancelled | error, on the last event
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Sequence:
    request: Any  # service.engine.GenerationRequest
    prompt_ids: list[int]
    max_tokens: int  # max_new_tokens, capped so prompt + output fits the context
    decoder: IncrementalDecoder
    on_event: Callable[[Event], None]
    arrived: float = field(default_factory=time.perf_counter)
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already delivered
    first_token_at: float = 0.0
    cancelled: bool = False
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.request.seed)

    @property
    def reserved(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    @property
    def cached(self) -> int:
        """Tokens in the KV cache: the newest token is fed at the next step."""
        return len(self.prompt_ids) + len(self.generated) - 1


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        eos_token_id: int,
        model_name: str,
        max_batch_total_tokens: int,
        max_queue: int,
        max_prefill_tokens: int,
    ) -> None:
        self.runner = runner
        self.eos_token_id = eos_token_id
        self.labels = {"model": model_name}
        self.max_batch_total_tokens = max_batch_total_tokens
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.slots: list[Sequence | None] = [None] * runner.slots
        self.waiting: deque[Sequence] = deque()
        self.reserved = 0
        self.wakeup = threading.Condition()

    def submit(self, seq: Sequence) -> None:
        with self.wakeup:
            if len(self.waiting) >= self.max_queue:
                metrics.REJECTED.labels(**self.labels, reason="queue_full").inc()
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(seq)
            metrics.QUEUE_LENGTH.labels(**self.labels).set(len(self.waiting))
            self.wakeup.notify()

    def cancel(self, seq: Sequence) -> None:
        """A waiting sequence leaves the queue now; a running one frees its slot at the next
        step."""
        seq.cancelled = True
        with self.wakeup:
            if seq in self.waiting:
                self.waiting.remove(seq)
                self._finish(seq, "cancelled")
            self.wakeup.notify()

    def run_forever(self) -> None:
        while True:
            with self.wakeup:
                self.wakeup.wait_for(lambda: self.waiting or any(self.slots))
            try:
                self.step()
            except Exception:  # a broken step must not take the server down with it
                log.exception("generation step failed")
                for seq in [s for s in self.slots if s is not None]:
                    self._finish(seq, "error")

    def step(self) -> None:
        for seq in [s for s in self.slots if s is not None and s.cancelled]:
            self._finish(seq, "cancelled")
        self._admit()
        self._decode()
        running = [s for s in self.slots if s is not None]
        metrics.RUNNING.labels(**self.labels).set(len(running))
        metrics.KV_CACHE_TOKENS.labels(**self.labels).set(sum(s.cached for s in running))
        metrics.KV_CACHE_RESERVED.labels(**self.labels).set(self.reserved)
        metrics.QUEUE_LENGTH.labels(**self.labels).set(len(self.waiting))

    def _next_admissible(self, free_slots: int, prefill_left: int, first: bool) -> Sequence | None:
        """Pop the head of the queue if it may start now; first come, first served."""
        with self.wakeup:
            if not self.waiting or not free_slots:
                return None
            head = self.waiting[0]
            if self.reserved + head.reserved > self.max_batch_total_tokens:
                return None
            if not first and len(head.prompt_ids) > prefill_left:
                return None  # next step: a long prefill stalls every running sequence
            self.reserved += head.reserved
            return self.waiting.popleft()

    def _admit(self) -> None:
        """Admit what fits, then prefill it in as few calls as possible: the weights are read
        once per call, so prompts prefilled together cost little more than one."""
        admitted: list[Sequence] = []
        prefill_left = self.max_prefill_tokens
        free = [slot for slot, seq in enumerate(self.slots) if seq is None]
        while seq := self._next_admissible(len(free) - len(admitted), prefill_left, not admitted):
            admitted.append(seq)
            prefill_left -= len(seq.prompt_ids)
        # Shortest first into the lowest free slots: neighbours pad little when grouped.
        admitted.sort(key=lambda s: len(s.prompt_ids))
        for seq, slot in zip(admitted, free, strict=False):
            seq.slot = slot
            self.slots[slot] = seq
        for group in _prefill_groups(admitted):
            logits = self.runner.prefill(group[0].slot, [s.prompt_ids for s in group])
            for seq, row in zip(group, logits, strict=True):
                metrics.PROMPT_TOKENS.labels(**self.labels).inc(len(seq.prompt_ids))
                self._accept(seq, row)

    def _decode(self) -> None:
        running = [s for s in self.slots if s is not None]
        if not running:
            return
        rows = max(s.slot for s in running) + 1  # free slots below the top run as filler
        tokens = np.zeros(rows, dtype=np.int64)
        lengths = np.zeros(rows, dtype=np.int32)
        for seq in running:
            tokens[seq.slot] = seq.generated[-1]
            lengths[seq.slot] = seq.cached
        logits = self.runner.decode(tokens, lengths)
        for seq in running:
            self._accept(seq, logits[seq.slot])

    def _accept(self, seq: Sequence, logits: np.ndarray) -> None:
        """Pick the sequence's next token, extend its text, and finish it if it is done."""
        request = seq.request
        if request.repetition_penalty != 1.0:
            logits = logits.copy()
            seen = np.unique(np.array(seq.prompt_ids + seq.generated))
            penalize_repetition(logits, seen, request.repetition_penalty)
        token = choose(logits, request.temperature, request.top_k, request.top_p, seq.rng)
        if not seq.generated:
            seq.first_token_at = time.perf_counter()
            metrics.TIME_TO_FIRST_TOKEN.labels(**self.labels).observe(
                seq.first_token_at - seq.arrived
            )
        if token == self.eos_token_id and not request.ignore_eos:
            return self._finish(seq, "stop")
        seq.generated.append(token)
        searched_from = max(0, len(seq.text) - max((len(s) for s in request.stop), default=0))
        seq.text += seq.decoder.push(token)
        stops = [i for s in request.stop if (i := seq.text.find(s, searched_from)) >= 0]
        if stops:
            seq.text = seq.text[: min(stops)]
            return self._finish(seq, "stop", flush=False)
        if len(seq.generated) >= seq.max_tokens:
            return self._finish(seq, "length")
        ready = len(seq.text) - _held_back(seq.text, request.stop)
        if ready > seq.sent:
            self._deliver(seq, seq.text[seq.sent : ready], None)

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        if seq.slot >= 0:
            self.slots[seq.slot] = None
            self.runner.cache.release(seq.slot)
            self.reserved -= seq.reserved
            seq.slot = -1
        if flush:
            seq.text += seq.decoder.flush()
        seq.finish_reason = reason
        now, produced = time.perf_counter(), len(seq.generated)
        metrics.GENERATED_TOKENS.labels(**self.labels).inc(produced)
        metrics.REQUESTS.labels(**self.labels, finish_reason=reason).inc()
        metrics.REQUEST_SECONDS.labels(**self.labels).observe(now - seq.arrived)
        if produced > 1:
            tpot = (now - seq.first_token_at) / (produced - 1)
            metrics.TIME_PER_OUTPUT_TOKEN.labels(**self.labels).observe(tpot)
        self._deliver(seq, seq.text[seq.sent :], reason)

    def _deliver(self, seq: Sequence, text: str, finish_reason: str | None) -> None:
        seq.sent += len(text)
        seq.on_event(Event(text, finish_reason, len(seq.prompt_ids), len(seq.generated)))


def _prefill_groups(admitted: list[Sequence]) -> list[list[Sequence]]:
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


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that may be the start of a stop string: not sent yet."""
    return max(
        (
            k
            for s in stops
            for k in range(min(len(s) - 1, len(text)), 0, -1)
            if text.endswith(s[:k])
        ),
        default=0,
    )
