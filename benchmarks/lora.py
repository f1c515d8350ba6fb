"""LoRA adapters served unmerged over one base, against the same adapters merged and exported.

On the GPT-2 124M checkpoint benchmarks/engine.py makes (random init, seed 0) and its export:
  - adapters: `--adapters` random peft LoRA adapters (rank `--rank`, alpha 16, c_attn, c_proj
    and c_fc of every layer, A and B normal(0, 0.02), seeded per adapter: each moves the
    model about as far as a fine-tune does), plus 10 more loaded at run time; adapters 00-02
    each merged into the checkpoint and exported with `tailorgpt export` (00 only with
    --quick); all kept in WORKDIR/lora for the next run
  - correctness: greedy, 32 tokens, EOS ignored, 4 prompts on each merged adapter, on the
    LoRA engine and on the merged export: fp32 weights with an fp32 KV cache (equal, token for
    token), and int8 weights with each KV cache type (the share of tokens before the first
    difference, against the merged int8 export and the merged fp32 one, beside the merged int8
    export's own against fp32); base rows on the LoRA engine against a plain engine
  - throughput, int8 weights, every core, prefix cache off (each round replays the same
    prompts), each KV cache type (the LoRA engine's default is fp32, the plain engine's
    int8): a batch of `--batch` 64-token prompts, `--tokens` new tokens each, greedy, EOS
    ignored; generated tokens / wall time of engine.generate, the median of 3 rounds after a
    warm-up, every case timed once per round in turn; a run during which other processes took
    over 10% of the CPUs is run again (up to 3 times). Cases: each row its own adapter; the
    merged export; every row on one adapter; base rows on the LoRA engine and on a plain
    engine; batch 1 on an adapter and on the merged export
  - loading at run time: load_lora_adapter of a fresh adapter on an idle engine (median of
    5); the longest time with no token for any of a batch of running streams while 5 adapters
    load, against the same batch with no loads
  - graph steps of the LoRA engine's runner, timed in turn within each of 30 rounds, as the
    median of the rounds' ratios to the base step (this host's speed drifts between minutes):
    decode of 32 rows (base, one adapter, 32 adapters on neighbouring or spread stack rows)
    and a prefill of 8 x 64 tokens

  .venv/bin/python benchmarks/engine.py --workdir /tmp/tailorgpt-engine-bench  # the checkpoint
  .venv/bin/python benchmarks/lora.py --workdir /tmp/tailorgpt-engine-bench [--quick]

--quick (4 adapters, batch 4, 8 new tokens, correctness on adapter 00 alone) checks that it
runs end to end; a first run exports the merged models (minutes each), later runs reuse them.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import psutil
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2LMHeadModel

from service.engine import Event, GenerationRequest, LLMEngine, TextCodec, cpu_flags
from training.prepare import read_documents

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["c_attn", "c_proj", "c_fc"]
ALPHA, STD = 16, 0.02
FRESH = 5  # adapters loaded at run time, for each of the two loading measurements
PROMPT_TOKENS, CHECK_TOKENS, CHECK_PROMPTS, RUNS = 64, 32, 4, 3


@dataclass
class Setup:
    checkpoint: Path  # the Hugging Face GPT-2 directory
    base: Path  # its tailorgpt export
    adapters: list[Path]  # served from the start
    fresh: list[Path]  # loaded at run time
    merged: list[Path]  # the exports of adapters 00, 01, ... merged
    prompts: list[list[int]]  # token ids, PROMPT_TOKENS each


# --- adapters and merged exports ---------------------------------------------------------


def make_adapters(checkpoint: Path, root: Path, count: int, rank: int) -> list[Path]:
    """adapter-00 ... of `rank`, each saved once (seed = its number)."""
    paths = [root / f"adapter-{i:02d}" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not (p / "adapter_model.safetensors").is_file()]
    if (paths[0] / "adapter_config.json").is_file():
        config = LoraConfig.from_pretrained(str(paths[0]))
        if config.r != rank:
            sys.exit(f"{root} holds rank-{config.r} adapters: remove it, or pass --rank {config.r}")
    if missing:
        config = LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=TARGETS, fan_in_fan_out=True)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(checkpoint), config)
        for index in missing:
            randomize(model, seed=index)
            model.save_pretrained(paths[index])
        print(f"made {len(missing)} adapters in {root}", flush=True)
    return paths


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every LoRA A and B drawn from normal(0, STD): B A changes each weight by ~10%."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * STD)


def merged_export(checkpoint: Path, adapter: Path, target: Path) -> Path:
    """The checkpoint with `adapter` merged into its weights, exported once to `target`."""
    if (target / "manifest.json").is_file():
        return target
    hf_dir = target.with_name(target.name + ".hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(checkpoint), adapter)
    model.merge_and_unload().save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, hf_dir / name)
    shutil.rmtree(target, ignore_errors=True)  # an export cut short
    print(f"exporting {adapter.name} merged to {target} ...", flush=True)
    command = [sys.executable, "-m", "tailorgpt", "export", str(hf_dir), "--output_dir"]
    subprocess.run([*command, str(target)], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(hf_dir)
    return target


def prompts(base: Path, count: int) -> list[list[int]]:
    """Distinct windows of PROMPT_TOKENS token ids from the bundled corpus."""
    ids = TextCodec(base).encode(" ".join(read_documents([REPO / "samples" / "corpus"])))
    step = max(PROMPT_TOKENS, (len(ids) - PROMPT_TOKENS) // count)
    windows = [ids[i : i + PROMPT_TOKENS] for i in range(0, len(ids) - PROMPT_TOKENS, step)]
    if len(windows) < count:
        sys.exit(f"the corpus holds {len(windows)} prompts of {PROMPT_TOKENS} tokens, not {count}")
    return windows[:count]


def prepare(workdir: Path, args: argparse.Namespace, checks: int) -> Setup:
    checkpoint, base = workdir / "gpt2-124m", workdir / "tailorgpt"
    if not (base / "model_int8_kv_int8_lora.onnx").is_file():
        sys.exit(f"{base}: no export with LoRA graphs: run benchmarks/engine.py, or export again")
    root = workdir / "lora"
    paths = make_adapters(checkpoint, root, args.adapters + 2 * FRESH, args.rank)
    names = ["merged-export", *(f"merged-export-{i:02d}" for i in range(1, checks))]
    merged = [merged_export(checkpoint, paths[i], root / n) for i, n in enumerate(names)]
    count = max(args.batch, CHECK_PROMPTS)
    return Setup(checkpoint, base, paths[: args.adapters], paths[args.adapters :], merged,
                 prompts(base, count))  # fmt: skip


# --- engines and requests ------------------------------------------------------------------


def engine(
    export: Path,
    variant: str = "int8",
    kv_cache_dtype: str = "auto",
    adapters: Sequence[Path] = (),
    lora: bool = False,
) -> LLMEngine:
    """An engine on every core, no prefix cache (each round replays the same prompts)."""
    return LLMEngine(
        export,
        variant,
        kv_cache_dtype=kv_cache_dtype,
        enable_prefix_caching=False,
        enable_lora=lora,
        lora_modules={path.name: path for path in adapters},
    )


def requests(
    prompts: Sequence[list[int]], models: Sequence[str | None], tokens: int, logprobs: bool = False
) -> list[GenerationRequest]:
    """Greedy, EOS ignored: every row makes `tokens` tokens."""
    return [
        GenerationRequest(
            prompt=prompt,
            model=model,
            max_new_tokens=tokens,
            temperature=0,
            ignore_eos=True,
            logprobs=0 if logprobs else None,
        )
        for prompt, model in zip(prompts, models, strict=True)
    ]


def token_ids(engine: LLMEngine, batch: list[GenerationRequest]) -> list[list[int]]:
    return [[e.token_id for e in g.logprobs or []] for g in engine.generate(batch)]


# --- correctness ---------------------------------------------------------------------------

CHECKS = (("fp32", "fp32"), ("int8", "fp32"), ("int8", "int8"))  # (variant, KV cache type)
Outputs = dict[tuple[str, str, str], list[list[int]]]  # (engine, variant, KV) -> token ids


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@dataclass
class Agreement:
    """Greedy outputs against a reference: sequences equal, and tokens before the first
    difference (a greedy decode that differs once goes its own way after)."""

    equal: int = 0
    sequences: int = 0
    prefix: int = 0
    tokens: int = 0

    @classmethod
    def of(cls, ours: list[list[int]], reference: list[list[int]]) -> Agreement:
        result = cls()
        for a, b in zip(ours, reference, strict=True):
            result.equal += a == b
            result.sequences += 1
            result.prefix += common_prefix(a, b)
            result.tokens += len(b)
        return result

    def cells(self) -> str:
        return f"{self.equal}/{self.sequences} | {self.prefix / self.tokens:.1%}"


def outputs(setup: Setup, tokens: int) -> Outputs:
    """Each checked adapter's prompts on the LoRA engine ("lora") and on its merged export
    ("merged", in the same order); the prompts as base rows on the LoRA engine ("lora base")
    and on a plain engine ("plain"); for each of CHECKS."""
    checked = setup.adapters[: len(setup.merged)]
    prompts = setup.prompts[:CHECK_PROMPTS]
    batch = [
        request
        for path in checked
        for request in requests(prompts, [path.name] * len(prompts), tokens, logprobs=True)
    ]
    base_batch = requests(prompts, [None] * len(prompts), tokens, logprobs=True)
    out: Outputs = {}
    for variant, kv in CHECKS:
        with engine(setup.base, variant, kv, checked) as served:
            out["lora", variant, kv] = token_ids(served, batch)
            out["lora base", variant, kv] = token_ids(served, base_batch)
        with engine(setup.base, variant, kv) as plain:
            out["plain", variant, kv] = token_ids(plain, base_batch)
        out["merged", variant, kv] = []
        for export in setup.merged:
            with engine(export, variant, kv) as merged:
                out["merged", variant, kv] += token_ids(merged, base_batch)
    return out


def correctness(out: Outputs) -> list[tuple[str, Agreement]]:
    """The comparisons reported; "(equal)" marks those that should match exactly."""
    fp32 = "merged", "fp32", "fp32"
    rows = [
        ("fp32 weights, KV fp32: LoRA engine vs merged export (equal)", ("lora", *fp32[1:]), fp32),
        ("fp32, KV fp32: LoRA engine's base rows vs plain engine (equal)",
         ("lora base", *fp32[1:]), ("plain", *fp32[1:])),
    ]  # fmt: skip
    for kv in ("fp32", "int8"):
        rows += [
            (f"int8, KV {kv}: LoRA engine vs merged int8 export, KV {kv}",
             ("lora", "int8", kv), ("merged", "int8", kv)),
            (f"int8, KV {kv}: LoRA engine vs merged fp32 export", ("lora", "int8", kv), fp32),
            (f"int8, KV {kv}: merged int8 export vs merged fp32 (int8's own drift)",
             ("merged", "int8", kv), fp32),
            (f"int8, KV {kv}: LoRA engine's base rows vs plain engine (equal)",
             ("lora base", "int8", kv), ("plain", "int8", kv)),
        ]  # fmt: skip
    return [(name, Agreement.of(out[ours], out[reference])) for name, ours, reference in rows]


# --- throughput ----------------------------------------------------------------------------

KV_TYPES = ("int8", "fp32")
NOISE, RETRIES = 0.10, 3  # a run during which others took over 10% of the CPUs runs again
QUIET_WAIT = 120  # seconds a run waits at most for the other processes to go quiet
T = TypeVar("T")


class CpuMeter:
    """The share of all CPUs that other processes (and the hypervisor) took meanwhile."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.started = time.perf_counter()
        self.busy, self.own = self.busy_seconds(), self.own_seconds()

    @staticmethod
    def busy_seconds() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - times.iowait

    def own_seconds(self) -> float:
        times = self.me.cpu_times()
        return times.user + times.system

    def others(self) -> float:
        wall = (time.perf_counter() - self.started) * psutil.cpu_count()
        busy = self.busy_seconds() - self.busy
        return max(0.0, busy - (self.own_seconds() - self.own)) / wall


