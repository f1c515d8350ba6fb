"""The generation engine: plain Python + onnxruntime, usable and testable without BentoML.

    engine = LLMEngine("exports/mine")                       # starts its loop thread
    engine.generate([GenerationRequest(prompt="Hello")])     # blocking, many at once
    for event in engine.stream(GenerationRequest(prompt="Hello")): print(event.text, end="")
    [stream] = engine.open(request)                          # asyncio: what the routes use
    with stream:
        async for event in stream: ...
    engine.shutdown()                                        # ends the loop thread (or: with)

Inside, as in vLLM: the scheduler decides who runs each step (service/engine/scheduler.py), the
engine core runs that plan on the model runner and samples (service/engine/core.py), and the output
processor turns tokens into text and events (service/engine/output.py). Requests arrive from any
thread; one loop thread batches them continuously.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from artifacts import KV_CACHE_DTYPES, VARIANT_FILES, graph_name
from service.engine import metrics
from service.engine.core import EngineCore
from service.engine.lora import AdapterError, Adapters, Base
from service.engine.numerics import recheck
from service.engine.output import OutputProcessor, request_stats
from service.engine.params import (
    SCHEDULING_POLICIES,
    Event,
    Generation,
    GenerationRequest,
    ModelInfo,
    QueueFull,
    RequestError,
    RequestStats,
)
from service.engine.runner import ModelRunner
from service.engine.scheduler import Scheduler, Sequence
from service.engine.structured import Grammars
from service.engine.text import TextCodec

DEFAULT_KV_CACHE_MEMORY_MB = 1024
# Every adapter is padded to the stacks' rank, and a step's LoRA work grows with it: 8 is
# tailorgpt's and peft's default rank (vLLM's 16 cost GPT-2 124M 6% more per decoding step of
# 32 adapters, and twice the memory); a higher-rank adapter says to raise it.
DEFAULT_MAX_LORAS, DEFAULT_MAX_LORA_RANK = 64, 8
MiB = 2**20


def auto_kv_cache_dtype(model_dir: Path, variant: str, device: str) -> str:
    """int8 for the int8 variant on the CPU where the export has its int8-cache graph
    (parity.json measures it; README's "KV cache" says why); else the variant's own float
    type: who serves fp32 weights wants their exact numerics."""
    int8_graph = model_dir / VARIANT_FILES[graph_name("int8", "int8")]
    return "int8" if (variant, device) == ("int8", "cpu") and int8_graph.is_file() else "fp32"


@dataclass(frozen=True)
class MemoryPlan:
    """What the KV cache and the weights may take, from the model, the cache type and the
    settings: what a pod's memory request is planned on."""

    kv_cache_dtype: str
    bytes_per_token: int
    budget: int  # tokens: prompt + max_new_tokens summed over the running sequences
    cache_bytes: int  # the most the cache takes: the budget's tokens (pages follow use)
    weights_bytes: int
    max_loras: int = 0  # adapters the stacks hold (0: LoRA off)
    lora_bytes: int = 0  # the most they take (pages follow the adapters loaded)

    @classmethod
    def of(cls, runner: ModelRunner, slots: int, budget: int | None, memory_mb: int) -> MemoryPlan:
        """The budget given, or what `memory_mb` of cache holds (at most every slot full)."""
        per_token = runner.cache.bytes_per_token
        if budget is None:
            budget = max(2, min(slots * runner.context, memory_mb * MiB // per_token))
        dtype = {1: "int8", 2: "fp16", 4: "fp32"}[runner.cache.dtype.itemsize]
        stack = runner.adapters
        return cls(
            dtype,
            per_token,
            budget,
            budget * per_token,
            runner.weights_bytes,
            stack.slots if stack else 0,
            stack.slots * stack.slot_bytes if stack else 0,
        )

    def __str__(self) -> str:
        return (
            f"KV cache {self.kv_cache_dtype}, {self.bytes_per_token:,} bytes a token: a budget "
            f"of {self.budget:,} tokens takes at most {self.cache_bytes / MiB:,.1f} MiB; "
            f"weights {self.weights_bytes / MiB:,.1f} MiB"
            + (
                f"; LoRA: {self.max_loras} adapters take at most {self.lora_bytes / MiB:,.1f} "
                f"MiB, the LoRA graph's weights {self.weights_bytes / MiB:,.1f} MiB more"
                if self.max_loras
                else ""
            )
        )


class LLMEngine:
    def __init__(
        self,
        model_dir: Path,
        variant: str = "int8",
        *,
        threads: int | None = None,
        device: str = "cpu",
        max_running: int = 32,
        kv_cache_dtype: str = "auto",
        max_batch_total_tokens: int | None = None,
        kv_cache_memory_mb: int = DEFAULT_KV_CACHE_MEMORY_MB,
        max_queue: int = 256,
        max_prefill_tokens: int = 512,
        enable_prefix_caching: bool = True,
        name: str | None = None,
        scheduling_policy: str = "fcfs",
        enable_lora: bool = False,
        lora_modules: Mapping[str, Path] | None = None,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
    ) -> None:
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy: one of {SCHEDULING_POLICIES}")
        model_dir = Path(model_dir)
        self.codec = TextCodec(model_dir)
        if kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ValueError(f"kv_cache_dtype: one of auto, {', '.join(KV_CACHE_DTYPES)}")
        if kv_cache_dtype == "auto":
            kv_cache_dtype = auto_kv_cache_dtype(model_dir, variant, device)
        self.runner = ModelRunner(
            model_dir,
            variant,
            slots=max_running,
            threads=threads,
            device=device,
            kv_cache_dtype=kv_cache_dtype,
        )
        # int8 numerics on a CPU unlike the exporter's
        recheck(self.runner, model_dir, self.runner.graph)
        self.info = ModelInfo(name or model_dir.name, self.runner.context, variant, device, "")
        self.adapters: Adapters | None = None
        if enable_lora or lora_modules:
            self.adapters = Adapters(Base.of(model_dir), max_lora_rank, self.info.name)
            self.adapters.stack = self.runner.enable_lora(
                max_loras, max_lora_rank, self.adapters.read, self.info.name
            )
            for adapter_name, path in (lora_modules or {}).items():
                self.load_lora_adapter(adapter_name, Path(path))
        self.context = self.runner.context
        self.memory = MemoryPlan.of(
            self.runner, max_running, max_batch_total_tokens, kv_cache_memory_mb
        )
        self.max_batch_total_tokens = self.memory.budget
        self.scheduler = Scheduler(
            max_running,
            self.runner.eos_token_id,
            self.max_batch_total_tokens,
            max_queue,
            max_prefill_tokens,
            can_copy=device == "cpu",  # a cache on the GPU is not copied from Python
            enable_prefix_caching=enable_prefix_caching,
            policy=scheduling_policy,
            max_loras=max_loras if self.adapters else 0,
        )
        self.grammars = Grammars(
            (model_dir / "tokenizer.json").read_text(encoding="utf-8"),
            self.runner.vocab_size,
            self.runner.eos_token_id,
        )
        self.info.kv_cache_dtype = kv_cache_dtype
        self.output = OutputProcessor(self.codec, self.info.name)
        self.core = EngineCore(self.runner, self.scheduler, self.output)
        self.thread = threading.Thread(target=self.core.run_forever, name="engine", daemon=True)
        self.thread.start()
        metrics.MODEL_INFO.labels(self.info.name, variant, device).set(1)

    @property
    def max_queue(self) -> int:
        """The most requests (samples) that may wait; past it, QueueFull."""
        return self.scheduler.max_queue

    def shutdown(self) -> None:
        """Stop the loop thread (after the step it is in) and wait for it; the requests
        left end with "cancelled". Calling it again does nothing."""
        self.core.stop()
        self.thread.join()
        self.core.abort_all()  # the loop has ended: nothing else touches the scheduler

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()

    def alive(self) -> bool:
        """Whether the loop thread runs: without it nothing is ever generated."""
        return self.thread.is_alive()

    def queue_full(self) -> bool:
        return len(self.scheduler.waiting) >= self.max_queue

    def load_lora_adapter(self, name: str, path: Path) -> None:
        """Serve the adapter at `path` as model `name` from now on; AdapterError (nothing
        changes) if it cannot be. Waits at most for the step the engine is in."""
        if self.adapters is None:
            raise AdapterError("this engine serves no adapters: start it with enable_lora")
        if name == self.info.name:
            raise AdapterError(
                f"lora_name: {name!r} is the base model's name: give the adapter its own"
            )
        self.adapters.load(name, path)

    def unload_lora_adapter(self, name: str) -> None:
        """Requests may no longer name it; those running with it finish with it."""
        if self.adapters is None:
            raise AdapterError("this engine serves no adapters: start it with enable_lora")
        self.adapters.unload(name)

    def lora_adapters(self) -> list[str]:
        """The names of the adapters served, in the order they were loaded."""
        return list(self.adapters.by_name) if self.adapters else []

    def lora_id(self, model: str | None) -> int:
        """The adapter a request's `model` names, 0 for the base; RequestError for another."""
        if model is None or model == self.info.name:
            return 0
        lora_id = self.adapters.lora_id(model) if self.adapters else None
        if lora_id is None:
            served = ", ".join([self.info.name, *self.lora_adapters()])
            raise RequestError(f"model: {model!r} is not served here; these are: {served}")
        return lora_id

    def tokenize(self, text: str) -> list[int]:
        """The token ids a text prompt runs as."""
        return self.codec.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        """The text of these token ids; RequestError for an id outside the vocabulary."""
        vocab = self.runner.vocab_size
        if outside := [i for i in ids if not 0 <= i < vocab]:
            raise RequestError(f"tokens: token ids {outside[:5]} are not in 0..{vocab - 1}")
        return self.codec.decode(ids)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; RequestError, saying what to change, if it cannot run."""
        vocab = self.runner.vocab_size
        if outside := [i for i in request.logit_bias if not 0 <= i < vocab]:
            raise RequestError(f"logit_bias: token ids {outside[:5]} are not in 0..{vocab - 1}")
        if outside := [i for i in request.stop_token_ids if not 0 <= i < vocab]:
            raise RequestError(f"stop_token_ids: token ids {outside[:5]} are not in 0..{vocab - 1}")
        if request.priority and self.scheduler.policy != "priority":
            raise RequestError(
                f"priority: {request.priority} is given, but this server schedules first come "
                "first served: leave priority out, or serve with "
                "TAILORGPT_SCHEDULING_POLICY=priority"
            )
        if isinstance(request.prompt, list):
            ids = request.prompt
            if outside := [i for i in ids if not 0 <= i < vocab]:
                raise RequestError(f"prompt: token ids {outside[:5]} are not in 0..{vocab - 1}")
        else:
            ids = self.codec.encode(request.prompt)
        if request.structured_outputs is not None:
            self.grammars.grammar(request.structured_outputs)  # compiled once, and checked
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
        """Queue a request; `on_event` is called from the engine thread with its text.

        Raises RequestError for a request that cannot run, QueueFull when the queue is full.
        """
        return self.submit_samples(request, [on_event])[0]

    def submit_samples(
        self, request: GenerationRequest, on_events: list[Callable[[Event], None]]
    ) -> list[Sequence]:
        """Queue one sample of the request per callback (OpenAI's `n`): the prompt is
        prefilled once and the other samples start from a copy of its cache."""
        ids = self.prompt_ids(request)
        lora_id = self.lora_id(request.model)
        max_tokens = min(
            request.max_new_tokens, self.context - len(ids), self.max_batch_total_tokens - len(ids)
        )
        first = Sequence(request, ids, max_tokens)
        forks = [Sequence(request, ids, max_tokens, i, first) for i in range(1, len(on_events))]
        for seq in [first, *forks]:
            seq.lora_id = lora_id
            if request.structured_outputs is not None:  # each sample its own grammar state
                seq.matcher = self.grammars.matcher(request.structured_outputs)
        self.core.submit([first, *forks], on_events)
        return [first, *forks]

    def cancel(self, seq: Sequence) -> None:
        self.core.cancel(seq)

    def open(self, request: GenerationRequest, n: int = 1) -> list[AsyncStream]:
        """Submit n samples now (RequestError and QueueFull are raised here, before any
        response starts) and return their events for asyncio code; call from the event loop."""
        streams = [AsyncStream(self) for _ in range(n)]
        samples = self.submit_samples(request, [s.put for s in streams])
        for stream, seq in zip(streams, samples, strict=True):
            stream.seq = seq
        return streams

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        """Events as they come, blocking; leaving the loop early cancels the request and
        returns once the engine has let go of it (within a step), so the caller may exit at
        once: exiting during a step aborts the process in onnxruntime."""
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
        """Whole completions for many requests at once, in their order (blocking)."""
        finished: queue.SimpleQueue[tuple[int, Generation]] = queue.SimpleQueue()
        submitted: list[Sequence] = []
        try:
            for index, request in enumerate(requests):
                submitted.append(self.submit(request, collector(index, finished.put)))
        except (QueueFull, RequestError):
            for seq in submitted:
                self.cancel(seq)
            raise
        results = dict(finished.get() for _ in submitted)
        return [results[i] for i in range(len(submitted))]


def collector(
    index: int, done: Callable[[tuple[int, Generation]], None]
) -> Callable[[Event], None]:
    """An event callback that gathers one request's text and hands over the whole answer.

    Only the last event wakes the waiting side: a wake-up per token would take CPU from the
    model on a small machine.
    """
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if event.finish_reason is not None:
            done((index, generation(events)))

    return on_event


def generation(events: list[Event]) -> Generation:
    """One request's answer from all its events."""
    last = events[-1]
    return Generation(
        text="".join(e.text for e in events),
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        finish_reason=last.finish_reason or "cancelled",
        logprobs=[entry for e in events for entry in e.logprobs] or None,
        prompt_logprobs=events[0].prompt_logprobs,
    )


class AsyncStream:
    """One request's events in asyncio: `async for event in stream`, or `await
    stream.result()`. Cancellation lives here and only here: leaving the `with` block (a
    client gone, a task cancelled, an error) cancels a request that has not finished."""

    seq: Sequence

    def __init__(self, engine: LLMEngine) -> None:
        self.loop = asyncio.get_running_loop()
        self.engine = engine
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.final: RequestStats | None = None

    def put(self, event: Event) -> None:
        """From the engine thread."""
        if event.stats:
            self.final = event.stats
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def stats(self) -> RequestStats:
        """The request's numbers: those of its last event, or so far while it runs (its
        client has left, say)."""
        return self.final or request_stats(self.seq)

    def __enter__(self) -> AsyncStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.seq.finish_reason is None:
            self.engine.cancel(self.seq)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            # A reader that fell behind gets what is waiting as one event, not one per token.
            while event.finish_reason is None and not self.events.empty():
                following = self.events.get_nowait()
                following.text = event.text + following.text
                following.logprobs = event.logprobs + following.logprobs
                following.prompt_logprobs = event.prompt_logprobs or following.prompt_logprobs
                event = following
            yield event
            if event.finish_reason is not None:
                return

    async def result(self) -> Generation:
        return generation([event async for event in self])
