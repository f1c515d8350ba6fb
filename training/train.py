"""Fine-tune a GPT-2 on the user's text with the transformers Trainer.

Argument names follow transformers' run_clm.py so people can bring what they know.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging as hf_logging

from artifacts import (
    HELDOUT,
    HELDOUT_BLOCKS,
    UserError,
    atomic_dir,
    partial_path,
    write_json,
    write_manifest,
)
from training.arguments import LEARNING_RATE, TINY_LEARNING_RATE, TrainArgs
from training.callbacks import KeepBest, ReportProgress, WriteSamples, perplexity
from training.data import (
    BLOCKS,
    cache_dir,
    cached_blocks,
    nonempty_blocks,
    resolve_block_size,
    split_blocks,
)
from training.model import (
    TINY,
    build_tiny,
    chat_template_option,
    load_base_config,
    load_base_model,
    weights_fingerprint,
)
from training.plan import (
    LORA_TARGETS,
    Plan,
    check_fits,
    describe,
    find_hardware,
    plan_processes,
)
from training.plots import plot_loss_curve
from training.prepare import read_documents, read_prepared

CHECKPOINTS = "checkpoints"
SHARD_UNIT = "GPT2Block"  # FSDP wraps each transformer block on its own
SAMPLE_PROMPT_TOKENS = 8


def tokenize(
    documents: list[str],
    prepared: tuple[list[str], list[str]] | None,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    args: TrainArgs,
) -> tuple[list[list[int]], list[list[int]], bool]:
    """Train and validation blocks, and whether they all came from the cache: a prepared
    dataset keeps its split, other documents are split at random."""
    if prepared is None:
        blocks, cached = cached_blocks(documents, tokenizer, block_size)
        return *split_blocks(blocks, args.validation_split_percentage, args.seed), cached
    packed = [cached_blocks(split, tokenizer, block_size) for split in prepared]
    train, validation = (nonempty_blocks(blocks, block_size) for blocks, _ in packed)
    return train, validation, all(cached for _, cached in packed)


def as_dataset(blocks: list[list[int]]) -> Dataset:
    # Labels equal the inputs (the model shifts them); no padding, so EOS stays in the loss.
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def loss_metrics(loss: float) -> dict[str, float]:
    return {"loss": loss, "perplexity": perplexity(loss)}


def make_trainer(
    model: PreTrainedModel,
    args: TrainArgs,
    plan: Plan,
    work: Path,
    train: list[list[int]],
    validation: list[list[int]],
    callbacks: list[TrainerCallback],
) -> Trainer:
    is_tiny = args.model_name_or_path == TINY
    learning_rate = args.learning_rate or (TINY_LEARNING_RATE if is_tiny else LEARNING_RATE)
    training_args = TrainingArguments(
        output_dir=str(work / CHECKPOINTS),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=learning_rate,
        # The plan lowers the per-device batch to fit memory; accumulation keeps the
        # effective batch the user asked for.
        per_device_train_batch_size=plan.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps
        * plan.gradient_accumulation_steps,
        # Under FSDP the wrapper checkpoints each block itself (see fsdp_config).
        activation_checkpointing=plan.gradient_checkpointing and not args.fsdp,
        use_cpu=plan.hardware.device == "cpu",  # also what lets torchrun use gloo on CPUs
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        # transformers 5 reads a value below 1 as a share of the steps (warmup_ratio is gone).
        warmup_steps=warmup_steps(args.warmup_ratio),
        weight_decay=args.weight_decay,
        eval_strategy="steps" if args.eval_steps else "epoch",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=args.logging_steps,
        seed=args.seed,
        data_seed=args.seed,
        # transformers 5 has no logging_dir: the TensorBoard callback below gets its own
        # writer, so the event files stay in RUN_DIR/logs.
        report_to=[],
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # GPT-2 uses every weight in each forward
        dataloader_num_workers=0,
        disable_tqdm=True,  # the Trainer then prints with PrinterCallback, removed below
        **fsdp_arguments(args.fsdp, plan.gradient_checkpointing),
    )
    with fsdp_on_cpu(args.fsdp and plan.hardware.device == "cpu"):
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=as_dataset(train),
            eval_dataset=as_dataset(validation),
            data_collator=default_data_collator,
            callbacks=[*callbacks, tensorboard(work)],
        )
    trainer.remove_callback(PrinterCallback)  # ReportProgress among `callbacks` reports
    return trainer


def fsdp_arguments(fsdp: bool, checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments for fully sharded data parallel (FSDP2 through accelerate): each
    GPT-2 block is its own shard unit; weights, gradients and optimizer state are split
    across the processes. Checkpoints are saved sharded (one file per process, resumable
    on the same number of processes); the run directory gets the gathered full weights."""
    if not fsdp:
        return {}
    return {
        "fsdp": True,  # full shard, auto-wrapped per fsdp_config (5.x drops the strings)
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": [SHARD_UNIT],
            "state_dict_type": "SHARDED_STATE_DICT",
            "reshard_after_forward": True,  # ZeRO-3: the full-shard strategy
            "activation_checkpointing": checkpointing,
        },
    }


