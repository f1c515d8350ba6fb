"""The command line starts light: a command imports only what it runs, prints no warning that
is not about the user's input, and ends quietly when the reader of its output goes away."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import CORPUS, REPO, TAILORGPT, run_cli

HEAVY = {"torch", "transformers", "peft", "datasets", "matplotlib"}
SIGPIPE_STATUS = 141  # 128 + SIGPIPE: how a shell reports a writer whose reader left


def imported_packages(*args: str) -> set[str]:
    """The top-level packages that `tailorgpt ARGS` imports, from `python -X importtime`."""
    python, *module = TAILORGPT
    command = [python, "-X", "importtime", *module, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    timings = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    names = [line.split("|")[-1].strip() for line in timings[1:]]  # the first is the header
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_help_imports_no_training_stack(command: str) -> None:
    assert imported_packages(command, "-h") & HEAVY == set()


def test_chat_on_an_export_imports_no_training_stack(export_dir: Path) -> None:
    args = ["generate", str(export_dir), "Hello", "--max_new_tokens", "2"]
    assert imported_packages(*args) & HEAVY == set()


def test_help_prints_no_warning() -> None:
    assert run_cli("-h").stderr == ""


def into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """`tailorgpt ARGS | head -0`: the reader has closed the pipe before the first write."""
    process = subprocess.Popen(
        [*TAILORGPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    process.stdout.close()
    stderr = process.stderr.read()
    return subprocess.CompletedProcess(process.args, process.wait(timeout=120), "", stderr)


def assert_ended_quietly(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, (
        result.stderr
    )
    assert result.returncode == SIGPIPE_STATUS


def test_prepare_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    assert_ended_quietly(into_closed_pipe("prepare", str(CORPUS), "--output", str(tmp_path / "d")))


def test_generate_into_a_closed_pipe_ends_quietly(export_dir: Path) -> None:
    args = ["generate", str(export_dir), "The", "--max_new_tokens", "64", "--seed", "0"]
    assert_ended_quietly(into_closed_pipe(*args))