def wait_quiet() -> None:
    """Until other processes take under half of NOISE for a second (QUIET_WAIT at most)."""
    deadline = time.perf_counter() + QUIET_WAIT
    while time.perf_counter() < deadline:
        meter = CpuMeter()
        time.sleep(1)
        if meter.others() < NOISE / 2:
            return


def quietly(run: Callable[[], tuple[T, float]]) -> tuple[T, float]:
    """run() -> (a result, CpuMeter.others over it), once the machine is quiet; again (up to
    RETRIES times) while other processes took over NOISE of the CPUs: this machine is shared."""
    for attempt in range(RETRIES + 1):
        wait_quiet()
        time.sleep(0.5)  # the last engine's ONNX Runtime threads stop spinning
        result, others = run()
        if others <= NOISE or attempt == RETRIES:
            break
    return result, others


@dataclass
class Case:
    engine: LLMEngine
    batch: list[GenerationRequest]
    rates: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # CpuMeter.others of each run kept

    def run(self) -> tuple[float, float]:
        """Generated tokens a second over the whole engine.generate, and CpuMeter.others."""
        meter = CpuMeter()
        produced = sum(g.completion_tokens for g in self.engine.generate(self.batch))
        return produced / (time.perf_counter() - meter.started), meter.others()

    def timed(self) -> None:
        """One run kept (see `quietly`)."""
        rate, others = quietly(self.run)
        self.rates.append(rate)
        self.others.append(others)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def __str__(self) -> str:
        return f"{self.median:.1f} ({min(self.rates):.1f}-{max(self.rates):.1f})"


