"""/livez's answer: whether the engine's loop thread runs (the service's __is_alive__ asks
LLMEngine.alive), so a server whose loop has died is restarted rather than left hanging."""

from __future__ import annotations

from pathlib import Path

from service.engine import GenerationRequest, LLMEngine


def test_alive_until_the_loop_thread_dies(export_dir: Path) -> None:
    engine = LLMEngine(export_dir, max_running=1, threads=1)
    assert engine.alive()

    def die() -> None:
        raise SystemExit  # not an Exception: step_safely lets it end the thread

    engine.core.step = die  # type: ignore[method-assign]
    engine.submit(GenerationRequest(prompt="The"), lambda event: None)  # wakes the loop
    engine.thread.join(timeout=30)
    assert not engine.alive()
