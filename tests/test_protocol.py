"""What the engine promises its callers, and what the server promises its clients.

The engine: a request's last event carries its stats, and `shutdown()` ends the loop thread
with a last event for every request left.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.engine import Event, GenerationRequest, LLMEngine


def test_the_last_event_carries_the_requests_stats(export_dir: Path) -> None:
    with LLMEngine(export_dir, max_running=1, threads=1) as engine:
        request = GenerationRequest(prompt="The", max_new_tokens=5, ignore_eos=True)
        *events, last = engine.stream(request)
    assert all(e.stats is None for e in events)
    stats = last.stats
    assert stats is not None and stats.finish_reason == last.finish_reason == "length"
    assert (stats.prompt_tokens, stats.completion_tokens) == (last.prompt_tokens, 5)
    assert stats.queue_seconds is not None and stats.ttft_seconds is not None
    assert 0 <= stats.queue_seconds <= stats.ttft_seconds


def test_shutdown_ends_the_loop_thread_and_the_requests_left(export_dir: Path) -> None:
    engine = LLMEngine(export_dir, max_running=1, threads=1)
    decode, decoding = engine.runner.decode, threading.Event()

    def decode_until_stopped(*args: np.ndarray) -> np.ndarray:
        """The running request cannot finish before shutdown: its step waits for it."""
        decoding.set()
        while not engine.scheduler.stopped:
            time.sleep(0.01)
        return decode(*args)

    engine.runner.decode = decode_until_stopped  # type: ignore[method-assign]
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    long = GenerationRequest(prompt="The", max_new_tokens=100, ignore_eos=True)
    with engine:
        for _ in range(3):  # one running, two waiting
            engine.submit(long, events.put)
        assert decoding.wait(timeout=30)
    assert not engine.thread.is_alive() and not engine.alive()
    finished = []
    while not events.empty():
        finished += [reason] if (reason := events.get().finish_reason) else []
    assert finished == ["cancelled"] * 3
    engine.shutdown()  # again: nothing to do
    with pytest.raises(RuntimeError):
        engine.submit(long, events.put)