def measure(cases: list[Case]) -> None:
    """A warm-up round, then RUNS rounds each timing every case once in turn, so that a slow
    spell of a shared machine lands on all of them."""
    for case in cases:
        case.run()
    for _ in range(RUNS):
        for case in cases:
            case.timed()


@dataclass
class Engines:
    """The int8 engines timed, by KV cache type, and each kind's default type."""

    lora: dict[str, LLMEngine]
    merged: dict[str, LLMEngine]
    plain: dict[str, LLMEngine]
    defaults: dict[str, str]  # "lora" / "plain" -> the KV type "auto" gives


def default_kv(export: Path, lora: bool) -> str:
    """The KV cache type an int8 engine takes by default (kv_cache_dtype "auto")."""
    with engine(export, lora=lora) as probe:
        return probe.info.kv_cache_dtype


def open_engines(stack: ExitStack, setup: Setup) -> Engines:
    def each(export: Path, adapters: Sequence[Path] = ()) -> dict[str, LLMEngine]:
        return {kv: stack.enter_context(engine(export, "int8", kv, adapters)) for kv in KV_TYPES}

    defaults = {"lora": default_kv(setup.base, True), "plain": default_kv(setup.base, False)}
    return Engines(
        each(setup.base, setup.adapters), each(setup.merged[0]), each(setup.base), defaults
    )


