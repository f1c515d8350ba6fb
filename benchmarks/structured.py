"""What structured outputs cost per decode step: the engine with and without a grammar.

The same random-init GPT-2 124M (seed 0) and int8 export as benchmarks/engine.py (its functions,
same work directory), the same 32-token prompts, greedy, EOS ignored, 2 threads, batch 1 and 32:
  - no constraint, 64 new tokens
  - a JSON schema (an object with an enum, an integer, a bool and a string of at most 24
    characters), up to 64 new tokens
  - a regex, [a-z ]{0,200}, up to 64 new tokens
A row ends when its grammar takes nothing more, whatever ignore_eos says, so a constrained row
may end before 64 tokens; each constrained run is therefore compared with an unconstrained run
whose rows are given exactly the lengths the constrained rows reached (the same batch shape
at every step): the ratio is the cost of the mask alone. A warm-up round, then the median of
--runs rounds (each times every configuration once in turn), the spread in brackets. ms/step is
the wall time over the longest row's tokens (prefill included, as in profile_step.py's engine
figure). Then one instrumented run per grammar splits the mask's time (llguidance's bitmask,
its unpacking to booleans, advancing the matcher), and the one-time costs: the engine's
llguidance tokenizer, a grammar's compile (first request) against the cache (every later one),
and a row's matcher.

  .venv/bin/python benchmarks/structured.py --workdir /tmp/tailorgpt-engine-bench
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import gpt2_124m, prompt_ids, tailorgpt_export
from transformers import GPT2TokenizerFast

import service.engine.structured as structured
from service.engine import GenerationRequest, LLMEngine, StructuredOutputs, cpu_flags

NEW_TOKENS, BATCHES, RUNS, THREADS, VARIANT = 64, (1, 32), 5, 2, "int8"
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 24},
    },
    "required": ["color", "count", "ok", "name"],
    "additionalProperties": False,
}
GRAMMARS = {
    "JSON schema": StructuredOutputs(json=SCHEMA),
    "regex [a-z ]{0,200}": StructuredOutputs(regex="[a-z ]{0,200}"),
}
UNCONSTRAINED = "no constraint"


def generate(
    engine: LLMEngine, prompts: list[str], lengths: list[int], spec: StructuredOutputs | None
) -> tuple[list[int], float, list[str]]:
    """Each row's tokens, the seconds the batch took, and the texts."""
    requests = [
        GenerationRequest(
            prompt=p, max_new_tokens=n, temperature=0, ignore_eos=True, structured_outputs=spec
        )
        for p, n in zip(prompts, lengths, strict=True)
    ]
    started = time.perf_counter()
    out = engine.generate(requests)
    seconds = time.perf_counter() - started
    return [g.completion_tokens for g in out], seconds, [g.text for g in out]


