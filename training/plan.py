"""Will this run fit? Hardware found, memory needed, and the settings that make it fit.

Memory is estimated, not measured: weights, gradients and AdamW moments per trainable parameter,
plus activations per sequence from the transformer activation formula of Korthikanti et al.
(2022), `layers * tokens * hidden * (34 + 5 * heads * tokens / hidden)` bytes in half
precision, and the output logits. Good to about 20%, enough to choose a batch size.
Speed is measured (with --measure): a few real training steps on random-init weights.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import psutil
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, PretrainedConfig, PreTrainedModel

from artifacts import UserError
from training.arguments import LORA_RANK
from training.model import TINY, TINY_CONFIG, TINY_VOCAB_SIZE, load_base_config

GIB = 1024**3
HEADROOM = 0.85  # leave room for the framework, the allocator and the rest of the machine
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's attention and MLP projections
MEMORY_LIMIT_ENV = "TAILORGPT_MEMORY_LIMIT_GB"  # plan against less memory than is present
MEASURE_STEPS = 3  # the first warms up kernels and the allocator and is not counted
MEASURE_BUDGET_S = 20.0  # skip a size whose steps would take longer even at matmul speed
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast; fp32 needs none

# Public shapes (n_layer, n_embd, n_head, vocab_size) of the checkpoints people start from,
# so planning needs no download. The uer/* Chinese models use the BERT-Chinese vocabulary.
GPT2_VOCAB, CHINESE_VOCAB = 50257, 21128
BUILT_IN = {
    "distilgpt2": (6, 768, 12, GPT2_VOCAB),
    "gpt2": (12, 768, 12, GPT2_VOCAB),
    "gpt2-medium": (24, 1024, 16, GPT2_VOCAB),
    "gpt2-large": (36, 1280, 20, GPT2_VOCAB),
    "gpt2-xl": (48, 1600, 25, GPT2_VOCAB),
    "uer/gpt2-distil-chinese-cluecorpussmall": (6, 768, 12, CHINESE_VOCAB),
    "uer/gpt2-chinese-cluecorpussmall": (12, 768, 12, CHINESE_VOCAB),
    "uer/gpt2-medium-chinese-cluecorpussmall": (24, 1024, 16, CHINESE_VOCAB),
    "uer/gpt2-large-chinese-cluecorpussmall": (36, 1280, 20, CHINESE_VOCAB),
    "uer/gpt2-xlarge-chinese-cluecorpussmall": (48, 1600, 25, CHINESE_VOCAB),
}
HUB_ORGS = ("openai-community/", "distilbert/")  # where the hub now keeps the originals
# Cards people rent, by memory (`tailorgpt plan --gpu NAME`): GiB and training precision.
GPU_PRESETS = {
    "t4-16": (16, "fp16"),
    "v100-16": (16, "fp16"),
    "a10-24": (24, "bf16"),
    "l4-24": (24, "bf16"),
    "rtx4090-24": (24, "bf16"),
    "a100-40": (40, "bf16"),
    "a100-80": (80, "bf16"),
    "h100-80": (80, "bf16"),
}


@dataclass
class Hardware:
    device: str  # cuda, mps or cpu
    name: str
    memory_bytes: int
    precision: str  # bf16, fp16 or fp32: the fastest this device trains well in


@dataclass
class Plan:
    hardware: Hardware
    parameters: int
    trainable: int
    lora_r: int | None  # None for full fine-tuning
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    precision: str
    need_bytes: int  # per device
    fits: bool
    shards: int = 1  # FSDP processes the states are split across; 1: each holds them whole


def find_hardware() -> Hardware:
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        hardware = Hardware("cuda", props.name, props.total_memory, precision)
    elif torch.backends.mps.is_available():
        hardware = Hardware("mps", "Apple GPU", psutil.virtual_memory().total, "fp32")
    else:
        hardware = Hardware(
            "cpu", f"{os.cpu_count()} CPU cores", psutil.virtual_memory().available, "fp32"
        )
    if limit:
        hardware.memory_bytes = min(hardware.memory_bytes, int(float(limit) * GIB))
    return hardware


def base_config(name: str) -> PretrainedConfig:
    """`tiny`, a built-in shape (no download), or the config of a hub id or directory."""
    if name == TINY:
        # Its end token is whichever id the corpus' tokenizer gives it, none of GPT-2's.
        return GPT2Config(
            vocab_size=TINY_VOCAB_SIZE, bos_token_id=None, eos_token_id=None, **TINY_CONFIG
        )
    for org in HUB_ORGS:
        name = name.removeprefix(org)
    if name in BUILT_IN:
        n_layer, n_embd, n_head, vocab_size = BUILT_IN[name]
        # Shapes only: a vocabulary other than GPT-2's has no end token 50256 (5.x warns).
        ends = {} if vocab_size == GPT2_VOCAB else {"bos_token_id": None, "eos_token_id": None}
        shape = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, **ends}
        return GPT2Config(vocab_size=vocab_size, **shape)
    return load_base_config(name)


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):  # shapes only, no memory
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config: PretrainedConfig) -> int:
    return sum(p.numel() for p in meta_model(config).parameters())


def lora_parameters(
    config: PretrainedConfig, r: int = LORA_RANK, targets: tuple[str, ...] = LORA_TARGETS
) -> int:
    """What peft adds per targeted projection: A (r x in) and B (out x r)."""
    modules = meta_model(config).named_modules()
    return sum(r * sum(m.weight.shape) for n, m in modules if n.rsplit(".", 1)[-1] in targets)


def activation_bytes(
    config: PretrainedConfig, block_size: int, precision: str, checkpointing: bool
) -> int:
    """Activations kept for the backward pass of one sequence."""
    h, layers, heads, s = config.n_embd, config.n_layer, config.n_head, block_size
    scale = 2 if precision == "fp32" else 1
    if checkpointing:  # layer inputs only, plus one layer recomputed at a time
        body = layers * s * h * 2 * scale + s * h * (34 + 5 * heads * s / h) * scale
    else:
        body = layers * s * h * (34 + 5 * heads * s / h) * scale
    logits = s * config.vocab_size * 4 * 3  # fp32 logits, their softmax and gradient
    return int(body + logits)


def state_bytes(parameters: int, trainable: int) -> int:
    """fp32 weights, plus gradients and two AdamW moments for what is trained (mixed
    precision keeps fp32 master weights too)."""
    return parameters * 4 + trainable * 12


def sharded_state_bytes(
    config: PretrainedConfig, parameters: int, trainable: int, shards: int
) -> int:
    """Per process under FSDP (full shard): the states split `shards` ways, plus the
    whole fp32 weights of two GPT-2 blocks, the one computing and the one prefetched."""
    if shards == 1:
        return state_bytes(parameters, trainable)
    block = 12 * config.n_embd**2 + 13 * config.n_embd  # attention + MLP + two norms
    return -(-state_bytes(parameters, trainable) // shards) + 2 * block * 4


def make_plan(
    config: PretrainedConfig,
    block_size: int,
    target_batch: int,
    lora: bool,
    hardware: Hardware | None = None,
    lora_r: int = LORA_RANK,
    shards: int = 1,
) -> Plan:
    """The largest per-device batch (power of two, at most `target_batch`) that fits, first
    without and then with gradient checkpointing; accumulation keeps the effective batch.
    With `shards` > 1 (FSDP) weights, gradients and optimizer state are split that many ways."""
    hardware = hardware or find_hardware()
    parameters = count_parameters(config)
    trainable = lora_parameters(config, lora_r) if lora else parameters
    rank = lora_r if lora else None
    budget = hardware.memory_bytes * HEADROOM
    states = sharded_state_bytes(config, parameters, trainable, shards)
    for checkpointing in (False, True):
        per_sequence = activation_bytes(config, block_size, hardware.precision, checkpointing)
        batch = 1 << max(0, target_batch.bit_length() - 1)
        while batch >= 1:
            need = states + batch * per_sequence
            if need <= budget:
                return Plan(
                    hardware,
                    parameters,
                    trainable,
                    rank,
                    batch,
                    max(1, target_batch // batch),
                    checkpointing,
                    hardware.precision,
                    need,
                    True,
                    shards,
                )
            batch //= 2
    need = states + activation_bytes(config, block_size, hardware.precision, True)
    return Plan(
        hardware,
        parameters,
        trainable,
        rank,
        1,
        target_batch,
        True,
        hardware.precision,
        need,
        False,
        shards,
    )


def mode(plan: Plan) -> str:
    sharded = f", FSDP across {plan.shards}" if plan.shards > 1 else ""
    return ("full fine-tuning" if plan.lora_r is None else f"LoRA r={plan.lora_r}") + sharded


def plan_processes(
    config: PretrainedConfig,
    block_size: int,
    target_batch: int,
    lora: bool,
    hardware: Hardware,
    processes: int,
    fsdp: bool,
    lora_r: int = LORA_RANK,
) -> Plan:
    """The plan for one of `processes` training processes: sharded when asked (--fsdp), or
    on GPUs when the model does not fit one whole and FSDP across them makes it fit.
    The effective batch the user asked for is per process, as with data parallel."""
    plan = make_plan(config, block_size, target_batch, lora, hardware, lora_r)
    if processes < 2 or not (fsdp or (not plan.fits and hardware.device == "cuda")):
        return plan
    sharded = make_plan(config, block_size, target_batch, lora, hardware, lora_r, processes)
    return sharded if fsdp or sharded.fits else plan


def gpu_hardware(gpu: str | None, memory_gb: float | None) -> Hardware:
    """A card to plan for without having it: a preset name, or its memory in GB (bf16)."""
    if gpu is not None:
        if gpu not in GPU_PRESETS:
            raise UserError(f"--gpu {gpu}: not a known card; one of {', '.join(GPU_PRESETS)}")
        gib, precision = GPU_PRESETS[gpu]
        return Hardware("cuda", gpu, int((memory_gb or gib) * GIB), precision)
    if memory_gb is None:
        raise UserError("--gpus: say which card, with --gpu NAME or --gpu_memory_gb X")
    return Hardware("cuda", f"{memory_gb:g} GB GPU", int(memory_gb * GIB), "bf16")


def plan_gpus(
    hardware: Hardware, gpus: int, block_size: int, target_batch: int, lora_r: int
) -> str:
    """Every built-in size on `gpus` cards of `hardware`: full fine-tuning on one card,
    LoRA on one card, and full fine-tuning sharded (FSDP) across all of them."""
    heads = ["fits", "mem/GPU", "batch", "accum", "ckpt"]
    rows = [["model", "params", "|", *heads, "|", *heads, "|", *heads]]
    for name in BUILT_IN:
        config = base_config(name)
        block = min(block_size, config.n_positions)
        row = [name]
        for lora, shards in ((False, 1), (True, 1), (False, gpus)):
            plan = make_plan(config, block, target_batch, lora, hardware, lora_r, shards)
            if not lora and shards == 1:
                row += [f"{plan.parameters / 1e6:.0f}M"]
            row += ["|", *plan_cells(plan)]
        rows.append(row)
    table = format_table(rows)
    starts = [i for i, c in enumerate(table[0]) if c == "|"]
    titles = ["| full, one GPU", f"| LoRA r={lora_r}, one GPU", f"| FSDP full across {gpus}"]
    header = " " * starts[0] + "".join(
        t.ljust(b - a)
        for t, a, b in zip(titles, starts, [*starts[1:], starts[-1] + 40], strict=True)
    )
    return "\n".join(
        [
            f"hardware: {gpus} x {hardware.name} ({hardware.memory_bytes / GIB:.0f} GiB each, "
            f"budget {hardware.memory_bytes * HEADROOM / GIB:.1f} GiB), precision "
            f"{hardware.precision}; block {block_size}, effective batch {target_batch} per GPU",
            header.rstrip(),
            *table,
            "memory per GPU: estimated as for one machine; FSDP divides weights, gradients and "
            "AdamW state by the GPUs and adds two whole blocks (the one computing, the next)",
            f"run it: torchrun --nproc_per_node {gpus} -m tailorgpt train ... --fsdp "
            "(train picks FSDP itself when the model does not fit one GPU)",
        ]
    )


def describe(plan: Plan, block_size: int) -> str:
    hw = plan.hardware
    lines = [
        f"hardware: {hw.device} ({hw.name}), {hw.memory_bytes / GIB:.1f} GiB usable",
        f"model: {plan.parameters / 1e6:.1f}M parameters, {plan.trainable / 1e6:.2f}M trained"
        f" ({mode(plan)}), block {block_size}",
        f"memory needed: {plan.need_bytes / GIB:.1f} GiB of {hw.memory_bytes * HEADROOM / GIB:.1f}"
        f" GiB budget",
    ]
    if plan.fits:
        checkpointing = "on" if plan.gradient_checkpointing else "off"
        lines.append(
            f"settings: --per_device_train_batch_size {plan.per_device_train_batch_size} "
            f"--gradient_accumulation_steps {plan.gradient_accumulation_steps}, precision "
            f"{plan.precision}, gradient checkpointing {checkpointing}"
        )
    return "\n".join(lines)


def compare_modes(config: PretrainedConfig, block_size: int, target_batch: int, lora_r: int) -> str:
    """One line each for full fine-tuning and LoRA: memory needed and whether it fits."""
    lines = []
    for lora in (False, True):
        plan = make_plan(config, block_size, target_batch, lora, lora_r=lora_r)
        how = f"batch {plan.per_device_train_batch_size}" + (
            " with gradient checkpointing" if plan.gradient_checkpointing else ""
        )
        verdict = how if plan.fits else "does not fit"
        lines.append(f"  {mode(plan):17} {plan.need_bytes / GIB:6.1f} GiB  {verdict}")
    return "\n".join(lines)


def check_fits(plan: Plan, block_size: int) -> None:
    if plan.fits:
        return
    hints = [] if plan.lora_r else ["--lora"]
    if block_size > 128:
        hints.append(f"--block_size {block_size // 2}")
    hints.append("a smaller --model_name_or_path (see 'tailorgpt plan --all')")
    raise UserError(
        f"this run needs about {plan.need_bytes / GIB:.1f} GiB even at batch 1 with gradient "
        f"checkpointing, more than the {plan.hardware.memory_bytes * HEADROOM / GIB:.1f} GiB "
        f"budget on {plan.hardware.device}: try {', or '.join(hints)}"
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def matmul_flops(hardware: Hardware) -> float:
    """Matrix-multiply speed in the training precision: no step can go faster, so it tells,
    before paying for them, which sizes are too slow to measure here."""
    n = 4096 if hardware.device == "cuda" else 1024  # big enough to reach the device's speed
    a = torch.randn(n, n, device=hardware.device, dtype=DTYPES.get(hardware.precision))
    a @ a  # warm-up
    synchronize(hardware.device)
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    synchronize(hardware.device)
    return 5 * 2 * n**3 / (time.perf_counter() - start)


def step_seconds(config: PretrainedConfig, plan: Plan, block_size: int) -> float:
    """Seconds per training step with the plan's settings, on random-init weights: speed
    does not depend on the values, so nothing is downloaded."""
    device = plan.hardware.device
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if plan.lora_r:
        model.enable_input_require_grads()  # as training does: frozen embeddings
        lora = LoraConfig(r=plan.lora_r, target_modules=list(LORA_TARGETS), fan_in_fan_out=True)
        model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    shape = (plan.per_device_train_batch_size, block_size)
    ids = torch.randint(config.vocab_size, shape, device=device)
    dtype = DTYPES.get(plan.precision)
    times = []
    for _ in range(MEASURE_STEPS):
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def tokens_per_second(
    config: PretrainedConfig, plan: Plan, block_size: int, flops: float
) -> float | None:
    """Measured training speed; None when the plan does not fit, or when its steps would
    take over MEASURE_BUDGET_S even at `flops` (6 per parameter and token, Kaplan et al.)."""
    tokens = plan.per_device_train_batch_size * block_size
    if not plan.fits or MEASURE_STEPS * 6 * plan.parameters * tokens / flops > MEASURE_BUDGET_S:
        return None
    speed = tokens / step_seconds(config, plan, block_size)
    gc.collect()  # free this size before the next one is built
    if plan.hardware.device == "cuda":
        torch.cuda.empty_cache()
    return speed


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def speed_cell(speed: float | None, train_tokens: int | None) -> str:
    if speed is None:
        return "not measured"
    return duration(train_tokens / speed) if train_tokens else f"{speed:,.0f}"


def describe_speed(
    config: PretrainedConfig, plan: Plan, block_size: int, train_tokens: int | None
) -> str:
    speed = tokens_per_second(config, plan, block_size, matmul_flops(plan.hardware))
    if speed is None:
        why = "does not fit" if not plan.fits else "too slow to step here"
        return f"speed: not measured ({why})"
    epoch = f"; an epoch of {train_tokens:,} tokens: {duration(train_tokens / speed)}"
    return f"speed: {speed:,.0f} tokens/s measured{epoch if train_tokens else ''}"


def plan_cells(plan: Plan) -> list[str]:
    memory = f"{plan.need_bytes / GIB:.1f}G"
    if not plan.fits:
        return ["no", memory, "-", "-", "-"]
    checkpointing = "on" if plan.gradient_checkpointing else "off"
    batch, accumulation = plan.per_device_train_batch_size, plan.gradient_accumulation_steps
    return ["yes", memory, str(batch), str(accumulation), checkpointing]


def format_table(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the rest right."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return ["  ".join(pad(row, widths)) for row in rows]


def pad(row: list[str], widths: list[int]) -> list[str]:
    cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
    return [row[0].ljust(widths[0]), *cells[1:]]


def plan_all(
    block_size: int, target_batch: int, lora_r: int, measure: bool, train_tokens: int | None
) -> str:
    """Every built-in size on this machine, full fine-tuning and LoRA side by side."""
    hardware = find_hardware()
    flops = matmul_flops(hardware) if measure else 0.0
    speed = ["epoch" if train_tokens else "tok/s"] if measure else []
    mode_heads = ["fits", "memory", "batch", "accum", "ckpt", *speed]
    rows = [["model", "params", "|", *mode_heads, "|", *mode_heads]]
    for name in (TINY, *BUILT_IN):
        config = base_config(name)
        block = min(block_size, config.n_positions)  # tiny's context is shorter
        row = [name if block == block_size else f"{name} (block {block})"]
        for lora in (False, True):
            plan = make_plan(config, block, target_batch, lora, hardware, lora_r)
            if not lora:
                row += [f"{plan.parameters / 1e6:.1f}M"]
            row += ["|", *plan_cells(plan)]
            if measure:
                row.append(speed_cell(tokens_per_second(config, plan, block, flops), train_tokens))
        rows.append(row)
    table = format_table(rows)
    full_at, lora_at = table[0].index("|"), table[0].rindex("|")  # where each mode's cells start
    lines = [
        f"hardware: {hardware.device} ({hardware.name}), {hardware.memory_bytes / GIB:.1f} GiB "
        f"usable, budget {hardware.memory_bytes * HEADROOM / GIB:.1f} GiB, precision "
        f"{hardware.precision}; block {block_size}, effective batch {target_batch}",
        " " * full_at
        + "| full fine-tuning".ljust(lora_at - full_at)
        + f"| LoRA r={lora_r} ({', '.join(LORA_TARGETS)})",
        *table,
        "memory: estimated; batch x accum keeps the effective batch; ckpt: gradient checkpointing",
    ]
    if measure:
        measured = f"time for {train_tokens:,} tokens" if train_tokens else "tokens per second"
        lines.append(
            f"{speed[0]}: {measured}, from {MEASURE_STEPS - 1} timed training steps on "
            f"random-init weights; not measured: does not fit, or too slow to step here"
        )
    return "\n".join(lines)