OWN = "LoRA engine: each row its own adapter"
# The stacks hold adapters in load order, and a step reads its adapters' run of rows, first
# to last: the rows above are neighbours; here every other row of all 64, as after evictions.
SPREAD = "LoRA engine: each row its own adapter, spread over the stacks"
MERGED = "merged export (adapter 00 merged, no LoRA)"
ONE = "LoRA engine: every row on adapter 00"
BASE = "LoRA engine: base rows (model None)"
PLAIN = "plain engine (no LoRA): base rows"
ONE_1 = "batch 1: LoRA engine, adapter 00"
MERGED_1 = "batch 1: merged export"
RATIOS = (
    ("each row its own adapter / merged", OWN, MERGED, ">= 0.7x"),
    ("each row its own adapter, spread / merged", SPREAD, MERGED, ">= 0.7x"),
    ("one adapter / merged", ONE, MERGED, ""),
    ("LoRA engine's base rows / plain engine", BASE, PLAIN, "1.00x"),
    ("batch 1: adapter / merged", ONE_1, MERGED_1, ""),
)
Cases = dict[tuple[str, str], Case]  # (label, KV type) -> its case


def throughput_cases(setup: Setup, engines: Engines, batch: int, tokens: int) -> Cases:
    prompts = setup.prompts[:batch]
    own = [setup.adapters[i % len(setup.adapters)].name for i in range(batch)]
    spread = [setup.adapters[2 * i % len(setup.adapters)].name for i in range(batch)]
    one = setup.adapters[0].name
    plan = {
        OWN: (engines.lora, own),
        SPREAD: (engines.lora, spread),
        MERGED: (engines.merged, [None] * batch),
        ONE: (engines.lora, [one] * batch),
        BASE: (engines.lora, [None] * batch),
        PLAIN: (engines.plain, [None] * batch),
        ONE_1: (engines.lora, [one]),
        MERGED_1: (engines.merged, [None]),
    }
    return {
        (label, kv): Case(served[kv], requests(prompts[: len(models)], models, tokens))
        for label, (served, models) in plan.items()
        for kv in KV_TYPES
    }


