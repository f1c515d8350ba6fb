"""Memory planning: settings that fit, and a clear refusal when nothing does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import assert_clean_failure, cli, train_args
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from artifacts import UserError
from training.plan import (
    BUILT_IN,
    GIB,
    LORA_TARGETS,
    Hardware,
    base_config,
    check_fits,
    count_parameters,
    describe,
    describe_speed,
    find_hardware,
    make_plan,
    plan_processes,
    state_bytes,
    tokens_per_second,
)

OFFLINE = {"HF_HUB_OFFLINE": "1"}  # built-in sizes must plan without the hub

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
        check_fits(full, 1024)


@pytest.fixture
def xl_config_dir(tmp_path: Path) -> Path:
    GPT2_XL.save_pretrained(tmp_path / "gpt2-xl-shape")  # config only: planning needs no weights
    return tmp_path / "gpt2-xl-shape"


def test_plan_command_shows_hardware_and_settings(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "plan", "--base-model", "tiny")
    assert result.returncode == 0, result.stderr
    assert "hardware: cpu" in result.stdout and "settings: --per_device_train_batch_size" in (
        result.stdout
    )
    assert "full fine-tuning" in result.stdout and "LoRA" in result.stdout


def test_a_run_that_cannot_fit_stops_before_it_starts(
    xl_config_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TAILORGPT_MEMORY_LIMIT_GB", "4")
    result = cli(capsys, "plan", "--base-model", str(xl_config_dir))
    assert_clean_failure(result, "budget on cpu", "--lora")
    out = tmp_path / "run"
    result = cli(capsys, *train_args(out, base_model=str(xl_config_dir)))
    assert_clean_failure(result, "even at batch 1")
    assert not out.exists() and not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("gpt2", 124_439_808),
        ("openai-community/gpt2-medium", 354_823_168),  # the hub's current name works too
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("uer/gpt2-chinese-cluecorpussmall", 102_068_736),
    ],
)
def test_built_in_sizes_have_their_published_parameter_counts(name: str, parameters: int) -> None:
    assert count_parameters(base_config(name)) == parameters


def test_a_built_in_size_plans_without_a_download(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["plan", "--base-model", "gpt2-xl", "--lora", "--lora_r", "64"]
    result = cli(capsys, *args, env=OFFLINE, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert "model: 1557.6M parameters, 78.64M trained (LoRA r=64)" in result.stdout
    assert re.search(r"LoRA r=64 +\d+\.\d GiB", result.stdout)


def test_the_lora_rank_is_planned_as_given_and_matches_peft() -> None:
    config = base_config("tiny")
    r8, r64 = (make_plan(config, 256, 8, True, gpu(80), lora_r=r) for r in (8, 64))
    assert (r8.lora_r, r64.lora_r) == (8, 64) and r64.trainable == 8 * r8.trainable
    lora = LoraConfig(r=64, target_modules=list(LORA_TARGETS), fan_in_fan_out=True)
    model = get_peft_model(GPT2LMHeadModel(config), lora)
    assert r64.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def table_rows(stdout: str) -> dict[str, list[list[str]]]:
    """`plan --all` rows by model name: the cells of full fine-tuning, then of LoRA."""
    rows = {}
    for line in stdout.splitlines():
        name, *modes = line.split("|")
        if len(modes) == 2 and name.split() and name.split()[0] != "model":
            rows[name.split()[0]] = [mode.strip().split(maxsplit=5) for mode in modes]
    return rows


def test_plan_all_lists_every_size_in_both_modes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**OFFLINE, "TAILORGPT_MEMORY_LIMIT_GB": "4"}
    result = cli(capsys, "plan", "--all", env=env, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert set(rows) == {"tiny", *BUILT_IN}
    assert rows["tiny"][0][0] == rows["tiny"][1][0] == "yes"  # fits, both modes
    assert rows["gpt2-xl"][0][:2] == ["no", "24.4G"] and rows["gpt2-xl"][1][0] == "no"
    medium = rows["gpt2-medium"]  # LoRA fits where full fine-tuning does not
    assert medium[0][0] == "no" and medium[1] == ["yes", "3.1G", "2", "4", "on"]
    assert "| LoRA r=8 (c_attn, c_proj, c_fc)" in result.stdout


@pytest.mark.model  # trains steps to time them
def test_measure_times_an_epoch_of_what_fits_and_not_the_rest(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    small = ["--block_size", "64", "--per_device_train_batch_size", "1"]
    args = ["plan", "--all", "--measure", "--train_tokens", "1e5", *small]
    env = {**OFFLINE, "TAILORGPT_MEMORY_LIMIT_GB": "0.2"}  # tiny only
    result = cli(capsys, *args, env=env, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    epoch = re.compile(r"\d+h\d\dm|\d+m\d\ds")
    assert all(epoch.fullmatch(mode[-1]) for mode in rows["tiny"]), rows["tiny"]
    assert rows["gpt2-xl"][0][-1] == rows["gpt2-xl"][1][-1] == "not measured"


@pytest.mark.model  # trains steps to time them
def test_measure_gives_the_speed_of_one_size() -> None:
    config = base_config("tiny")
    plan = make_plan(config, 64, 1, False, find_hardware())
    line = describe_speed(config, plan, 64, 100_000)
    assert re.fullmatch(r"speed: [\d,]+ tokens/s measured; an epoch of 100,000 tokens: \S+", line)


def test_a_size_that_does_not_fit_or_is_too_slow_is_not_measured() -> None:
    config = base_config("gpt2")
    fits, too_big = (make_plan(config, 1024, 8, True, gpu(gib)) for gib in (80, 1))
    assert tokens_per_second(config, fits, 1024, flops=1e11) is None  # ~3 min of steps
    assert not too_big.fits and tokens_per_second(config, too_big, 1024, flops=1e30) is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--base-model", "gpt2", "--lora_r", "0"], "--lora_r/--lora-r: '0' is not a whole number"),
        (["--all", "--train_tokens", "1000"], "--train_tokens: add --measure"),
        ([], "give --model_name_or_path MODEL, or --all"),
        (["--all", "--base-model", "gpt2"], "give --model_name_or_path MODEL, or --all"),
    ],
)
def test_bad_plan_options_fail_in_one_line(
    args: list[str],
    fragment: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = cli(capsys, "plan", *args, env=OFFLINE, monkeypatch=monkeypatch)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last.startswith(("tailorgpt: error: ", "tailorgpt plan: error: ")) and fragment in last


def test_fsdp_divides_weights_gradients_and_optimizer_state_by_the_gpus() -> None:
    one = make_plan(GPT2_XL, 1024, 8, lora=False, hardware=gpu(16))
    sharded = make_plan(GPT2_XL, 1024, 8, lora=False, hardware=gpu(16), shards=8)
    assert not one.fits and sharded.fits and sharded.shards == 8
    # Same batch, same activations: the difference is 7/8 of the states, less two blocks
    # gathered whole.
    one_at_batch = make_plan(GPT2_XL, 1024, 1, lora=False, hardware=gpu(80))
    sharded_at_batch = make_plan(GPT2_XL, 1024, 1, lora=False, hardware=gpu(80), shards=8)
    states = state_bytes(one_at_batch.parameters, one_at_batch.trainable)
    saved = one_at_batch.need_bytes - sharded_at_batch.need_bytes
    blocks = 2 * (12 * 1600**2 + 13 * 1600) * 4
    assert saved == states - -(-states // 8) - blocks
    assert "(full fine-tuning, FSDP across 8)" in describe(sharded, 1024)


def test_train_shards_across_gpus_only_when_one_gpu_is_too_small() -> None:
    picked = plan_processes(GPT2_XL, 1024, 8, False, gpu(16), processes=8, fsdp=False)
    assert picked.fits and picked.shards == 8
    roomy = plan_processes(GPT2_XL, 1024, 8, False, gpu(80), processes=8, fsdp=False)
    assert roomy.fits and roomy.shards == 1  # data parallel: no gathering on every layer
    alone = plan_processes(GPT2_XL, 1024, 8, False, gpu(16), processes=1, fsdp=False)
    assert not alone.fits and alone.shards == 1
    asked = plan_processes(GPT2_SMALL, 1024, 8, False, gpu(80), processes=2, fsdp=True)
    assert asked.shards == 2


def test_plan_for_gpus_this_machine_does_not_have(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("plan", "--gpus", "8", "--gpu", "t4-16")
    result = cli(capsys, *args, env=OFFLINE, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr
    assert "8 x t4-16 (16 GiB each" in result.stdout and "FSDP full across 8" in result.stdout
    rows = {line.split()[0]: line.split("|") for line in result.stdout.splitlines()[3:13]}
    assert set(rows) == set(BUILT_IN)
    full, lora, fsdp = (cells.split() for cells in rows["gpt2-xl"][1:])
    assert full[0] == "no" and lora[0] == "yes" and fsdp[0] == "yes"
    assert fsdp[2:5] == ["1", "8", "off"]  # batch, accumulation, checkpointing
    by_memory = cli(
        capsys, "plan", "--gpus", "2", "--gpu_memory_gb", "80", env=OFFLINE, monkeypatch=monkeypatch
    )
    assert "2 x 80 GB GPU" in by_memory.stdout and "precision bf16" in by_memory.stdout
    assert_clean_failure(cli(capsys, "plan", "--gpus", "2"), "--gpu NAME or --gpu_memory_gb")
    assert_clean_failure(cli(capsys, "plan", "--gpus", "2", "--gpu", "k80"), "t4-16")
