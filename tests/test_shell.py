"""The BentoML shell's own logic, without a server: /livez's answer (the service's
__is_alive__ asks LLMEngine.alive), and a /generate batch that overflows the queue."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import MODEL_NAME

from service.engine import GenerationRequest, LLMEngine, QueueFull


def test_alive_until_the_loop_thread_dies(export_dir: Path) -> None:
    engine = LLMEngine(export_dir, max_running=1, threads=1)
    assert engine.alive()

    def die() -> None:
        raise SystemExit  # not an Exception: step_safely lets it end the thread

    engine.core.step = die  # type: ignore[method-assign]
    engine.submit(GenerationRequest(prompt="The"), lambda event: None)  # wakes the loop
    engine.thread.join(timeout=30)
    assert not engine.alive()


def test_a_batch_past_the_queue_waits_for_room(
    export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its callers each found room as they arrived (the middleware answers 503 to one that
    did not): merged into one batch, the ones past the bound wait rather than fail it."""
    monkeypatch.setenv("TAILORGPT_MODEL", f"tailorgpt-{MODEL_NAME}:latest")
    shell = importlib.import_module("service.server.service").TailorGPT.inner
    monkeypatch.setattr("service.server.service.QUEUE_POLL_SECONDS", 0.01)
    opened = object()

    class Full:
        tries = 0

        def open(self, request: GenerationRequest) -> list[object]:
            self.tries += 1
            if self.tries < 3:
                raise QueueFull("0 requests are waiting already")
            return [opened]

    engine = Full()
    stream = asyncio.run(shell._open(SimpleNamespace(engine=engine), GenerationRequest(prompt="x")))
    assert stream is opened and engine.tries == 3