class MaskClock:
    """Seconds inside the mask's parts, summed over the rows (the engine's thread adds them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)
        self._saved.append((owner, name, inner))

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started

        setattr(owner, name, timed)

    def __enter__(self) -> MaskClock:
        self._wrap(structured.Matcher, "allowed", "allowed")
        self._wrap(structured, "fill_next_token_bitmask", "bitmask")
        self._wrap(structured.Matcher, "consume", "consume")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, inner in reversed(self._saved):
            setattr(owner, name, inner)


def once(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def one_time_costs(engine: LLMEngine, tailor: Path) -> None:
    tokenizer_json = (tailor / "tokenizer.json").read_text(encoding="utf-8")
    vocab, eos = engine.runner.vocab_size, engine.runner.eos_token_id
    print(
        "one-time: llguidance tokenizer (once per engine) "
        f"{once(lambda: structured.Grammars(tokenizer_json, vocab, eos)) * 1e3:.0f} ms"
    )
    for name, spec in GRAMMARS.items():
        first = once(lambda spec=spec: engine.grammars.grammar(spec))
        cached = statistics.median(
            once(lambda spec=spec: engine.grammars.grammar(spec)) for _ in range(100)
        )
        first_mask = once(engine.grammars.matcher(spec).allowed)
        matcher = statistics.median(
            once(lambda spec=spec: engine.grammars.matcher(spec)) for _ in range(20)
        )
        mask = statistics.median(once(engine.grammars.matcher(spec).allowed) for _ in range(20))
        print(
            f"one-time: {name}: compile (first request) {first * 1e3:.1f} ms, cached "
            f"{cached * 1e6:.1f} us; per row: its matcher {matcher * 1e3:.2f} ms, its first "
            f"mask {first_mask * 1e3:.2f} ms on the grammar's first row, {mask * 1e3:.2f} ms "
            "on later rows"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    parser.add_argument("--runs", type=int, default=RUNS, help="timed rounds per batch size")
    args = parser.parse_args()
    tailor = tailorgpt_export(args.workdir)
    tokenizer = GPT2TokenizerFast.from_pretrained(gpt2_124m(args.workdir))
    prompts = [tokenizer.decode(p) for p in prompt_ids(tokenizer, max(BATCHES))]
    engine = LLMEngine(
        tailor, VARIANT, threads=THREADS, max_running=max(BATCHES), enable_prefix_caching=False
    )
    generate(engine, prompts[:1], [4], None)  # the session's first run, out of the figures
    one_time_costs(engine, tailor)
    rows: list[tuple[int, str, list[int], list[float], str]] = []
    mask_ms: dict[tuple[int, str], float] = {}
    for batch in BATCHES:
        batch_prompts = prompts[:batch]
        # Warm-up round: also gives the lengths the constrained rows reach (greedy: the same
        # every round), which their unconstrained twins are given.
        configs: dict[str, tuple[StructuredOutputs | None, list[int], str | None]] = {
            UNCONSTRAINED: (None, [NEW_TOKENS] * batch, None)
        }
        generate(engine, batch_prompts, [NEW_TOKENS] * batch, None)
        for name, spec in GRAMMARS.items():
            lengths, _, texts = generate(engine, batch_prompts, [NEW_TOKENS] * batch, spec)
            print(f"batch {batch}, {name}: first row's output {texts[0]!r}", flush=True)
            configs[name] = (spec, lengths, None)
            if lengths != [NEW_TOKENS] * batch:
                twin = f"no constraint, {name}'s lengths"
                configs[twin] = (None, lengths, name)
                generate(engine, batch_prompts, lengths, None)
        seconds: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.runs):
            for name, (spec, lengths, _) in configs.items():
                time.sleep(0.3)
                got, took, _ = generate(engine, batch_prompts, lengths, spec)
                if got != lengths:
                    print(f"  note: {name} produced {sum(got)} tokens, not {sum(lengths)}")
                seconds[name].append(took)
        for name, (spec, lengths, _) in configs.items():
            twin = next((n for n, c in configs.items() if c[2] == name), UNCONSTRAINED)
            rows.append((batch, name, lengths, seconds[name], name if spec is None else twin))
        # One instrumented run per grammar: where the mask's time goes.
        for name, (spec, lengths, _) in configs.items():
            if spec is None:
                continue
            with MaskClock() as clock:
                generate(engine, batch_prompts, lengths, spec)
            steps, tokens = max(lengths), sum(lengths)
            s = clock.seconds
            mask_ms[batch, name] = (s["allowed"] + s["consume"]) / steps * 1e3
            print(
                f"batch {batch}, {name}, mask per step (summed over rows): "
                f"allowed() {s['allowed'] / steps * 1e3:.2f} ms (llguidance bitmask "
                f"{s['bitmask'] / steps * 1e3:.2f}, unpacking to booleans "
                f"{(s['allowed'] - s['bitmask']) / steps * 1e3:.2f}), consume() "
                f"{s['consume'] / steps * 1e3:.2f} ms; per row-token "
                f"{(s['allowed'] + s['consume']) / tokens * 1e6:.0f} us",
                flush=True,
            )
    print_table(rows, mask_ms, args.runs)
    engine.shutdown()


def print_table(
    rows: list[tuple[int, str, list[int], list[float], str]],
    mask_ms: dict[tuple[int, str], float],
    runs: int,
) -> None:
    print(f"\nCPU flags: {' '.join(cpu_flags()) or 'none'}; {THREADS} threads; {VARIANT}")
    print(f"median of {runs} timed rounds after a warm-up round, spread in brackets\n")
    print(
        "| batch | output | tokens (longest row) | tok/s | ms/step | "
        "vs unconstrained, same lengths (ms/step) | mask, instrumented run: ms/step (share) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ms_step: dict[tuple[int, str], float] = {}
    for batch, name, lengths, seconds, _ in rows:
        ms_step[batch, name] = statistics.median(seconds) / max(lengths) * 1e3
    for batch, name, lengths, seconds, baseline in rows:
        tokens, steps = sum(lengths), max(lengths)
        rates = [tokens / s for s in seconds]
        steps_ms = [s / steps * 1e3 for s in seconds]
        ratio = (
            "1.00x (reference)"
            if baseline == name
            else f"{ms_step[batch, name] / ms_step[batch, baseline]:.2f}x vs {baseline}"
        )
        mask = mask_ms.get((batch, name))
        share = "-" if mask is None else f"{mask:.2f} ({mask / ms_step[batch, name]:.0%})"
        print(
            f"| {batch} | {name} | {tokens} ({steps}) | {statistics.median(rates):.1f} "
            f"({min(rates):.0f}-{max(rates):.0f}) | {statistics.median(steps_ms):.1f} "
            f"({min(steps_ms):.1f}-{max(steps_ms):.1f}) | {ratio} | {share} |"
        )


if __name__ == "__main__":
    main()
