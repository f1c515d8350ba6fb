"""From tokens to what a client sees: incremental text, stop strings, events and metrics.

Stop strings are applied here, on text, not in the scheduler: a stop string can span tokens,
and its first characters are held back while they may be its start, so they are never sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from service.engine import metrics
from service.engine.params import Event, FinishReason, RequestStats
from service.engine.scheduler import Sequence
from service.engine.text import IncrementalDecoder, TextCodec


@dataclass(eq=False)
class Delivery:
    """What one request has been told so far."""

    decoder: IncrementalDecoder
    on_event: Callable[[Event], None]
    text: str = ""
    sent: int = 0  # characters of text already delivered
    logprobs_sent: int = 0  # entries of the sequence's logprobs already delivered
    first_sent: bool = False


class OutputProcessor:
    def __init__(self, codec: TextCodec, model_name: str) -> None:
        self.codec = codec
        self.labels = {"model": model_name}
        self.deliveries: dict[Sequence, Delivery] = {}

    def add(self, seq: Sequence, on_event: Callable[[Event], None]) -> None:
        self.deliveries[seq] = Delivery(IncrementalDecoder(self.codec), on_event)

    def discard(self, seq: Sequence) -> None:
        """Forget a sequence that never ran (its request was refused)."""
        del self.deliveries[seq]

    def text(self, seq: Sequence) -> str:
        return self.deliveries[seq].text

    def first_token(self, seq: Sequence) -> None:
        seq.first_token_at = time.perf_counter()
        metrics.TIME_TO_FIRST_TOKEN.labels(**self.labels).observe(seq.first_token_at - seq.arrived)

    def process(self, seq: Sequence) -> FinishReason | None:
        """Detokenize the sequence's newest token; "stop" when a stop string has appeared
        (the text is cut before it), else send what can no longer be part of one."""
        delivery, stops = self.deliveries[seq], seq.request.stop
        searched_from = max(0, len(delivery.text) - max((len(s) for s in stops), default=0))
        delivery.text += delivery.decoder.push(seq.generated[-1])
        found = [(i, s) for s in stops if (i := delivery.text.find(s, searched_from)) >= 0]
        if found:
            at, stop = min(found)
            kept = at + len(stop) if seq.request.include_stop_str_in_output else at
            delivery.text = delivery.text[:kept]
            return "stop"
        ready = len(delivery.text) - held_back(delivery.text, stops)
        if ready > delivery.sent:
            self._deliver(seq, delivery, ready, None)
        return None

    def finish(self, seq: Sequence, reason: FinishReason, stopped_on_text: bool = False) -> None:
        """The last event: the rest of the text (flushed unless a stop string cut it) and
        the request's metrics."""
        delivery = self.deliveries.pop(seq)
        if not stopped_on_text:
            delivery.text += delivery.decoder.flush()
        now, produced = time.perf_counter(), len(seq.generated)
        metrics.GENERATED_TOKENS.labels(**self.labels).inc(produced)
        metrics.REQUESTS.labels(**self.labels, finish_reason=reason).inc()
        metrics.REQUEST_SECONDS.labels(**self.labels).observe(now - seq.arrived)
        metrics.OUTPUT_LENGTH.labels(**self.labels).observe(produced)
        if not seq.sample:  # n samples of one prompt: one prompt
            metrics.PROMPT_LENGTH.labels(**self.labels).observe(len(seq.prompt_ids))
        if seq.lora_id:
            adapter = {**self.labels, "adapter": seq.request.model}
            metrics.LORA_GENERATED_TOKENS.labels(**adapter).inc(produced)
            if not seq.sample:
                metrics.LORA_REQUESTS.labels(**adapter).inc()
                metrics.LORA_PROMPT_TOKENS.labels(**adapter).inc(len(seq.prompt_ids))
        # One cancelled while it waited counts its whole wait (it never got a slot).
        waited = (seq.admitted or now) - seq.arrived
        metrics.QUEUE_SECONDS.labels(**self.labels).observe(waited)
        if produced > 1:
            tpot = (now - seq.first_token_at) / (produced - 1)
            metrics.TIME_PER_OUTPUT_TOKEN.labels(**self.labels).observe(tpot)
        self._deliver(seq, delivery, len(delivery.text), reason)

    def _deliver(
        self, seq: Sequence, delivery: Delivery, upto: int, reason: FinishReason | None
    ) -> None:
        first, delivery.first_sent = not delivery.first_sent, True
        text, delivery.sent = delivery.text[delivery.sent : upto], upto
        logprobs = seq.logprobs[delivery.logprobs_sent :]
        delivery.logprobs_sent = len(seq.logprobs)
        prompt_logprobs = seq.prompt_logprobs if first and seq.prompt_logprobs else None
        delivery.on_event(
            Event(
                text,
                reason,
                len(seq.prompt_ids),
                len(seq.generated),
                logprobs,
                prompt_logprobs,
                request_stats(seq) if reason else None,
            )
        )


def request_stats(seq: Sequence) -> RequestStats:
    """The sequence's numbers so far: final once it has finished."""
    return RequestStats(
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=len(seq.generated),
        queue_seconds=seq.admitted - seq.arrived if seq.admitted else None,
        ttft_seconds=seq.first_token_at - seq.arrived if seq.first_token_at else None,
        finish_reason=seq.finish_reason,
        sample=seq.sample,
    )


def held_back(text: str, stops: list[str]) -> int:
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
