"""The generation engine: plain Python + onnxruntime, usable and testable without BentoML.

    engine = LLMEngine("exports/mine")                       # starts its scheduler thread
    engine.generate([GenerationRequest(prompt="Hello")])     # blocking, many at once
    for event in engine.stream(GenerationRequest(prompt="Hello")): print(event.text, end="")

Requests arrive from any thread (`submit` with a callback that receives each `Event`); one
scheduler thread batches them continuously over the model runner.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from service.runner import ModelRunner
from service.scheduler import Event, QueueFull, Scheduler, Sequence
from service.text import IncrementalDecoder, TextCodec

__all__ = ["Event", "Generation", "GenerationRequest", "LLMEngine", "QueueFull", "RequestError"]
MAX_NEW_TOKENS_LIMIT = 4096


class GenerationRequest(BaseModel):
    prompt: str = Field(min_length=1, description="Text to continue; must not be empty.")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_k: int = Field(0, ge=0, description="Keep only the k likeliest tokens; 0 keeps all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1 means none.")
    stop: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Strings that end the output (not included in it).",
    )
    seed: int | None = Field(None, description="Makes sampled output reproducible.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")


class Generation(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled", "error"]


class RequestError(ValueError):
    """A request this engine cannot run; the message says what to change."""


class LLMEngine:
    def __init__(
        self,
        model_dir: Path,
        variant: str = "int8",
        *,
        threads: int | None = None,
        device: str = "cpu",
        max_running: int = 32,
        max_batch_total_tokens: int = 16384,
        max_queue: int = 256,
        max_prefill_tokens: int = 512,
        name: str | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        self.codec = TextCodec(model_dir)
        self.runner = ModelRunner(
            model_dir, variant, slots=max_running, threads=threads, device=device
        )
        self.context = self.runner.context
        self.max_batch_total_tokens = max_batch_total_tokens
        self.scheduler = Scheduler(
            self.runner,
            int(config["eos_token_id"]),
            name or model_dir.name,
            max_batch_total_tokens,
            max_queue,
            max_prefill_tokens,
        )
        threading.Thread(target=self.scheduler.run_forever, name="scheduler", daemon=True).start()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; RequestError, saying what to change, if it cannot run."""
        ids = self.codec.encode(request.prompt)
        if not ids:
            raise RequestError("prompt encodes to no tokens: send some text")
        if len(ids) >= self.context:
            raise RequestError(
                f"prompt is {len(ids)} tokens; this model's context is {self.context} tokens "
                f"(prompt plus output): shorten the prompt to under {self.context} tokens"
            )
        if len(ids) + 1 > self.max_batch_total_tokens:
            raise RequestError(
                f"prompt is {len(ids)} tokens, over the server's KV budget of "
                f"{self.max_batch_total_tokens}: shorten it, or raise max_batch_total_tokens"
            )
        return ids

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Sequence:
        """Queue a request; `on_event` is called from the scheduler thread with its text.

        Raises RequestError for a request that cannot run, QueueFull when the queue is full.
        """
        ids = self.prompt_ids(request)
        max_tokens = min(
            request.max_new_tokens, self.context - len(ids), self.max_batch_total_tokens - len(ids)
        )
        seq = Sequence(request, ids, max_tokens, IncrementalDecoder(self.codec), on_event)
        self.scheduler.submit(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        self.scheduler.cancel(seq)

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """Events as they come; leaving the loop early cancels the request and returns once
        the scheduler has let go of it (within a step), so the caller may exit at once:
        exiting during a step aborts the process in onnxruntime."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        seq = self.submit(request, events.put)
        try:
            while (event := events.get()).finish_reason is None:
                yield event
            yield event
        finally:
            if seq.finish_reason is None:
                self.cancel(seq)
                while events.get().finish_reason is None:
                    pass

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Whole completions for many requests at once, in their order."""
        finished: queue.SimpleQueue[Event] = queue.SimpleQueue()
        submitted: list[Sequence] = []

        def on_event(event: Event) -> None:
            # Only the last event wakes this thread: a wake-up per token would take CPU
            # from the model on a small machine.
            if event.finish_reason is not None:
                finished.put(event)

        try:
            for request in requests:
                submitted.append(self.submit(request, on_event))
        except (QueueFull, RequestError):
            for seq in submitted:
                self.cancel(seq)
            raise
        for _ in submitted:
            finished.get()
        return [
            Generation(
                text=seq.text,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.generated),
                finish_reason=seq.finish_reason,
            )
            for seq in submitted
        ]
