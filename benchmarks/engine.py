"""This engine against its peers, all in one run on one machine (DESIGN.md's protocol).

Random-init GPT-2 124M (seed 0, saved once), the same 32-token prompts for every engine,
64 new tokens, greedy, EOS ignored, batch 1 / 8 / 32; a warm-up round, then the median of 5
rounds, each timing every engine once in turn.
  - transformers + PyTorch fp32 `generate`
  - optimum ORTModelForCausalLM fp32, and int8 (ORTQuantizer, dynamic, avx512-vnni)
  - CTranslate2 int8 (its converter on the same weights)
  - llama.cpp q8_0 (llama-batched-bench, its own timing of prompt plus generation; built from
    source once, benchmarks/llama_cpp_peer.py)
  - this engine (service.engine.LLMEngine) fp32, and int8 with its int8 KV cache (the
    default) and with an fp32 one, text in and text out
Every engine runs on 2 threads. Reported: the median and the spread (lowest-highest) of the
rounds, the ratios to both peers, and the CPU flags.

  .venv/bin/pip install -e '.[bench]'
  .venv/bin/python benchmarks/engine.py --workdir /tmp/tailorgpt-engine-bench

optimum's rows run where optimum-onnx imports: its newest release (0.1.0) pins transformers
4.57, which the project (transformers 5) cannot share a venv with, so `bench` leaves it out and
the run says that it skipped them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp_peer
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from artifacts import VARIANT_FILES
from export.onnx import export
from service.engine import GenerationRequest, LLMEngine, cpu_flags
from training.model import build_tiny
from training.prepare import read_documents

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS, NEW_TOKENS, BATCHES, RUNS, THREADS = 32, 64, (1, 8, 32), 5, 2
PEERS = ("CTranslate2 int8", "llama.cpp q8_0")
Run = Callable[[list[list[int]]], tuple[int, float]]  # prompts -> (new tokens, seconds)

# optimum 2 (the card's package) installs without its ONNX Runtime part (optimum-onnx).
HAVE_OPTIMUM = bool(
    importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.onnxruntime")
)


def timed(generate: Callable[[list[list[int]]], int]) -> Run:
    def run(prompts: list[list[int]]) -> tuple[int, float]:
        started = time.perf_counter()
        produced = generate(prompts)
        return produced, time.perf_counter() - started

    return run


def gpt2_124m(workdir: Path) -> Path:
    """Random-init GPT-2 124M (seed 0) with a tokenizer, saved once; its directory."""
    model_dir = workdir / "gpt2-124m"
    if not (model_dir / "tokenizer.json").is_file():
        # Tokenizer from the bundled corpus (no hub here); its ids are valid GPT-2 ids.
        build_tiny(read_documents([REPO / "samples" / "corpus"]), workdir / "tok", seed=0)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).eval()
        model.save_pretrained(model_dir)
        tokenizer = GPT2TokenizerFast.from_pretrained(workdir / "tok")
        # CTranslate2's converter wants one vocabulary entry per embedding row: pad with
        # tokens that never occur in text.
        tokenizer.add_tokens(
            [f"<unused{i}>" for i in range(len(tokenizer), model.config.vocab_size)]
        )
        tokenizer.save_pretrained(model_dir)
    return model_dir


def optimum_engines(workdir: Path) -> dict[str, Callable[[], Run]]:
    if not HAVE_OPTIMUM:
        print("optimum-onnx is not installed here (see the docstring): its rows are skipped")
        return {}
    from optimum.onnxruntime import ORTModelForCausalLM

    return {
        "optimum fp32": lambda: hf_generate(
            ORTModelForCausalLM.from_pretrained(workdir / "optimum")
        ),
        "optimum int8 (dynamic)": lambda: hf_generate(
            ORTModelForCausalLM.from_pretrained(
                workdir / "optimum-int8", file_name="model_quantized.onnx"
            )
        ),
    }


def prepare(workdir: Path) -> Path:
    """Weights once; then each engine's own conversion of them (each kept for the next run)."""
    model_dir = gpt2_124m(workdir)
    if HAVE_OPTIMUM and not (workdir / "optimum-int8").is_dir():
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        main_export(
            str(model_dir),
            output=workdir / "optimum",
            task="text-generation-with-past",
            do_validation=False,
        )
        quantizer = ORTQuantizer.from_pretrained(workdir / "optimum", file_name="model.onnx")
        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
        quantizer.quantize(save_dir=workdir / "optimum-int8", quantization_config=config)
    if not (workdir / "ct2-int8").is_dir():
        import ctranslate2.converters

        ctranslate2.converters.TransformersConverter(str(model_dir)).convert(
            str(workdir / "ct2-int8"), quantization="int8"
        )
    tailorgpt_export(workdir)
    llama_cpp_peer.convert(model_dir, workdir / "llama-q8_0.gguf")
    return model_dir


def tailorgpt_export(workdir: Path) -> Path:
    """This project's export of gpt2_124m (`tailorgpt export`: fp32 and int8, each with an
    fp32 and an int8 KV cache), made once; its directory."""
    model_dir = gpt2_124m(workdir)
    tailor = workdir / "tailorgpt"
    if not (tailor / VARIANT_FILES["int8_kv_int8"]).is_file():
        shutil.rmtree(tailor, ignore_errors=True)  # an older export's graphs
        export(model_dir, tailor)
    return tailor


def llama_cpp_generate(gguf: Path) -> Run:
    def run(prompts: list[list[int]]) -> tuple[int, float]:
        return llama_cpp_peer.batched_bench(gguf, len(prompts), PROMPT_TOKENS, NEW_TOKENS, THREADS)

    return run