def measure_all(cases: Cases) -> None:
    """The batch cases, then the batch-1 ones, each group in interleaved rounds."""
    single = {ONE_1, MERGED_1}
    measure([c for (label, _), c in cases.items() if label not in single])
    measure([c for (label, _), c in cases.items() if label in single])


# --- loading at run time -------------------------------------------------------------------


def load_seconds(served: LLMEngine, paths: list[Path]) -> list[float]:
    """load_lora_adapter of each (new names) on an idle engine."""
    seconds = []
    for path in paths:
        started = time.perf_counter()
        # A new name each time: an adapter's name is loaded once.
        served.load_lora_adapter(f"{path.name}-{len(served.lora_adapters())}", path)
        seconds.append(time.perf_counter() - started)
    return seconds


class Watch:
    """When each stream of a batch gets its events (called in the engine thread)."""

    def __init__(self, streams: int) -> None:
        self.times: list[list[float]] = [[] for _ in range(streams)]
        self.started = 0
        self.all_started = threading.Event()
        self.finished: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def callback(self, index: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            now = time.perf_counter()
            if not self.times[index]:
                self.started += 1
                if self.started == len(self.times):
                    self.all_started.set()
            self.times[index].append(now)
            if event.finish_reason is not None:
                self.finished.put(event)

        return on_event

    def longest_gap(self, since: float) -> float:
        """The longest time after `since` in which no stream got a token."""
        moments = sorted([since, *(t for times in self.times for t in times if t >= since)])
        return max((b - a for a, b in pairwise(moments)), default=0.0)

    def step(self) -> float:
        """A typical step: the median time between two events of one stream."""
        return statistics.median(b - a for times in self.times for a, b in pairwise(times))


@dataclass
class Stall:
    longest_gap: float  # seconds without a token for any stream, once all decode
    step: float  # a typical step
    loads: list[float]  # seconds each load took
    loads_in_decode: bool  # the loads ended before the first stream did
    others: float  # CpuMeter.others over the run


def decode_with_loads(
    served: LLMEngine, batch: list[GenerationRequest], loads: list[Path]
) -> Stall:
    """Run the batch as streams; once every stream has its first token, load `loads`."""
    watch, meter = Watch(len(batch)), CpuMeter()
    for index, request in enumerate(batch):
        served.submit(request, watch.callback(index))
    watch.all_started.wait()
    since = time.perf_counter()
    seconds = load_seconds(served, loads)
    loaded = time.perf_counter()
    finished = [watch.finished.get() for _ in batch]
    if bad := [e.finish_reason for e in finished if e.finish_reason != "length"]:
        sys.exit(f"streams ended with {bad} while adapters loaded")
    first_end = min(times[-1] for times in watch.times)
    return Stall(watch.longest_gap(since), watch.step(), seconds, loaded < first_end,
                 meter.others())  # fmt: skip


def stalls(
    served: LLMEngine, batch: list[GenerationRequest], loads: list[Path]
) -> tuple[Stall, float]:
    stall = decode_with_loads(served, batch, loads)
    return stall, stall.others


# --- report --------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    checks: list[tuple[str, Agreement]],
    engines: Engines,
    cases: Cases,
    loading: tuple[list[float], Stall, Stall],
) -> str:
    lora_kv, plain_kv = engines.defaults["lora"], engines.defaults["plain"]
    headline = cases[OWN, lora_kv].median / cases[MERGED, plain_kv].median
    others = max(o for case in cases.values() for o in case.others)
    return "\n".join(
        [
            f"`{' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
            "",
            f"CPU flags: {' '.join(cpu_flags()) or 'none'}; {len(os.sched_getaffinity(0))} "
            f"threads (all cores); {args.adapters} adapters of rank {args.rank} loaded "
            f"(max_lora_rank 8, the default); default KV cache: LoRA engine {lora_kv}, plain "
            f"and merged engines {plain_kv}",
            "",
            *correctness_table(checks),
            "",
            *throughput_table(args, cases, engines.defaults),
            "",
            f"Each engine's default (LoRA engine KV {lora_kv}, merged export KV {plain_kv}): "
            f"each row its own adapter / merged = {headline:.2f}x (target >= 0.7x). Other "
            f"processes took up to {others:.0%} of the CPUs during a timed run.",
            "",
            *loading_table(args, *loading),
        ]
    )


