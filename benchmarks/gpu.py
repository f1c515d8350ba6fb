"""GPU variant of the engine benchmark: this project's model runner on CUDA (fp16 serving
graph, KV cache and IOBinding on the device) against transformers + PyTorch fp16 `generate`
on the same GPU. Random-init GPT-2 124M (seed 0), prompt 32 tokens, 64 new tokens, greedy,
EOS ignored, batch 1 / 8 / 32; warm-up, then the median of 3 runs. A few minutes on one GPU.

  PYTHONPATH=. python3 benchmarks/gpu.py --workdir /tmp/tailorgpt-gpu [--json results.json]

Needs onnxruntime-gpu (`pip install onnxruntime-gpu`) and a CUDA build of torch; without the
CUDA execution provider it says so and measures the PyTorch baseline alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from export.graph import build
from service.engine import ModelRunner

PROMPT_TOKENS, NEW_TOKENS, RUNS = 32, 64, 3


def timed(run: object, runs: int = RUNS) -> float:
    run()  # type: ignore[operator]  # warm-up
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def engine_run(runner: ModelRunner, prompts: np.ndarray) -> None:
    """Prefill the prompts into slots 0..n-1 in one call, then decode greedily, EOS ignored."""
    tokens = runner.prefill(0, prompts.tolist()).argmax(-1)
    lengths = np.full(len(prompts), PROMPT_TOKENS, dtype=np.int32)
    for step in range(NEW_TOKENS - 1):
        tokens = runner.decode(tokens, lengths + step).argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batches", default="1,8,32")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = GPT2Config()
    model = GPT2LMHeadModel(config).eval()
    onnx.save(build(model, "float16"), args.workdir / "model_fp16.onnx")
    config.save_pretrained(args.workdir)
    model = model.half().cuda()
    providers = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in providers
    runner = (
        ModelRunner(args.workdir, "fp16", slots=max(batches), device="cuda") if has_cuda else None
    )
    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__}; onnxruntime {ort.__version__} {providers}")
    rng = np.random.default_rng(0)
    if runner is not None:  # same weights, same answer: the fp16 graph against PyTorch fp16
        probe = rng.integers(0, config.vocab_size, PROMPT_TOKENS)
        with torch.no_grad():
            expected = model(torch.from_numpy(probe)[None].cuda()).logits[0, -1].float().cpu()
        got = runner.prefill(0, [probe.tolist()])[0]
        print(f"max |logit diff| vs PyTorch fp16: {np.abs(got - expected.numpy()).max():.4f}")
    results = {"device": device, "onnxruntime_providers": providers, "tokens_per_second": {}}
    for batch in batches:
        prompts = rng.integers(0, config.vocab_size, (batch, PROMPT_TOKENS))
        ids = torch.from_numpy(prompts).cuda()

        def torch_run(ids: torch.Tensor = ids) -> None:
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    pad_token_id=0,
                )
            torch.cuda.synchronize()

        row = {"transformers fp16": batch * NEW_TOKENS / timed(torch_run)}
        if runner is not None:
            row["tailorgpt fp16"] = (
                batch * NEW_TOKENS / timed(lambda p=prompts: engine_run(runner, p))
            )
        results["tokens_per_second"][batch] = row
        print(
            f"batch {batch}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in row.items()), flush=True
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