def prompt_ids(tokenizer: GPT2TokenizerFast, n: int) -> list[list[int]]:
    """Corpus windows of exactly 32 tokens whose text encodes back to the same ids."""
    ids = tokenizer(" ".join(read_documents([REPO / "samples" / "corpus"]))).input_ids
    windows = (ids[i : i + PROMPT_TOKENS] for i in range(0, len(ids) - PROMPT_TOKENS, 37))
    exact = [w for w in windows if tokenizer(tokenizer.decode(w)).input_ids == w]
    return exact[:n]


def hf_generate(model: object) -> Run:
    def run(prompts: list[list[int]]) -> int:
        ids = torch.tensor(prompts)
        with torch.no_grad():
            out = model.generate(  # type: ignore[attr-defined]
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                pad_token_id=0,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
            )
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    return timed(run)


def ctranslate2_generate(path: Path, tokenizer: GPT2TokenizerFast) -> Run:
    import ctranslate2

    generator = ctranslate2.Generator(
        str(path), device="cpu", compute_type="int8", intra_threads=THREADS
    )

    def run(prompts: list[list[int]]) -> int:
        tokens = [tokenizer.convert_ids_to_tokens(p) for p in prompts]
        results = generator.generate_batch(
            tokens,
            max_length=NEW_TOKENS,
            min_length=NEW_TOKENS,
            sampling_topk=1,
            include_prompt_in_result=False,
        )
        return sum(len(r.sequences_ids[0]) for r in results)

    return timed(run)


def engine_generate(
    path: Path, variant: str, tokenizer: GPT2TokenizerFast, kv_cache_dtype: str = "auto"
) -> Run:
    # No prefix cache: every round replays the same prompts, and the peers prefill each time.
    engine = LLMEngine(
        path,
        variant,
        threads=THREADS,
        max_running=max(BATCHES),
        enable_prefix_caching=False,
        kv_cache_dtype=kv_cache_dtype,
    )

    def run(prompts: list[list[int]]) -> int:
        requests = [
            GenerationRequest(
                prompt=tokenizer.decode(p),
                max_new_tokens=NEW_TOKENS,
                temperature=0,
                ignore_eos=True,
            )
            for p in prompts
        ]
        return sum(g.completion_tokens for g in engine.generate(requests))

    return timed(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--engines", help="comma-separated names to run (default: all); the peers always run"
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    model_dir = prepare(args.workdir)
    tokenizer = GPT2TokenizerFast.from_pretrained(model_dir)
    prompts = prompt_ids(tokenizer, max(BATCHES))
    engines: dict[str, Callable[[], Run]] = {
        "transformers + PyTorch fp32": lambda: hf_generate(
            GPT2LMHeadModel.from_pretrained(model_dir).eval()
        ),
        **optimum_engines(args.workdir),
        "CTranslate2 int8": lambda: ctranslate2_generate(args.workdir / "ct2-int8", tokenizer),
        "llama.cpp q8_0": lambda: llama_cpp_generate(args.workdir / "llama-q8_0.gguf"),
        "tailorgpt fp32": lambda: engine_generate(args.workdir / "tailorgpt", "fp32", tokenizer),
        "tailorgpt int8": lambda: engine_generate(args.workdir / "tailorgpt", "int8", tokenizer),
        "tailorgpt int8, fp32 cache": lambda: engine_generate(
            args.workdir / "tailorgpt", "int8", tokenizer, "fp32"
        ),
    }
    chosen = set(args.engines.split(",")) | set(PEERS) if args.engines else set(engines)
    runs = {name: load() for name, load in engines.items() if name in chosen}
    rates: dict[str, dict[int, list[float]]] = {name: {} for name in runs}
    for batch in BATCHES:
        for name in runs:
            rates[name][batch] = []
        # Round-robin: each round times every engine once, so a slow spell on a shared
        # machine lands on all of them rather than on one.
        for round_ in range(RUNS + 1):  # the first round is the warm-up
            for name, run in runs.items():
                # Let the last engine's idle threads stop spinning (Intel OpenMP, which
                # CTranslate2 ships, spins 200 ms after each parallel region).
                time.sleep(0.5)
                produced, seconds = run(prompts[:batch])
                if round_:
                    rates[name][batch].append(produced / seconds)
        medians = {n: statistics.median(r[batch]) for n, r in rates.items()}
        print(
            f"batch {batch}: " + ", ".join(f"{n} {m:.1f}" for n, m in medians.items()), flush=True
        )
    print_table(rates)
    if args.json:
        args.json.write_text(json.dumps(rates, indent=2))


def print_table(rates: dict[str, dict[int, list[float]]]) -> None:
    """Median tok/s (spread over the rounds) and the ratio to each peer, per batch size."""
    print(
        f"\nCPU flags: {' '.join(cpu_flags()) or 'none of ' + ', '.join(PEERS)}; {THREADS} threads"
    )
    median = {n: {b: statistics.median(r) for b, r in row.items()} for n, row in rates.items()}
    peers = " / ".join(PEERS)
    print(
        "\n| engine | "
        + " | ".join(f"batch {b}: tok/s (spread), vs {peers}" for b in BATCHES)
        + " |"
    )
    print("| --- |" + " --- |" * len(BATCHES))
    for name, row in rates.items():
        cells = []
        for b in BATCHES:
            ratios = " / ".join(f"{median[name][b] / median[p][b]:.2f}x" for p in PEERS)
            cells.append(f"{median[name][b]:.1f} ({min(row[b]):.0f}-{max(row[b]):.0f}) {ratios}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