def correctness_table(checks: list[tuple[str, Agreement]]) -> list[str]:
    n = checks[0][1].sequences // CHECK_PROMPTS
    return [
        f"| greedy, {CHECK_TOKENS} tokens, EOS ignored; {n} adapters x {CHECK_PROMPTS} prompts "
        "| sequences equal | tokens before the first difference |",
        "| --- | --- | --- |",
        *(f"| {name} | {agreement.cells()} |" for name, agreement in checks),
    ]


def throughput_table(args: argparse.Namespace, cases: Cases, defaults: dict[str, str]) -> list[str]:
    """tok/s by case and KV type, * the engine's default; then the ratios."""

    def cell(label: str, kv: str) -> str:
        kind = "plain" if label in (MERGED, PLAIN, MERGED_1) else "lora"
        return f"{cases[label, kv]}{' *' if defaults[kind] == kv else ''}"

    labels = dict.fromkeys(label for label, _ in cases)
    ratios = [
        f"| {name} | "
        + " | ".join(f"{cases[a, kv].median / cases[b, kv].median:.2f}x" for kv in KV_TYPES)
        + f" | {target} |"
        for name, a, b, target in RATIOS
    ]
    return [
        f"| int8 weights; batch {args.batch} ({PROMPT_TOKENS}-token prompts, {args.tokens} new "
        "tokens each), greedy; tok/s, median of 3 (lowest-highest) | "
        + " | ".join(f"KV {kv}" for kv in KV_TYPES)
        + " | target |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | " + " | ".join(cell(label, kv) for kv in KV_TYPES) + " | |"
            for label in labels
        ),
        *ratios,
    ]


def loading_table(
    args: argparse.Namespace, idle: list[float], quiet: Stall, busy: Stall
) -> list[str]:
    within = "within" if busy.loads_in_decode else "NOT within"
    return [
        "| loading at run time (LoRA engine, its default KV cache) | figure | target |",
        "| --- | --- | --- |",
        f"| load_lora_adapter on an idle engine, s: median of {len(idle)} (lowest-highest) "
        f"| {spread(idle)} | < 1 s |",
        f"| {args.batch} streams decoding, no loads: longest time without a token "
        f"| {quiet.longest_gap * 1e3:.0f} ms (a step: {quiet.step * 1e3:.0f} ms; others "
        f"{quiet.others:.0%} CPU) | |",
        f"| ... while {len(busy.loads)} adapters load | {busy.longest_gap * 1e3:.0f} ms (a step: "
        f"{busy.step * 1e3:.0f} ms; others {busy.others:.0%} CPU); each load {spread(busy.loads)}"
        f" s, {within} the decode | ~ one step |",
    ]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


