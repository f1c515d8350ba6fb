"""Trainer callbacks: keep the best model, stop early, write sample generations."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tailorgpt.artifacts import write_json

BEST = "best"
SAMPLES = "samples"


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
            if state.is_world_process_zero:
                self.save(model)
            self.record.update(loss=loss, step=state.global_step, evaluations_since=0)
        else:
            self.record["evaluations_since"] += 1
            if self.patience and self.record["evaluations_since"] >= self.patience:
                control.should_training_stop = True
                self.record["stopped_early_at"] = state.global_step
        if state.is_world_process_zero:
            write_json(self.record_path, self.record)

    def save(self, model: PreTrainedModel) -> None:
        tmp = self.directory.with_name(BEST + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(self.directory, ignore_errors=True)
        tmp.replace(self.directory)

    def restore_into(self, work: Path, load_base: Callable[[], PreTrainedModel]) -> dict[str, Any]:
        """Make the best weights the run's model; return the record.

        A LoRA run saved only its adapter: it is merged into a fresh copy of the base
        weights, so the run directory holds a plain GPT-2 that exports like any other.
        """
        if (self.directory / "adapter_config.json").is_file():
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
        if not state.is_world_process_zero:
            return
        self.directory.mkdir(exist_ok=True)
        was_training = model.training
        model.eval()
        lines = []
        # Sampling must not move the training run's random state.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
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
        path = self.directory / f"step-{state.global_step:06d}.txt"
        path.write_text("\n\n---\n\n".join(lines) + "\n", encoding="utf-8")
