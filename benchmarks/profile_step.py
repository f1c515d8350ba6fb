"""Where does a decode step spend its time? ONNX Runtime's profiler by operator type, and the
step measured three ways: the session alone, the runner (bindings, logits copy), the whole
engine (scheduler, sampling, detokenization, events) per step.

  .venv/bin/python benchmarks/profile_step.py --workdir /tmp/tailorgpt-engine-bench
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from artifacts import VARIANT_FILES
from service.engine import GenerationRequest, LLMEngine, ModelRunner

CONTEXT, STEPS = 64, 32


def fill(runner: ModelRunner, batch: int) -> tuple[np.ndarray, np.ndarray]:
    runner.prefill(0, [list(range(1, CONTEXT + 1))] * batch)
    return np.ones(batch, dtype=np.int64), np.full(batch, CONTEXT, dtype=np.int32)


def per_step(run: object) -> float:
    run()  # type: ignore[operator]
    started = time.perf_counter()
    for _ in range(STEPS):
        run()  # type: ignore[operator]
    return (time.perf_counter() - started) / STEPS * 1000


def operators(model: Path, batch: int, workdir: Path) -> dict[str, float]:
    """Share of operator time per type in decode steps at this batch."""
    runner = ModelRunner(model.parent, "int8", slots=batch, threads=2)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile-b{batch}")
    runner.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    runner.binding = runner.session.io_binding()
    tokens, lengths = fill(runner, batch)
    for _ in range(STEPS):
        runner.decode(tokens, lengths)
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    whole = sum(totals.values())
    return {op: us / whole for op, us in totals.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    args = parser.parse_args()
    model_dir = args.workdir / "tailorgpt"
    engine = LLMEngine(model_dir, "int8", threads=2, max_running=32)
    runner = engine.runner
    for batch in (1, 32):
        tokens, lengths = fill(runner, batch)
        binding = runner.binding
        runner.decode(tokens, lengths)  # leaves this batch's bindings in place
        session_ms = per_step(lambda b=binding: runner.session.run_with_iobinding(b))
        runner_ms = per_step(lambda t=tokens, n=lengths: runner.decode(t, n))
        request = GenerationRequest(
            prompt="The " * CONTEXT, max_new_tokens=4 * STEPS, temperature=0, ignore_eos=True
        )
        started = time.perf_counter()
        produced = sum(g.completion_tokens for g in engine.generate([request] * batch))
        engine_ms = (time.perf_counter() - started) / (produced / batch) * 1000
        shares = operators(model_dir / VARIANT_FILES["int8"], batch, args.workdir)
        print(
            f"batch {batch}: session {session_ms:.1f} ms/step, runner {runner_ms:.1f}, "
            f"engine {engine_ms:.1f} (prefill included)"
        )
        print(
            "  operators: "
            + ", ".join(f"{op} {share:.0%}" for op, share in shares.items() if share >= 0.005)
        )


if __name__ == "__main__":
    main()