@contextmanager
def fsdp_on_cpu(enabled: bool) -> Iterator[None]:
    """Let accelerate turn FSDP on for CPU processes (gloo), as it does for GPUs.

    accelerate 1.x's AcceleratorState enables its FSDP plugin only when the processes are
    MULTI_GPU (or another accelerator type); for MULTI_CPU it drops the plugin without a
    word and the Trainer runs plain DDP. FSDP2 itself (torch's fully_shard) runs on CPU with
    gloo, so while the Trainer builds its accelerator the processes are declared
    accelerator-type; the device stays the CPU. Not needed, and not used, on GPUs.
    """
    if not enabled:
        yield
        return
    state = PartialState()
    state._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    try:
        yield
    finally:
        if state.distributed_type == DistributedType.MULTI_GPU:
            state._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    if not AcceleratorState().is_fsdp2:
        raise RuntimeError("accelerate did not enable FSDP2")


def warmup_steps(ratio: float) -> float:
    # 5.x reads 1 and more as a number of steps: a whole-run warm-up stays a share.
    return min(ratio, 0.999999)


def tensorboard(work: Path) -> TensorBoardCallback:
    """TensorBoard events in RUN_DIR/logs, written by the main process only."""
    if not PartialState().is_main_process:
        return TensorBoardCallback()  # writes only on process zero, so never creates one
    from torch.utils.tensorboard import SummaryWriter

    return TensorBoardCallback(SummaryWriter(log_dir=str(work / "logs")))


def with_lora(model: PreTrainedModel, args: TrainArgs, checkpointing: bool) -> PeftModel:
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(LORA_TARGETS),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
    )
    if checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would cut the gradient path
    return get_peft_model(model, config)


def base_model_path(args: TrainArgs, documents: list[str], work: Path) -> str:
    """The hub id or directory to load; for `tiny`, build it inside the run first."""
    if args.model_name_or_path != TINY:
        return args.model_name_or_path
    base = work / "base"
    if not (base / "config.json").is_file():
        build_tiny(documents, base, args.seed)
    return str(base)


