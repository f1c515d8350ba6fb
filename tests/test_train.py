"""Training through the real CLI: the run directory, its metrics, resume, and bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    CORPUS,
    REPO,
    TAILORGPT,
    assert_clean_failure,
    cli,
    run_cli,
    tied_to_this_process,
    torchrun,
    train_args,
)
from transformers import BertConfig, GPT2LMHeadModel

EVALUATION_LINE = re.compile(r"^step (\d+) \| ", re.MULTILINE)
TRAINED_EVALUATION = re.compile(
    r"^step \d+ \| train loss [\d.]+ \| validation loss [\d.]+, perplexity [\d.]+ \| "
    r"(new best|best [\d.]+ at step \d+) \| samples (\S+)$"
)


def evaluation_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if EVALUATION_LINE.match(line)]


def evaluated_steps(stdout: str) -> list[int]:
    return [int(step) for step in EVALUATION_LINE.findall(stdout)]


def assert_no_trainer_dicts(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        assert "{'loss'" not in stream and "{'eval_loss'" not in stream
        assert "{'train_runtime'" not in stream


def test_run_dir_holds_a_whole_hf_model(run_dir: Path) -> None:
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "metrics.json",
        "loss_curve.png",
        "manifest.json",
    ):
        assert (run_dir / name).is_file(), name
    assert not run_dir.with_name(run_dir.name + ".partial").exists()
    assert GPT2LMHeadModel.from_pretrained(run_dir).config.n_positions == 256


def test_metrics_report_perplexity_before_and_after(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    before, after = metrics["validation_before"], metrics["validation_after"]
    assert after["loss"] < before["loss"]
    assert after["perplexity"] < before["perplexity"] / 2
    assert metrics["block_size"] == 64
    assert (
        metrics["validation_blocks"] >= 1 and metrics["train_blocks"] > metrics["validation_blocks"]
    )


def test_samples_and_tensorboard_logs_at_each_evaluation(run_dir: Path) -> None:
    samples = sorted((run_dir / "samples").glob("step-*.txt"))
    assert len(samples) >= 12  # before training, then every epoch
    assert samples[0].name == "step-000000.txt" and samples[-1].read_text().startswith("[")
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))


def test_training_prints_one_line_per_evaluation(
    run_training: subprocess.CompletedProcess[str], run_dir: Path
) -> None:
    assert_no_trainer_dicts(run_training)
    steps = json.loads((run_dir / "metrics.json").read_text())["optimizer_steps"]
    per_epoch = steps // 12
    # Before training, then once per epoch (the default evaluation strategy).
    assert evaluated_steps(run_training.stdout) == list(range(0, steps + 1, per_epoch))
    first, *trained = evaluation_lines(run_training.stdout)
    assert first.startswith("step 0 | before training | validation loss ")
    assert "| new best |" in trained[0]
    for line in trained:
        match = TRAINED_EVALUATION.match(line)
        assert match, line
        written = Path(match[2])  # in the run's .partial directory while it trains
        assert written.parent.parent == run_dir.with_name("run.partial")
        assert (run_dir / "samples" / written.name).is_file()
    # One progress bar, the training's: no evaluation bars.
    assert set(re.findall(r"\d+/(\d+) \[", run_training.stderr)) == {str(steps)}


def test_training_ends_with_a_summary_and_the_next_commands(
    run_training: subprocess.CompletedProcess[str], run_dir: Path
) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    before, after = metrics["validation_before"], metrics["validation_after"]
    summary = run_training.stdout.split(evaluation_lines(run_training.stdout)[-1])[1]
    assert f"perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f}" in summary
    assert f"best at step {metrics['best_step']}" in summary
    assert f"in {metrics['train_seconds']:.0f}s" in summary
    assert str(run_dir / "loss_curve.png") in summary
    assert f"tailorgpt chat {run_dir}\n" in summary
    assert f"tailorgpt export {run_dir} --output_dir {run_dir}-export --name run\n" in summary


def test_trainer_log_holds_the_trainers_dictionaries(run_dir: Path) -> None:
    lines = (run_dir / "logs" / "trainer.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len([r for r in records if "eval_loss" in r]) == 13  # before, then 12 epochs
    assert any("grad_norm" in r and "learning_rate" in r for r in records)
    assert "train_runtime" in records[-1] and records[-1]["step"] > 0


@pytest.mark.model  # trains
def test_early_stopping_keeps_the_best_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "--block_size",
        "64",
        "--num_train_epochs",
        "60",
        "--eval_steps",
        "20",
        "--save_steps",
        "20",
        "--early_stopping_patience",
        "2",
        "--learning_rate",
        "0.004",
    ]
    result = run_cli(*train_args(out, *args))
    metrics = json.loads((out / "metrics.json").read_text())
    stopped = metrics["stopped_early_at"]
    assert stopped is not None and metrics["optimizer_steps"] == stopped
    best = metrics["best_step"]
    assert best == stopped - 40  # then two evaluations without improvement
    lines = evaluation_lines(result.stdout)
    assert lines[-3].startswith(f"step {best} |") and "| new best |" in lines[-3]
    for line in lines[-2:]:
        assert f"| best {metrics['validation_after']['loss']:.3f} at step {best} |" in line
    assert f"stopped early at step {stopped}" in result.stdout
    assert f"(best at step {best})" in result.stdout
    state = out / "checkpoints" / f"checkpoint-{stopped}" / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    losses = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert metrics["validation_after"]["loss"] == pytest.approx(min(losses.values()))
    assert min(losses, key=losses.get) == metrics["best_step"]


@pytest.mark.model  # trains
def test_lora_adapters_are_merged_into_a_plain_gpt2(tmp_path: Path) -> None:
    out = tmp_path / "lora"
    args = ["--lora", "--block_size", "64", "--num_train_epochs", "3", "--learning_rate", "0.01"]
    run_cli(*train_args(out, *args))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lora"] and metrics["best_step"] > 0
    assert metrics["validation_after"]["loss"] < metrics["validation_before"]["loss"]
    full = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(out).parameters())
    assert metrics["trainable_parameters"] < full / 5
    assert not list(out.glob("adapter_*"))  # merged: nothing but a GPT-2 checkpoint
    run_cli("export", str(out), "--output", str(tmp_path / "export"))
    parity = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert parity["fp32"]["greedy_agreement"] == 1.0


def test_loss_curve_is_a_png(run_dir: Path) -> None:
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reports_perplexity_without_touching_the_run(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = sorted(p.name for p in run_dir.iterdir())
    evaluated = cli(capsys, "evaluate", str(run_dir), "--data", str(CORPUS))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["blocks"] > 0 and result["perplexity"] > 1
    assert result["block_size"] == 64  # as trained, so the figures compare
    assert sorted(p.name for p in run_dir.iterdir()) == files


def test_fine_tune_from_a_local_model_directory(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    run_cli(*train_args(out, "--block_size", "32", "--max_steps", "5", base_model=str(run_dir)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base_model"] == str(run_dir) and metrics["optimizer_steps"] == 5
    # It starts from the trained weights, not from scratch.
    assert metrics["validation_before"]["perplexity"] < 500


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "empty_folder"])
def test_bad_data_fails_cleanly_without_output(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    if case == "empty":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "binary":
        data = tmp_path / "image.txt"
        data.write_bytes(bytes(range(256)) * 20)
    elif case == "empty_folder":
        data.mkdir()
    out = tmp_path / "run"
    result = cli(capsys, "train", "--data", str(data), "--base-model", "tiny", "--output", str(out))
    assert_clean_failure(result, str(data))
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_base_model_that_is_not_gpt2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bert = tmp_path / "bert"
    BertConfig().save_pretrained(bert)
    result = cli(capsys, *train_args(tmp_path / "run", base_model=str(bert)))
    assert_clean_failure(result, str(bert), "not GPT-2")


@pytest.mark.parametrize("name", ["missing-dir", "gpt2"])
def test_base_model_that_cannot_be_loaded(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No hub on these machines: offline mode (conftest.py) makes `gpt2` fail at once, as
    # without internet.
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    base = str(tmp_path / name) if name == "missing-dir" else name
    result = cli(capsys, *train_args(tmp_path / "run", base_model=base))
    assert_clean_failure(result, base, "local model directory")


def test_block_size_longer_than_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, *train_args(tmp_path / "run", "--block_size", "4096"))
    assert_clean_failure(result, "--block_size 4096", "at most 256")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_existing_output_is_never_overwritten(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (run_dir / "metrics.json").read_text()
    result = cli(capsys, *train_args(run_dir))
    assert_clean_failure(result, "already exists")
    assert (run_dir / "metrics.json").read_text() == before


STEPS = 160  # of the run killed then resumed: 8 checkpoints, 16 logged losses


@pytest.mark.model  # trains
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = train_args(
        out,
        "--block_size",
        "32",
        "--max_steps",
        str(STEPS),
        "--save_steps",
        "20",
        "--per_device_train_batch_size",
        "2",
    )
    process = subprocess.Popen(
        [*TAILORGPT, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=tied_to_this_process,
    )
    checkpoints = out.with_name("run.partial") / "checkpoints"
    log = out.with_name("run.partial") / "logs" / "trainer.jsonl"

    def logged_past_a_checkpoint() -> bool:
        saved = [int(p.parent.name[11:]) for p in checkpoints.glob("*/trainer_state.json")]
        logged = re.findall(r'"step": (\d+)}\n', log.read_text()) if log.is_file() else []
        return bool(saved) and max(map(int, logged), default=0) > max(saved)

    deadline = time.monotonic() + 120
    while not logged_past_a_checkpoint():
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint written"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    saved = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    killed_at = max(int(p.name.split("-")[1]) for p in saved)
    assert killed_at < STEPS
    state = json.loads((checkpoints / f"checkpoint-{killed_at}" / "trainer_state.json").read_text())
    assert state["global_step"] == killed_at

    killed = training_losses(out.with_name("run.partial"))
    assert max(killed) > killed_at  # steps the resumed run does again: logged once, not twice

    result = run_cli(*args, "--resume_from_checkpoint")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == STEPS
    assert metrics["resumed_from_checkpoint"] == f"checkpoint-{killed_at}"
    # Its progress bar starts at the checkpoint's step, as a restart's would at 0.
    assert re.findall(rf"(\d+)/{STEPS} \[", result.stderr)[0] == str(killed_at)
    resumed = training_losses(out)
    assert list(resumed) == list(range(10, STEPS + 1, 10))  # each step once: none repeated
    # Where both runs logged a step, the resumed run has the killed run's loss.
    assert {s: resumed[s] for s in killed} == pytest.approx(killed, rel=1e-5)

    uninterrupted = tmp_path / "uninterrupted"
    run_cli(*train_args(uninterrupted, *args[args.index("--block_size") :]))
    reference = json.loads((uninterrupted / "metrics.json").read_text())
    assert reference["optimizer_steps"] == STEPS
    # Deterministic on the CPU: the resumed run's curve is the uninterrupted one's, before
    # and after the kill (a restart from step 0 would give the same numbers at other steps).
    assert resumed == pytest.approx(training_losses(uninterrupted), rel=1e-5)
    resumed_loss = metrics["validation_after"]["loss"]
    assert resumed_loss == pytest.approx(reference["validation_after"]["loss"], rel=1e-5)
    state = (out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text()
    assert json.loads(state)["global_step"] == STEPS


def training_losses(run: Path) -> dict[int, float]:
    """Step -> training loss, from the run's trainer log; a step logged twice fails."""
    records = [json.loads(line) for line in (run / "logs" / "trainer.jsonl").open()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_without_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, *train_args(tmp_path / "run", "--resume_from_checkpoint"))
    assert_clean_failure(result, "no checkpoint")


@pytest.mark.model  # trains
def test_data_parallel_training_with_torchrun(tmp_path: Path) -> None:
    """Two CPU processes (gloo): each step sees twice the batch, so half the steps."""
    out = tmp_path / "ddp"
    args = train_args(out, "--block_size", "64", "--num_train_epochs", "2")
    result = subprocess.run(
        torchrun(*args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    steps_per_epoch = -(-metrics["train_blocks"] // (2 * 8))
    assert metrics["optimizer_steps"] == 2 * steps_per_epoch
    # Only the main process reports: each evaluation once, not once per process.
    assert_no_trainer_dicts(result)
    assert evaluated_steps(result.stdout) == [0, steps_per_epoch, 2 * steps_per_epoch]
    assert metrics["validation_after"]["loss"] < metrics["validation_before"]["loss"]
    assert (out / "model.safetensors").is_file() and not out.with_name("ddp.partial").exists()