# --- main ----------------------------------------------------------------------------------


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    parser.add_argument("--adapters", type=int, default=64, help="adapters loaded (<= 64)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="rows (<= 32, the engine's slots)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens a row")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.batch, args.tokens = 4, 4, 8
    return args


PAIRED_ROUNDS = 30


def paired_steps(engines: Engines, setup: Setup, kv: str) -> list[str]:
    """Graph steps of the LoRA engine's runner, each case run once and then timed, in turn
    within a round, and the ratio to the base step taken per round (this host's speed drifts
    by up to a third between minutes; paired ratios do not): decode of 32 rows after 64
    cached tokens, and a prefill of 8 prompts of 64 tokens, with and without adapters."""
    from service.engine import Chunk

    served = engines.lora[kv]
    runner, ids = served.runner, [served.lora_id(a.name) for a in setup.adapters]
    rows = min(32, len(ids))

    def decode(lora_ids: list[int]) -> list[Chunk]:
        return [Chunk(slot, [5], 64, lora_id=i) for slot, i in enumerate(lora_ids)]

    def prefill(lora_ids: list[int]) -> list[Chunk]:
        return [Chunk(slot, [5] * 64, 0, lora_id=i) for slot, i in enumerate(lora_ids)]

    cases = {
        "decode, 32 base rows": decode([0] * rows),
        "decode, 32 rows of one adapter": decode([ids[0]] * rows),
        "decode, 32 adapters, neighbouring rows": decode(ids[:rows]),
        "decode, 32 adapters, every other row of 64": decode(ids[::2][:rows]),
        "prefill, 8 x 64 tokens, base": prefill([0] * 8),
        "prefill, 8 x 64 tokens, 8 adapters": prefill(ids[:8]),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    wait_quiet()
    for _ in range(PAIRED_ROUNDS):
        for name, chunks in cases.items():
            runner.run(chunks)  # warm: the case before it left other data in the CPU caches
            started = time.perf_counter()
            runner.run(chunks)
            times[name].append(time.perf_counter() - started)
    lines = [
        f"| graph steps, int8 weights, KV {kv}, {PAIRED_ROUNDS} rounds | ms, median | "
        "base / this, median of the rounds' ratios |",
        "| --- | --- | --- |",
    ]
    for name, spent in times.items():
        base = times[
            "prefill, 8 x 64 tokens, base" if "prefill" in name else "decode, 32 base rows"
        ]
        ratio = statistics.median(b / t for b, t in zip(base, spent, strict=True))
        lines.append(f"| {name} | {statistics.median(spent) * 1e3:.1f} | {ratio:.2f}x |")
    return lines


def main() -> None:
    args = arguments()
    setup = prepare(args.workdir, args, checks=1 if args.quick else 3)
    checks = correctness(outputs(setup, CHECK_TOKENS))
    for name, agreement in checks:
        print(f"{name}: {agreement.cells()}", flush=True)
    with ExitStack() as stack:
        engines = open_engines(stack, setup)
        cases = throughput_cases(setup, engines, args.batch, args.tokens)
        measure_all(cases)
        served = engines.lora[engines.defaults["lora"]]
        wait_quiet()
        idle = load_seconds(served, setup.fresh[:FRESH])
        streams = cases[OWN, engines.defaults["lora"]].batch
        quiet, _ = quietly(lambda: stalls(served, streams, []))
        busy, _ = quietly(lambda: stalls(served, streams, setup.fresh[FRESH:]))
        steps = [line for kv in KV_TYPES for line in ["", *paired_steps(engines, setup, kv)]]
    print()
    print(report(args, checks, engines, cases, (idle, quiet, busy)))
    print("\n".join(steps))


if __name__ == "__main__":
    main()
