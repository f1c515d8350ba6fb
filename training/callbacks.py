"""Trainer callbacks: keep the best model, stop early, write sample generations, and
report progress."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_json
from training.arguments import ADAPTER_DIR

BEST = "best"
SAMPLES = "samples"
TRAINER_LOG = Path("logs") / "trainer.jsonl"


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: a diverged run must not overflow


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP split the weights across processes (each holds a DTensor shard)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded model, gathered: a collective that every process
    calls; the main process gets them (on the CPU), the others an empty dict."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    # Gathered, tied weights (GPT-2's lm_head and wte) come back as separate copies: keep
    # the first name of each, as an unsharded model's checkpoint does.
    first: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(parameter), name) != name:
            weights.pop(name, None)
    return weights


@contextmanager
def gathered(root: FSDPModule | None) -> Iterator[None]:
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


class KeepBest(TrainerCallback):
    """Keep the weights with the lowest validation loss; stop after `patience` evaluations
    without improvement.

    Written here because transformers' EarlyStoppingCallback requires load_best_model_at_end,
    which ties checkpoints to evaluations; this project checkpoints every --save_steps for
    crash recovery, whatever the evaluation schedule. The record lives on disk, so a resumed
    run continues with the best it had.
    """

    def __init__(self, work: Path, patience: int | None) -> None:
        self.directory = work / BEST
        self.record_path = work / "best.json"
        self.patience = patience
        self.record: dict[str, Any] = {"loss": math.inf, "step": 0, "evaluations_since": 0}
        if self.record_path.is_file():
            self.record = json.loads(self.record_path.read_text())

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float],
        model: PreTrainedModel,
        **kwargs: Any,
    ) -> None:
        if state.global_step == self.record.get("evaluated_step"):
            return  # the closing evaluation of weights already judged at this step
        self.record["evaluated_step"] = state.global_step
        # Every process sees the same gathered loss and takes the same decision (stopping
        # must be unanimous); only the main process writes.
        loss = metrics["eval_loss"]
        if loss < self.record["loss"]:
            self.save(model, state.is_world_process_zero)
            self.record.update(loss=loss, step=state.global_step, evaluations_since=0)
        else:
            self.record["evaluations_since"] += 1
            if self.patience and self.record["evaluations_since"] >= self.patience:
                control.should_training_stop = True
                self.record["stopped_early_at"] = state.global_step
        if state.is_world_process_zero:
            write_json(self.record_path, self.record)

    def save(self, model: PreTrainedModel, main: bool) -> None:
        # Sharded (FSDP) weights are gathered by every process; the main one writes them.
        weights = full_state_dict(model) if is_sharded(model) else None
        if not main:
            return
        tmp = self.directory.with_name(BEST + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights)
        shutil.rmtree(self.directory, ignore_errors=True)
        tmp.replace(self.directory)

    def restore_into(
        self, work: Path, load_base: Callable[[], PreTrainedModel], keep_adapter: bool = False
    ) -> dict[str, Any]:
        """Make the best weights the run's model; return the record.

        A LoRA run saved only its adapter: it is merged into a fresh copy of the base
        weights, so the run directory holds a plain GPT-2 that exports like any other.
        `keep_adapter` keeps peft's files of it in RUN_DIR/adapter too, unmerged.
        """
        if (self.directory / ADAPTER_CONFIG).is_file():
            if keep_adapter:
                (work / ADAPTER_DIR).mkdir(exist_ok=True)  # a run that died merging, resumed
                for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    shutil.copy(self.directory / name, work / ADAPTER_DIR / name)
            merged = PeftModel.from_pretrained(load_base(), self.directory).merge_and_unload()
            merged.save_pretrained(work)
        else:
            for path in self.directory.iterdir():
                shutil.copy(path, work / path.name)
        shutil.rmtree(self.directory)
        self.record_path.unlink()
        return self.record


class WriteSamples(TrainerCallback):
    """At each evaluation, continue a few held-out openings and write them to samples/."""

    def __init__(
        self, work: Path, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]
    ) -> None:
        self.directory = work / SAMPLES
        self.tokenizer = tokenizer
        self.prompts = prompts

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: PreTrainedModel,
        **kwargs: Any,
    ) -> None:
        sharded = is_sharded(model)  # every process takes part in a sharded forward
        if not (state.is_world_process_zero or sharded):
            return
        was_training = model.training
        model.eval()
        lines = []
        # Sampling must not move the training run's random state.
        # A LoRA model generates through its inner model, past the sharded root's hooks:
        # the root's own weights (embeddings, final norm) are gathered for the sampling.
        root = model if isinstance(model, FSDPModule) else None
        with torch.no_grad(), torch.random.fork_rng(devices=[]), gathered(root):
            torch.manual_seed(0)
            for prompt in self.prompts:
                ids = torch.tensor([prompt], device=model.device)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=48,
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.95,
                    pad_token_id=self.tokenizer.eos_token_id,
                )
                prompt_text = self.tokenizer.decode(prompt)
                continuation = self.tokenizer.decode(
                    out[0, len(prompt) :], skip_special_tokens=True
                )
                lines.append(f"[{prompt_text}]{continuation}")
        model.train(was_training)
        if not state.is_world_process_zero:
            return
        self.directory.mkdir(exist_ok=True)
        text = "\n\n---\n\n".join(lines) + "\n"
        self.path(state.global_step).write_text(text, encoding="utf-8")

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:06d}.txt"


class ReportProgress(TrainerCallback):
    """What the terminal shows: one progress bar and one line per evaluation.

    It takes the place of transformers' PrinterCallback / ProgressCallback, whose raw log
    dictionaries go to TRAINER_LOG (JSON lines) instead. Only the main process reports.
    Added after KeepBest and WriteSamples, so an evaluation's record and samples exist
    when its line is written.
    """

    def __init__(self, work: Path, keep_best: KeepBest, samples: WriteSamples) -> None:
        self.log_path = work / TRAINER_LOG
        self.keep_best = keep_best
        self.samples = samples
        self.bar: tqdm | None = None
        self.train_loss: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.forget_steps_after(state.global_step)
        # A resumed run starts with the losses its checkpoint logged.
        self.train_loss = next(
            (e["loss"] for e in reversed(state.log_history) if "loss" in e), None
        )
        self.bar = tqdm(
            total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True
        )

    def forget_steps_after(self, step: int) -> None:
        """A killed run logged steps past its last checkpoint; the resumed run, which starts
        from that checkpoint, logs them anew, so the killed run's are dropped."""
        if not self.log_path.is_file():
            return
        lines = self.log_path.read_text(encoding="utf-8").splitlines(keepends=True)
        # A line the kill cut short has no newline.
        kept = [ln for ln in lines if ln.endswith("\n") and json.loads(ln)["step"] <= step]
        self.log_path.write_text("".join(kept), encoding="utf-8")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float],
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.train_loss = logs.get("loss", self.train_loss)
        self.log_path.parent.mkdir(exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps({**logs, "step": state.global_step}) + "\n")

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float],
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        line = self.evaluation_line(state.global_step, metrics["eval_loss"])
        if self.bar is not None:
            self.bar.write(line)  # above the bar, which stays whole
        else:
            print(line, flush=True)  # the evaluations before and after training

    def evaluation_line(self, step: int, loss: float) -> str:
        parts = [f"step {step}"]
        if step == 0:
            parts.append("before training")
        elif self.train_loss is not None:
            parts.append(f"train loss {self.train_loss:.3f}")
        parts.append(f"validation loss {loss:.3f}, perplexity {perplexity(loss):.1f}")
        if step > 0:
            best = self.keep_best.record
            won = best["step"] == step
            parts.append("new best" if won else f"best {best['loss']:.3f} at step {best['step']}")
        parts.append(f"samples {self.samples.path(step)}")
        return " | ".join(parts)
