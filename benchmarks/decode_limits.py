"""What bounds a decode step: weight bandwidth at batch 1, the KV cache at long context, and
ONNX Runtime's threading. Each candidate change is measured here before it is kept.

  - read bandwidth: 1 GiB of float32 reduced by 2 threads (numpy), the best of 5
  - batch 1 bound: bytes of weights one token reads (every int8 matrix, the biases and norms)
    divided by that bandwidth, against the runner's measured decode rate
  - decode tok/s at 64 and 1023 cached tokens (the context is 1024), batch 1 and 32: the int8
    KV cache (the product's default) and the fp32 one (an fp16 cache, tried before the int8 one
    existed, is in BENCHMARKS.md's history)
  - threads: ONNX Runtime's spinning on (default) and off

The runner is timed directly (ModelRunner.decode over whatever the cache holds; attention
costs the same), 5 steps a round after a warm-up one, the median of 5 interleaved rounds.

  .venv/bin/python benchmarks/decode_limits.py --workdir /tmp/tailorgpt-engine-bench
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from engine import tailorgpt_export
from onnx import numpy_helper

from artifacts import VARIANT_FILES
from service.engine import ModelRunner, cpu_flags

THREADS, STEPS, ROUNDS = 2, 5, 5


def read_bandwidth() -> float:
    """Bytes per second that 2 threads read from memory."""
    data = np.ones(2**28, dtype=np.float32)
    halves = np.array_split(data, THREADS)
    best = 0.0
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(6):
            started = time.perf_counter()
            list(pool.map(np.max, halves))
            best = max(best, data.nbytes / (time.perf_counter() - started))
    return best


def bytes_per_token(model: Path) -> int:
    """Weights a decode step reads for one token: every initializer but the two embeddings,
    of which it gathers one row each (the int8 output projection is read whole)."""
    graph = onnx.load(model).graph
    skipped = {"wpe", "wte"}
    return sum(numpy_helper.to_array(t).nbytes for t in graph.initializer if t.name not in skipped)


def runner(model_dir: Path, kv_cache_dtype: str, spinning: bool = True) -> ModelRunner:
    model = ModelRunner(model_dir, "int8", 32, THREADS, kv_cache_dtype=kv_cache_dtype)
    if not spinning:  # the same model in a session whose idle threads sleep at once
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model.session = ort.InferenceSession(
            str(model_dir / VARIANT_FILES[model.graph]), options, providers=["CPUExecutionProvider"]
        )
        model.binding = model.session.io_binding()
    return model


def decode_seconds(model: ModelRunner, batch: int, cached: int) -> float:
    tokens, lengths = np.full(batch, 5), np.full(batch, cached)
    model.decode(tokens, lengths)  # warm-up
    started = time.perf_counter()
    for _ in range(STEPS):
        model.decode(tokens, lengths)
    return (time.perf_counter() - started) / STEPS


def rates(variants: dict[str, ModelRunner], batch: int, cached: int) -> dict[str, float]:
    """Median tok/s of each variant over interleaved rounds: a slow spell of a shared
    machine lands on all of them."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, model in variants.items():
            seconds[name].append(decode_seconds(model, batch, cached))
    return {name: batch / statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    args = parser.parse_args()
    model_dir = tailorgpt_export(args.workdir)
    print(f"CPU flags: {' '.join(cpu_flags())}; {THREADS} threads")
    bandwidth = read_bandwidth()
    weights = bytes_per_token(model_dir / "model_int8.onnx")
    bound = bandwidth / weights
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {weights / 1e6:.1f} MB of weights a token")
    variants = {
        "int8 cache (product)": runner(model_dir, "int8"),
        "int8 cache, no spinning": runner(model_dir, "int8", spinning=False),
        "fp32 cache": runner(model_dir, "fp32"),
    }
    shapes = [(1, 64), (1, 1023), (32, 64), (32, 1023)]  # 1023: the last position of 1024
    table = {shape: rates(variants, *shape) for shape in shapes}
    print("\n| variant | " + " | ".join(f"batch {b}, {c} cached: tok/s" for b, c in shapes) + " |")
    print("| --- |" + " --- |" * len(shapes))
    for name in variants:
        print(f"| {name} | " + " | ".join(f"{table[shape][name]:.1f}" for shape in shapes) + " |")
    product = [table[shape]["int8 cache (product)"] for shape in shapes]
    print(
        f"\nbatch 1 at 64 cached: {product[0]:.1f} tok/s = {product[0] / bound:.0%} of the "
        f"weight-bandwidth bound ({bound:.1f} tok/s)"
    )
    for name in variants:
        ratio = table[shapes[3]][name] / table[shapes[2]][name]
        print(f"{name}, batch 32: 1023 cached / 64 cached = {ratio:.2f}x")


if __name__ == "__main__":
    main()
