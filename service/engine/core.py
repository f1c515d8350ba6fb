"""The engine loop: runs the scheduler's plan on the model runner and samples each row.

One thread owns the loop; requests arrive from any thread through `submit` and `cancel`.
The model runner is anything with `run`, `fork` and `release` (service.engine.runner's
ModelRunner, or a fake in the scheduler's tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

from service.engine import metrics
from service.engine.lora import AdapterUnavailable
from service.engine.output import OutputProcessor
from service.engine.params import Event, FinishReason, QueueFull, TokenLogprob
from service.engine.runner import Chunk
from service.engine.sampling import choose, logprob_of, process
from service.engine.scheduler import Scheduler, SchedulerOutput, Sequence

log = logging.getLogger(__name__)


class Runner(Protocol):
    def run(self, chunks: list[Chunk]) -> list[np.ndarray]: ...
    def release(self, slot: int) -> None: ...
    def fork(self, source: int, target: int, tokens: int) -> None: ...


class EngineCore:
    def __init__(self, runner: Runner, scheduler: Scheduler, output: OutputProcessor) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.output = output
        self.labels = output.labels

    def submit(self, seqs: list[Sequence], on_events: list[Callable[[Event], None]]) -> None:
        """Queue a request's samples, each with its own event callback."""
        for seq, on_event in zip(seqs, on_events, strict=True):
            self.output.add(seq, on_event)
        try:
            self.scheduler.add(seqs)
        except QueueFull:
            for seq in seqs:
                self.output.discard(seq)
            metrics.REJECTED.labels(**self.labels, reason="queue_full").inc()
            raise
        metrics.QUEUE_LENGTH.labels(**self.labels).set(len(self.scheduler.waiting))

    def cancel(self, seq: Sequence) -> None:
        """A waiting sequence ends now; a running one frees its slot at the next step."""
        if self.scheduler.abort(seq):
            self.output.finish(seq, "cancelled")

    def run_forever(self) -> None:
        """The loop, until `stop()`."""
        while self.scheduler.wait_for_work():
            self.step_safely()

    def stop(self) -> None:
        self.scheduler.stop()

    def abort_all(self) -> None:
        """After the loop has ended: every request left gets its last event, so none of
        its callers waits forever."""
        for seq in self.scheduler.drain():
            self.output.finish(seq, "cancelled")

    def step_safely(self) -> None:
        """One step; if it raises, the sequences it ran end with "error" and the loop goes
        on: a broken step must not take the server down with it."""
        try:
            self.step()
        except AdapterUnavailable as err:  # before the step ran anything: the others go on
            log.error("adapter unavailable, its requests end: %s", err)
            for seq in self.scheduler.running():
                if seq.lora_id == err.lora_id:
                    self._finish(seq, "error")
        except Exception:
            log.exception("generation step failed")
            for seq in self.scheduler.running():
                self._finish(seq, "error")

    def step(self) -> None:
        plan = self.scheduler.schedule()
        for seq in plan.cancelled:
            self.output.finish(seq, "cancelled")
        for source, target, tokens in plan.copies:
            self.runner.fork(source, target, tokens)
        for slot in plan.released:
            self.runner.release(slot)
        self._run(plan)
        running = self.scheduler.running()
        metrics.RUNNING.labels(**self.labels).set(len(running))
        metrics.KV_CACHE_TOKENS.labels(**self.labels).set(sum(s.cached for s in running))
        metrics.KV_CACHE_RESERVED.labels(**self.labels).set(self.scheduler.reserved)
        if self.scheduler.prefix_cache:
            kept = self.scheduler.prefix_cache.tokens
            metrics.PREFIX_CACHE_TOKENS.labels(**self.labels).set(kept)
        metrics.QUEUE_LENGTH.labels(**self.labels).set(len(self.scheduler.waiting))

    def _run(self, plan: SchedulerOutput) -> None:
        """The step's prompt chunks and one token of every other running sequence, in one
        runner step; then each row's sample."""
        chunking = {seq for seq, _, _ in plan.chunks}
        decoding = [s for s in self.scheduler.running() if not s.prefilling and s not in chunking]
        rows = [
            Chunk(seq.slot, seq.prompt_ids[start:end], start, scored(seq), seq.lora_id)
            for seq, start, end in plan.chunks
        ]
        rows += [
            Chunk(seq.slot, seq.generated[-1:], seq.cached, lora_id=seq.lora_id) for seq in decoding
        ]
        if not rows:
            return
        logits = self.runner.run(rows)
        for (seq, start, end), chunk_logits in zip(plan.chunks, logits, strict=False):
            if scored(seq):
                self._score_prompt(seq, start, chunk_logits)
            self._prefilled(seq, end - start, chunk_logits[-1], plan.forks)
        for seq, row_logits in zip(decoding, logits[len(plan.chunks) :], strict=True):
            self._sample(seq, row_logits[-1])

    def _prefilled(
        self, seq: Sequence, tokens: int, logits: np.ndarray, forks: list[Sequence]
    ) -> None:
        """After a prefill call: once the whole prompt is in, its forks copy the cache and
        every sample draws its first token."""
        metrics.PROMPT_TOKENS.labels(**self.labels).inc(tokens)
        seq.prefilled += tokens
        if seq.prefilling:
            return
        metrics.PREFIX_CACHE_HITS.labels(**self.labels).inc(seq.reused)
        # Forks first: sampling may finish seq and free the slot they copy from.
        for fork in (f for f in forks if f.fork_of is seq):
            self.runner.fork(seq.slot, fork.slot, seq.prefilled)
            fork.prefilled = seq.prefilled
            self.output.first_token(fork)
            self._sample(fork, logits)
        self.output.first_token(seq)
        self._sample(seq, logits)

    def _score_prompt(self, seq: Sequence, start: int, logits: np.ndarray) -> None:
        """Log-probabilities of the prompt tokens after `start` that these logits predict
        (the first prompt token has none: nothing comes before it)."""
        if start == 0:
            seq.prompt_logprobs.append(TokenLogprob(seq.prompt_ids[0], None, []))
        top = seq.request.prompt_logprobs or 0
        for row, token in zip(logits, seq.prompt_ids[start + 1 :], strict=False):
            seq.prompt_logprobs.append(logprob_of(row, token, top))

    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        request = seq.request
        eos = self.scheduler.eos_token_id
        processed = process(logits, request, seq.prompt_ids, seq.generated, eos)
        if seq.matcher is not None:  # this row's grammar: only the tokens it allows
            allowed = seq.matcher.allowed()
            if not allowed.any():  # the grammar is broken: end here rather than draw nothing
                allowed[eos] = True
            processed = np.where(allowed, processed, -np.inf)
        token = choose(processed, request.temperature, request.top_k, request.top_p, seq.rng)
        reason = self.scheduler.update_from_output(seq, token)
        if reason == "stop":  # the end token: nothing new to show
            return self._finish(seq, reason)
        if seq.matcher is not None:
            seq.matcher.consume(token)
        if request.logprobs is not None:
            seq.logprobs.append(logprob_of(logits, token, request.logprobs))
        if self.output.process(seq) == "stop":
            return self._finish(seq, "stop", stopped_on_text=True)
        if reason is not None:
            self._finish(seq, reason)
        elif seq.matcher is not None and seq.matcher.done:  # the grammar takes no more
            self._finish(seq, "stop")

    def _finish(self, seq: Sequence, reason: FinishReason, stopped_on_text: bool = False) -> None:
        slot = self.scheduler.finish(seq, reason)
        if slot >= 0:
            self.runner.release(slot)
        self.output.finish(seq, reason, stopped_on_text)


def scored(seq: Sequence) -> bool:
    """Whether the request asks for its prompt's log-probabilities (every position's logits)."""
    return seq.request.prompt_logprobs is not None
