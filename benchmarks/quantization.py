"""Which int8 graph should the export stage make? Measured, not guessed.

Random-init GPT-2 124M (seed 0), exported once with optimum, then:
  - fp32: the plain export;
  - int8-dynamic: onnxruntime quantize_dynamic (per-tensor activation scales), what
    optimum's ORTQuantizer and most guides produce;
  - int8-blockwise: export.onnx.quantize_int8 (8-bit weights in blocks of 32, int8
    arithmetic with per-row, per-block activation scales; MatMulNBits).
Each decodes with the same engine (service.engine), prompt 32 tokens, 64 new tokens,
greedy, at batch 1 and 8; transformers + PyTorch `generate` is the baseline. Also
reported: how often a prompt's greedy text is identical alone and inside a batch.

  .venv/bin/python benchmarks/quantization.py --workdir /tmp/tailorgpt-bench
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

import service.engine as engine_module
from export.onnx import quantize_int8
from service.engine import GenerationRequest, OnnxGenerator
from training.data import read_documents
from training.model import build_tiny

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS, NEW_TOKENS, BATCHES, RUNS = 32, 64, (1, 8), 3


def prepare(workdir: Path) -> Path:
    """Save the 124M weights once, export them, and make both int8 graphs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from optimum.exporters.onnx import main_export

    model_dir, onnx_dir = workdir / "gpt2-124m", workdir / "onnx"
    if not (onnx_dir / "model_int8_dynamic.onnx").is_file():
        # Tokenizer from the bundled corpus (no hub here); its ids are valid GPT-2 ids.
        build_tiny(read_documents(REPO / "samples" / "corpus"), workdir / "tok", seed=0)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(model_dir)
        GPT2TokenizerFast.from_pretrained(workdir / "tok").save_pretrained(model_dir)
        main_export(
            str(model_dir), output=onnx_dir, task="text-generation-with-past", do_validation=False
        )
        quantize_int8(onnx_dir / "model.onnx", onnx_dir / "model_int8.onnx")
        quantize_dynamic(
            onnx_dir / "model.onnx",
            onnx_dir / "model_int8_dynamic.onnx",
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    return onnx_dir


def prompts(engine: OnnxGenerator, n: int) -> list[str]:
    text = " ".join(read_documents(REPO / "samples" / "corpus"))
    ids = engine.encode(text)
    return [engine.tokenizer.decode(ids[i * 40 : i * 40 + PROMPT_TOKENS]) for i in range(n)]


def median_tokens_per_second(run) -> float:
    run()  # warm-up
    rates = []
    for _ in range(RUNS):
        started = time.perf_counter()
        tokens = run()
        rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def bench_onnx(onnx_dir: Path, variant: str) -> dict[str, float]:
    engine = OnnxGenerator(onnx_dir, variant=variant)
    result = {}
    for batch in BATCHES:
        requests = [
            GenerationRequest(prompt=p, max_new_tokens=NEW_TOKENS, temperature=0)
            for p in prompts(engine, batch)
        ]
        result[f"batch {batch}"] = median_tokens_per_second(
            lambda r=requests: sum(g.completion_tokens for g in engine.generate(r))
        )
    requests = [
        GenerationRequest(prompt=p, max_new_tokens=16, temperature=0) for p in prompts(engine, 8)
    ]
    alone = [engine.generate([r])[0].text for r in requests]
    batched = [g.text for g in engine.generate(requests)]
    result["alone == batched"] = sum(a == b for a, b in zip(alone, batched, strict=True)) / 8
    return result


def bench_pytorch(model_dir: Path, onnx_dir: Path) -> dict[str, float]:
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    engine = OnnxGenerator(onnx_dir, variant="fp32")
    result = {}
    for batch in BATCHES:
        ids = torch.tensor([engine.encode(p)[:PROMPT_TOKENS] for p in prompts(engine, batch)])

        def run(ids: torch.Tensor = ids) -> int:
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    pad_token_id=0,
                )
            return (out.shape[1] - ids.shape[1]) * ids.shape[0]

        result[f"batch {batch}"] = median_tokens_per_second(run)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-bench"))
    args = parser.parse_args()
    onnx_dir = prepare(args.workdir)
    engine_module.VARIANT_FILES["int8-dynamic"] = "model_int8_dynamic.onnx"
    rows = {"transformers + PyTorch fp32": bench_pytorch(args.workdir / "gpt2-124m", onnx_dir)}
    for variant, label in [
        ("fp32", "fp32"),
        ("int8-dynamic", "int8 dynamic (per tensor)"),
        ("int8", "int8 blockwise (served)"),
    ]:
        rows[f"ONNX Runtime {label}"] = bench_onnx(onnx_dir, variant)
    baseline = rows["transformers + PyTorch fp32"]
    print(
        f"| engine | {' | '.join(f'batch {b} tok/s (ratio)' for b in BATCHES)} | alone == batched |"
    )
    print("| --- |" + " --- |" * (len(BATCHES) + 1))
    for name, row in rows.items():
        cells = [
            f"{row[f'batch {b}']:.1f} ({row[f'batch {b}'] / baseline[f'batch {b}']:.2f}x)"
            for b in BATCHES
        ]
        invariant = f"{row['alone == batched']:.0%}" if "alone == batched" in row else "-"
        print(f"| {name} | {' | '.join(cells)} | {invariant} |")
    for variant, file_name in [
        ("fp32", "model.onnx"),
        ("int8 dynamic", "model_int8_dynamic.onnx"),
        ("int8 blockwise", "model_int8.onnx"),
    ]:
        print(f"size {variant}: {(onnx_dir / file_name).stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