def train(args: TrainArgs) -> dict[str, Any]:
    """Train and write RUN_DIR (model, tokenizer, metrics.json, loss_curve.png, manifest).

    Under `torchrun --nproc_per_node N` every process trains its share of each batch
    (DistributedDataParallel through the Trainer); only the main process writes files.
    """
    template = chat_template_option(args.chat_template)  # checked before training
    if args.save_adapter and not args.lora:
        raise UserError("--save_adapter keeps the LoRA adapter of a run: add --lora")
    hf_logging.disable_progress_bar()  # 5.x draws bars as it saves and loads; one is ours
    prepared = read_prepared(args.train_file)  # a prepared dataset brings its own split
    documents = prepared[0] if prepared else read_documents([args.train_file])
    checkpoint = last_complete_checkpoint(args.output_dir) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint and checkpoint is None:
        raise UserError(
            f"--resume_from_checkpoint: no checkpoint under {partial_path(args.output_dir)}: "
            "run without it to start fresh"
        )
    set_seed(args.seed)
    started = time.monotonic()
    hardware = find_hardware()
    process = PartialState(cpu=hardware.device == "cpu")  # one process, or one of torchrun's
    if args.fsdp and process.num_processes < 2:
        raise UserError("--fsdp shards across processes: launch with torchrun --nproc_per_node N")
    output = (
        atomic_dir(args.output_dir, keep_on_failure=holds_checkpoint, reuse=bool(checkpoint))
        if process.is_main_process
        else nullcontext(partial_path(args.output_dir))
    )
    with output as work:
        with process.main_process_first():  # the main process builds `tiny` once
            base = base_model_path(args, documents, work)
        config = load_base_config(base)
        block_size = resolve_block_size(args.block_size, config)
        plan = plan_processes(
            config,
            block_size,
            args.per_device_train_batch_size,
            args.lora,
            hardware,
            process.num_processes,
            args.fsdp,
            args.lora_r,
        )
        check_fits(plan, block_size)
        if plan.shards > 1 and not args.fsdp:
            args = replace(args, fsdp=True)  # the model fits only sharded across the GPUs
        if process.is_main_process:
            print(describe(plan, block_size), flush=True)
        model, tokenizer = load_base_model(base, config)
        # What a kept adapter names its base by; an export of that base records the same.
        base_fingerprint = weights_fingerprint(model)
        if args.lora:
            model = with_lora(model, args, plan.gradient_checkpointing)
        with process.main_process_first():  # the main process tokenizes, the others reuse
            train_blocks, validation_blocks, cached = tokenize(
                documents, prepared, tokenizer, block_size, args
            )
        if process.is_main_process:
            done = "from the cache in" if cached else "cached for the next run in"
            print(f"tokenized data: {done} {cache_dir() / BLOCKS}", flush=True)
        keep_best = KeepBest(work, args.early_stopping_patience)
        openings = [block[:SAMPLE_PROMPT_TOKENS] for block in validation_blocks[:3]]
        samples = WriteSamples(work, tokenizer, openings)
        callbacks = [keep_best, samples, ReportProgress(work, keep_best, samples)]
        trainer = make_trainer(model, args, plan, work, train_blocks, validation_blocks, callbacks)
        before = before_metrics(trainer, work)
        run = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if keep_best.record.get("evaluated_step") != trainer.state.global_step:
            trainer.evaluate()  # the final weights compete for best too
        if not process.is_main_process:
            return {}  # the main process writes the run
        best = keep_best.restore_into(
            work, lambda: load_base_model(base, config)[0], args.save_adapter
        )
        if template:
            tokenizer.chat_template = template
        tokenizer.save_pretrained(work, save_jinja_files=False)  # export reads its config
        if not args.save_adapter:  # a kept adapter needs the `tiny` it was trained on
            shutil.rmtree(work / "base", ignore_errors=True)
        (work / "before.json").unlink()
        metrics = {
            "base_model": args.model_name_or_path,
            "block_size": block_size,
            "documents": len(documents) + (len(prepared[1]) if prepared else 0),
            "train_blocks": len(train_blocks),
            "validation_blocks": len(validation_blocks),
            "train_tokens": len(train_blocks) * block_size,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora": args.lora,
            "save_adapter": args.save_adapter,
            "base_fingerprint": base_fingerprint,
            "processes": process.num_processes,
            "fsdp": args.fsdp,
            "optimizer_steps": trainer.state.global_step,
            "resumed_from_checkpoint": checkpoint.name if checkpoint else None,
            "epochs": trainer.state.epoch,
            "train_seconds": round(time.monotonic() - started, 2),
            "train_tokens_per_second": tokens_per_second(run, trainer, block_size, checkpoint),
            "validation_before": before,
            "validation_after": loss_metrics(best["loss"]),
            "best_step": best["step"],
            "stopped_early_at": best.get("stopped_early_at"),
        }
        write_json(work / "metrics.json", metrics)
        # The export stage checks ONNX parity on text the model never trained on.
        write_json(work / HELDOUT, {"input_ids": validation_blocks[:HELDOUT_BLOCKS]})
        plot_loss_curve(trainer.state.log_history, before["loss"], work / "loss_curve.png")
        inputs = {"train_file": str(args.train_file)}
        write_manifest(work, "train", inputs, args=_jsonable(asdict(args)))
    return metrics


def tokens_per_second(
    run: TrainOutput, trainer: Trainer, block_size: int, checkpoint: Path | None
) -> float:
    """Training tokens per second over this session's train_runtime (which includes the
    evaluations and samples that run during training)."""
    resumed_at = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    tokens_per_step = trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps
    tokens_per_step *= trainer.args.world_size * block_size
    return round((run.global_step - resumed_at) * tokens_per_step / run.metrics["train_runtime"], 1)


def before_metrics(trainer: Trainer, work: Path) -> dict[str, float]:
    """Validation loss of the untrained model, kept across a resume so it is measured once."""
    path = work / "before.json"
    if path.is_file():
        return json.loads(path.read_text())
    metrics = loss_metrics(trainer.evaluate()["eval_loss"])  # every process takes part
    unmark_prepared(trainer)
    if trainer.is_world_process_zero():
        write_json(path, metrics)
    return metrics


def unmark_prepared(trainer: Trainer) -> None:
    """Let train() wrap the model in DistributedDataParallel after an evaluation.

    accelerate (1.16) marks a model prepared for evaluation as prepared for good, and its
    train-time prepare then returns it unwrapped: under torchrun every process would train
    alone on its share, gradients never averaged. Under FSDP the evaluation already
    sharded the model for training, so the mark stays.
    """
    model = trainer.model
    if trainer.is_fsdp_enabled or not getattr(model, "_is_accelerate_prepared", False):
        return
    if model in trainer.accelerator._models:
        trainer.accelerator._models.remove(model)
    model._is_accelerate_prepared = False


def holds_checkpoint(work: Path) -> bool:
    return any((work / CHECKPOINTS).glob("checkpoint-*/trainer_state.json"))


def last_complete_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint that finished saving (a kill can land mid-save).

    The Trainer writes trainer_state.json last, so its presence marks a whole checkpoint.
    """
    checkpoints = partial_path(Path(output)) / CHECKPOINTS
    complete = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
