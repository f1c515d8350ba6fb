"""Memory planning: settings that fit, and a clear refusal when nothing does."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, train_args
from test_train import assert_clean_failure
from transformers import GPT2Config

from tailorgpt.artifacts import UserError
from training.plan import GIB, Hardware, check_fits, make_plan

GPT2_SMALL = GPT2Config()
GPT2_XL = GPT2Config(n_layer=48, n_embd=1600, n_head=25)


def gpu(gib: float) -> Hardware:
    return Hardware("cuda", "test GPU", int(gib * GIB), "bf16")


def test_a_roomy_device_keeps_the_batch() -> None:
    plan = make_plan(GPT2_SMALL, 1024, 8, lora=False, hardware=gpu(80))
    assert (plan.per_device_train_batch_size, plan.gradient_accumulation_steps) == (8, 1)
    assert plan.fits and not plan.gradient_checkpointing and plan.precision == "bf16"
    assert 120e6 < plan.parameters < 130e6


def test_less_memory_lowers_the_batch_and_keeps_the_effective_batch() -> None:
    plan = make_plan(GPT2_SMALL, 1024, 8, lora=False, hardware=gpu(12))
    assert plan.fits and plan.per_device_train_batch_size < 8
    assert plan.per_device_train_batch_size * plan.gradient_accumulation_steps == 8


def test_tight_memory_turns_on_gradient_checkpointing() -> None:
    plan = make_plan(GPT2_SMALL, 1024, 8, lora=False, hardware=gpu(4))
    assert plan.fits and plan.gradient_checkpointing and plan.per_device_train_batch_size >= 1


def test_lora_fits_where_full_fine_tuning_cannot() -> None:
    full = make_plan(GPT2_XL, 1024, 8, lora=False, hardware=gpu(16))
    lora = make_plan(GPT2_XL, 1024, 8, lora=True, hardware=gpu(16))
    assert not full.fits and lora.fits and lora.trainable < full.trainable / 100
    with pytest.raises(UserError, match="try --lora"):
        check_fits(full, 1024, lora=False)


@pytest.fixture
def xl_config_dir(tmp_path: Path) -> Path:
    GPT2_XL.save_pretrained(tmp_path / "gpt2-xl-shape")  # config only: planning needs no weights
    return tmp_path / "gpt2-xl-shape"


def test_plan_command_shows_hardware_and_settings() -> None:
    result = run_cli("plan", "--base-model", "tiny")
    assert "hardware: cpu" in result.stdout and "settings: --per_device_train_batch_size" in (
        result.stdout
    )
    assert "full fine-tuning" in result.stdout and "LoRA" in result.stdout


def test_a_run_that_cannot_fit_stops_before_it_starts(xl_config_dir: Path, tmp_path: Path) -> None:
    limit = {"TAILORGPT_MEMORY_LIMIT_GB": "4"}
    result = run_cli("plan", "--base-model", str(xl_config_dir), check=False, env=limit)
    assert_clean_failure(result, "budget on cpu", "--lora")
    out = tmp_path / "run"
    result = run_cli(*train_args(out, base_model=str(xl_config_dir)), check=False, env=limit)
    assert_clean_failure(result, "even at batch 1")
    assert not out.exists() and not (tmp_path / "run.partial").exists()
