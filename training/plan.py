"""Will this run fit? Hardware found, memory needed, and the settings that make it fit.

Estimates, not measurements: weights, gradients and AdamW moments per trainable parameter,
plus activations per sequence from the transformer activation formula of Korthikanti et al.
(2022), `layers * tokens * hidden * (34 + 5 * heads * tokens / hidden)` bytes in half
precision, and the output logits. Good to about 20%, enough to choose a batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from tailorgpt.artifacts import UserError

GIB = 1024**3
HEADROOM = 0.85  # leave room for the framework, the allocator and the rest of the machine
LORA_RANK = 8
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's attention and MLP projections
MEMORY_LIMIT_ENV = "TAILORGPT_MEMORY_LIMIT_GB"  # plan against less memory than is present


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
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    precision: str
    need_bytes: int
    fits: bool


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


def count_parameters(config: PretrainedConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def lora_parameters(config: PretrainedConfig) -> int:
    """LoRA on GPT-2's attention and MLP projections (c_attn, c_proj, c_fc)."""
    h = config.n_embd
    inner = config.n_inner or 4 * h
    per_layer = (h + 3 * h) + (h + h) + (h + inner) + (inner + h)  # in + out of each
    return config.n_layer * LORA_RANK * per_layer


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


def make_plan(
    config: PretrainedConfig,
    block_size: int,
    target_batch: int,
    lora: bool,
    hardware: Hardware | None = None,
) -> Plan:
    """The largest per-device batch (power of two, at most `target_batch`) that fits, first
    without and then with gradient checkpointing; accumulation keeps the effective batch."""
    hardware = hardware or find_hardware()
    parameters = count_parameters(config)
    trainable = lora_parameters(config) if lora else parameters
    budget = hardware.memory_bytes * HEADROOM
    states = state_bytes(parameters, trainable)
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
                    batch,
                    max(1, target_batch // batch),
                    checkpointing,
                    hardware.precision,
                    need,
                    True,
                )
            batch //= 2
    need = states + activation_bytes(config, block_size, hardware.precision, True)
    return Plan(
        hardware, parameters, trainable, 1, target_batch, True, hardware.precision, need, False
    )


def describe(plan: Plan, block_size: int, lora: bool) -> str:
    hw = plan.hardware
    lines = [
        f"hardware: {hw.device} ({hw.name}), {hw.memory_bytes / GIB:.1f} GiB usable",
        f"model: {plan.parameters / 1e6:.1f}M parameters, {plan.trainable / 1e6:.2f}M trained"
        f" ({'LoRA r=' + str(LORA_RANK) if lora else 'full fine-tuning'}), block {block_size}",
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


def compare_modes(config: PretrainedConfig, block_size: int, target_batch: int) -> str:
    """One line each for full fine-tuning and LoRA: memory needed and whether it fits."""
    lines = []
    for lora in (False, True):
        plan = make_plan(config, block_size, target_batch, lora)
        how = f"batch {plan.per_device_train_batch_size}" + (
            " with gradient checkpointing" if plan.gradient_checkpointing else ""
        )
        verdict = how if plan.fits else "does not fit"
        mode = "LoRA" if lora else "full fine-tuning"
        lines.append(f"  {mode:17} {plan.need_bytes / GIB:6.1f} GiB  {verdict}")
    return "\n".join(lines)


def check_fits(plan: Plan, block_size: int, lora: bool) -> None:
    if plan.fits:
        return
    hints = [] if lora else ["--lora"]
    if block_size > 128:
        hints.append(f"--block_size {block_size // 2}")
    hints.append("a smaller --base-model")
    raise UserError(
        f"this run needs about {plan.need_bytes / GIB:.1f} GiB even at batch 1 with gradient "
        f"checkpointing, more than the {plan.hardware.memory_bytes * HEADROOM / GIB:.1f} GiB "
        f"budget on {plan.hardware.device}: try {', or '.join(hints)}"
    )
