"""Which int8 scheme should the serving graph use? Speed and accuracy, same graph, same weights.

  - blockwise: onnxruntime's MatMulNBits quantizer on the fp32 serving graph (8-bit weights in
    blocks of 256, int8 arithmetic with activations quantized per row and block);
  - per-row, 8-bit weights: export.graph.build(int8=True, weight_levels=127), the scheme served
    until int8 was found to saturate on CPUs without VNNI;
  - per-row, 7-bit weights: export.graph.build(int8=True), what the export stage writes.

Speed: decode steps of the model runner at batch 1 / 8 / 32 after 64 cached tokens, the
schemes alternating in 5 rounds (median); whether a row's logits are bit-identical alone and in
a batch of 8. Accuracy: held-out corpus blocks decoded token by token against PyTorch fp32
(perplexity gap, max |logit diff|). With --emulate-avx2 the accuracy is measured a second time
with the int8 products computed as an AVX2-only CPU computes them: the runner runs under
`qemu-x86_64 -cpu Haswell` (Debian's qemu-user), whose CPU reports no AVX-512 and no VNNI, so
onnxruntime picks its AVX2 kernels. Emulated speed means nothing; only numerics are read there.

  .venv/bin/python benchmarks/int8_schemes.py --workdir /tmp/tailorgpt-engine-bench --emulate-avx2
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from engine import REPO, gpt2_124m
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from export.graph import build
from service.engine import ModelRunner
from service.engine.numerics import cpu_flags, decode_logits, nll, perplexity
from training.prepare import read_documents

CONTEXT, STEPS, ROUNDS = 64, 24, 5
HELDOUT_BLOCKS, HELDOUT_TOKENS = 8, 129  # native accuracy: 1,024 predicted tokens
EMULATED_BLOCKS, EMULATED_TOKENS = 2, 33  # under qemu, about 50x slower


def per_row(model: GPT2LMHeadModel, workdir: Path, levels: int) -> Path:
    out = workdir / f"int8-per-row-{levels}"
    if not (out / "model_int8.onnx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        onnx.save(build(model, int8=True, weight_levels=levels), out / "model_int8.onnx")
    return out


def blockwise(model: GPT2LMHeadModel, workdir: Path) -> Path:
    out = workdir / "int8-blockwise"
    if not (out / "model_int8.onnx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
            logging.WARNING
        )
        quantizer = MatMulNBitsQuantizer(
            build(model), bits=8, block_size=256, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        onnx.save(quantizer.model.model, out / "model_int8.onnx")
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


def heldout(model_dir: Path) -> np.ndarray:
    """Consecutive corpus blocks of HELDOUT_TOKENS tokens."""
    tokenizer = GPT2TokenizerFast.from_pretrained(model_dir)
    ids = tokenizer("\n\n".join(read_documents([REPO / "samples" / "corpus"]))).input_ids
    usable = HELDOUT_BLOCKS * HELDOUT_TOKENS
    return np.array(ids[:usable]).reshape(HELDOUT_BLOCKS, HELDOUT_TOKENS)


def accuracy(logits: np.ndarray, reference: np.ndarray, blocks: np.ndarray) -> str:
    tokens = logits.shape[0] * logits.shape[1]
    gap = perplexity(nll(logits, blocks), tokens) / perplexity(nll(reference, blocks), tokens)
    return f"{100 * (gap - 1):+.3f}% / {np.abs(logits - reference).max():.3f}"


def emulated_logits(model_dir: Path, blocks: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        ids, out = Path(tmp) / "ids.npy", Path(tmp) / "logits.npy"
        np.save(ids, blocks)
        command = [
            "qemu-x86_64",
            "-cpu",
            "Haswell",
            sys.executable,
            "-m",
            "service.engine.numerics",
        ]
        subprocess.run(
            [*command, str(model_dir), str(ids), str(out)],
            check=True,
            cwd=REPO,
            stderr=subprocess.DEVNULL,  # qemu lists the host features it does not emulate
        )
        return np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    parser.add_argument("--emulate-avx2", action="store_true", help="needs qemu-x86_64")
    args = parser.parse_args()
    model_dir = gpt2_124m(args.workdir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    dirs = {
        "blockwise (MatMulNBits)": blockwise(model, args.workdir),
        "per-row, 8-bit weights (before)": per_row(model, args.workdir, 127),
        "per-row, 7-bit weights (served)": per_row(model, args.workdir, 63),
    }
    for path in dirs.values():
        shutil.copy(model_dir / "config.json", path / "config.json")
    blocks = heldout(model_dir)
    with torch.no_grad():
        reference = model(torch.from_numpy(blocks)).logits.numpy()[:, :-1]
    print(f"CPU flags: {' '.join(cpu_flags())}", flush=True)

    runners = {name: ModelRunner(path, "int8", slots=32, threads=2) for name, path in dirs.items()}
    rates: dict[str, dict[int, list[float]]] = {name: {1: [], 8: [], 32: []} for name in runners}
    for batch in (1, 8, 32):
        for _ in range(ROUNDS):
            for name, runner in runners.items():
                rates[name][batch].append(decode_rate(runner, batch))
    emulated = blocks[:EMULATED_BLOCKS, :EMULATED_TOKENS]
    header = "| int8 scheme | batch 1 / 8 / 32 tok/s | row alone == in batch "
    header += f"| perplexity gap / max abs logit diff on {blocks[:, 1:].size} tokens, this CPU "
    if args.emulate_avx2:
        sample = f"on {EMULATED_BLOCKS * (EMULATED_TOKENS - 1)} of those tokens"
        header += f"| same {sample}, this CPU | same {sample}, emulated AVX2 (no VNNI) "
        header += "| max abs logit diff, emulated AVX2 vs this CPU "
    print(header + "|")
    print("| --- " * (7 if args.emulate_avx2 else 4) + "|")
    for name, runner in runners.items():
        speed = " / ".join(f"{statistics.median(rates[name][b]):.0f}" for b in (1, 8, 32))
        logits = decode_logits(ModelRunner(dirs[name], "int8", slots=HELDOUT_BLOCKS), blocks)
        row = f"| {name} | {speed} | {batch_invariant(runner)} "
        row += f"| {accuracy(logits, reference, blocks)} "
        if args.emulate_avx2:
            there = emulated_logits(dirs[name], emulated)
            here = logits[:EMULATED_BLOCKS, : EMULATED_TOKENS - 1]
            small = reference[:EMULATED_BLOCKS, : EMULATED_TOKENS - 1]
            row += f"| {accuracy(here, small, emulated)} | {accuracy(there, small, emulated)} "
            row += f"| {np.abs(there - here).max():.2g} "
        print(row + "|", flush=True)


if __name__ == "__main__":
    main()
