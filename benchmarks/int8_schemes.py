"""Which int8 scheme should the serving graph use? Measured on the same graph, same weights.

  - blockwise: onnxruntime's MatMulNBits quantizer on the fp32 serving graph (8-bit weights in
    blocks of 256, int8 arithmetic with activations quantized per row and block);
  - per-row: export.graph.build(int8=True) (int8 weights per column, activations per row,
    MatMulIntegerToFloat), what the export stage writes.
Decode steps of the model runner at batch 1 / 8 / 32 after 64 cached tokens, the two
alternating in 5 rounds (median); and whether a row's logits are bit-identical alone and
inside a batch of 8.

  .venv/bin/python benchmarks/int8_schemes.py --workdir /tmp/tailorgpt-engine-bench
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from service.runner import ModelRunner

CONTEXT, STEPS, ROUNDS = 64, 24, 5


def blockwise(workdir: Path) -> Path:
    out = workdir / "int8-blockwise"
    if not (out / "model_int8.onnx").is_file():
        out.mkdir(exist_ok=True)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
            logging.WARNING
        )
        quantizer = MatMulNBitsQuantizer(
            onnx.load(workdir / "tailorgpt" / "model.onnx"),
            bits=8,
            block_size=256,
            is_symmetric=True,
            accuracy_level=4,
        )
        quantizer.process()
        onnx.save(quantizer.model.model, out / "model_int8.onnx")
        shutil.copy(workdir / "tailorgpt" / "config.json", out / "config.json")
    return out


def decode_rate(runner: ModelRunner, batch: int) -> float:
    tokens = runner.prefill(0, [list(range(1, CONTEXT + 1))] * batch).argmax(-1)
    lengths = np.full(batch, CONTEXT)
    started = time.perf_counter()
    for step in range(STEPS):
        tokens = runner.decode(tokens, lengths + step).argmax(-1)
    return STEPS * batch / (time.perf_counter() - started)


def batch_invariant(runner: ModelRunner) -> bool:
    prompts = [list(range(i + 1, i + 20)) for i in range(8)]
    together = runner.prefill(0, prompts).copy()
    alone = runner.prefill(0, prompts[3:4])[0]
    return bool(np.array_equal(together[3], alone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    args = parser.parse_args()
    runners = {
        "blockwise (MatMulNBits)": ModelRunner(
            blockwise(args.workdir), "int8", slots=32, threads=2
        ),
        "per-row (served)": ModelRunner(args.workdir / "tailorgpt", "int8", slots=32, threads=2),
    }
    print(
        "| int8 scheme | batch 1 tok/s | batch 8 tok/s | batch 32 tok/s | row alone == in batch |"
    )
    print("| --- | --- | --- | --- | --- |")
    rates = {name: {b: [] for b in (1, 8, 32)} for name in runners}
    for batch in (1, 8, 32):
        for _ in range(ROUNDS):
            for name, runner in runners.items():
                rates[name][batch].append(decode_rate(runner, batch))
    for name, runner in runners.items():
        cells = " | ".join(f"{statistics.median(rates[name][b]):.0f}" for b in (1, 8, 32))
        print(f"| {name} | {cells} | {batch_invariant(runner)} |")


if __name__ == "__main__":
    main()
