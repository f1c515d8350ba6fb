"""`tailorgpt generate` and `tailorgpt chat`: the engine in the terminal, no server."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import MODEL_NAME, REPO, cli

from service.engine import GenerationRequest, LLMEngine
from tailorgpt import chat
from tailorgpt.chat import chat_prompt, fit_turns
from training.prepare import chat_to_text


def cli_ok(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    """`tailorgpt ARGS` in this process, expected to succeed: its stdout and stderr."""
    result = cli(capsys, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


def test_generate_prints_what_the_engine_gives(
    export_dir: Path, fp32_engine: LLMEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    options = {
        "max_new_tokens": 60,
        "temperature": 0.9,
        "top_k": 40,
        "top_p": 0.95,
        "repetition_penalty": 1.2,
        "seed": 3,
    }
    request = GenerationRequest(prompt="The model", stop=["."], **options)
    expected = fp32_engine.generate([request])[0]
    assert expected.finish_reason == "stop"  # so the test covers --stop too
    flags = [arg for name, value in options.items() for arg in (f"--{name}", str(value))]
    out, _ = cli_ok(
        capsys, "generate", str(export_dir), "The model", *flags, "--stop", ".", "--variant", "fp32"
    )
    assert out == expected.text + "\n"


def test_generate_on_a_training_run_exports_it_once(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    args = ["generate", str(run), "The", "--max_new_tokens", "8", "--temperature", "0"]
    first, made = cli_ok(capsys, *args)
    assert f"exporting it to {run / 'export-cache'}" in made
    exported_at = (run / "export-cache" / "manifest.json").stat().st_mtime_ns
    again, reused = cli_ok(capsys, *args)
    assert again == first and "using" in reused
    assert (run / "export-cache" / "manifest.json").stat().st_mtime_ns == exported_at
    weights = (run / "model.safetensors").stat()
    os.utime(run / "model.safetensors", ns=(weights.st_atime_ns, weights.st_mtime_ns + 10**9))
    _, retrained = cli_ok(capsys, *args)  # the run changed: its export is stale
    assert "exporting" in retrained


def test_generate_from_the_store(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["The", "--max_new_tokens", "12", "--temperature", "0"]
    from_dir, _ = cli_ok(capsys, "generate", str(export_dir), *args)
    from_store, _ = cli_ok(capsys, "generate", f"tailorgpt-{MODEL_NAME}", *args)
    assert from_store == from_dir


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("no/such/dir", "is not a model"),
        ("samples", "is not a model"),
        ("PREPARED", "holds a 'prepare' artifact"),
        ("tailorgpt-nothing:1", "is not in the BentoML store"),
        ("tailorgpt-not a tag", "is not in the BentoML store"),
    ],
)
def test_a_bad_model_is_a_one_line_error(
    model: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if model == "PREPARED":
        model = str(tmp_path)
        (tmp_path / "manifest.json").write_text(json.dumps({"kind": "prepare"}))
    result = cli(capsys, "generate", model, "Hello")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"tailorgpt: error: MODEL {model} ") and says in lines[0]
    assert "export dir" in lines[0] or "bentoml models list" in lines[0]


def test_the_chat_prompt_is_the_training_format() -> None:
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "And?")]
    training_text = chat_to_text([{"role": role, "content": text} for role, text in turns])
    assert chat_prompt(turns) == training_text + "\n\nassistant:"


def test_the_oldest_turns_go_when_the_prompt_would_not_fit() -> None:
    system = [("system", "Be brief.")]
    turns = [("user", "a" * 50), ("assistant", "b" * 50), ("user", "c" * 10)]

    def kept(budget: int) -> list[tuple[str, str]]:
        return fit_turns(system, turns, len, budget)  # a character a token

    whole = len(chat_prompt(system + turns))
    assert kept(whole) == turns
    assert kept(whole - 1) == turns[1:]
    assert kept(len(chat_prompt(system + turns[2:]))) == turns[2:]
    assert kept(0) == turns[2:]  # the newest always: the engine says if even it is too long


def test_a_long_chat_forgets_its_oldest_turns_and_goes_on(
    export_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = iter(["word " * 40] * 3 + ["word " * 300, "/exit"])  # 80 and 600 tokens
    monkeypatch.setattr("builtins.input", lambda prompt: next(messages))
    sent: list[tuple[LLMEngine, GenerationRequest]] = []
    stream = chat.stream

    def sending(engine: LLMEngine, request: GenerationRequest, pieces: list[str]) -> None:
        sent.append((engine, request))
        stream(engine, request, pieces)

    monkeypatch.setattr(chat, "stream", sending)
    args = ["chat", str(export_dir), "--max_new_tokens", "100", "--seed", "0", "--stop", "##"]
    out, err = cli_ok(capsys, *args, "--system", "Be brief.")
    assert out.count("assistant:") == len(sent) == 3
    for engine, request in sent:  # each prompt leaves room for a whole reply
        assert len(engine.prompt_ids(request)) + request.max_new_tokens <= engine.context
        assert {"##", "\n\nuser:", "\n\nassistant:", "\n\nsystem:"} <= set(request.stop)
        assert request.prompt.startswith("system: Be brief.\n\n")  # never forgotten
    assert "forgot the oldest" in err
    assert "context is 256 tokens" in err  # the last message: not sent, and the chat goes on


# Decoding slowed to 10 ms a token, as a bigger model's would be, so that a reply lasts long
# enough to be interrupted.
SLOW_TAILORGPT = """
import sys, time
from service.engine import ModelRunner
from tailorgpt.cli import main

run = ModelRunner.run
ModelRunner.run = lambda self, *args: time.sleep(0.01) or run(self, *args)
main(sys.argv[1:])
"""


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """`tmux ARGS` on a server of the test's own, so it inherits this environment."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/install-test-tools.sh installs it)")
    socket = ["tmux", "-S", str(tmp_path / "tmux.sock")]

    def run(*args: str) -> str:
        return subprocess.run([*socket, *args], capture_output=True, text=True, check=True).stdout

    yield run
    subprocess.run([*socket, "kill-server"], capture_output=True)


def test_chat_in_a_real_terminal(export_dir: Path, tmux: Callable[..., str]) -> None:
    command = [sys.executable, "-c", SLOW_TAILORGPT, "chat", str(export_dir)]
    command += ["--max_new_tokens", "200", "--temperature", "0"]
    # The shell reports the exit status: tmux's own (#{pane_dead_status}) is not reliable.
    shell = f'{shlex.join(command)}; echo "exit status $?"'
    tmux("new-session", "-d", "-x", "160", "-y", "50", "-c", str(REPO), shell)
    tmux("set-option", "remain-on-exit", "on")  # keep the screen once the program ends

    def screen() -> str:
        return tmux("capture-pane", "-p", "-S", "-")  # with the lines scrolled off the top

    def wait_for(done: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not done(text := screen()):
            assert time.monotonic() < deadline, f"no {what} after {timeout}s:\n{text}"
            time.sleep(0.05)
        return text

    def prompts(text: str) -> int:
        return sum(line.startswith("user:") for line in text.splitlines())

    wait_for(lambda s: prompts(s) == 1, "prompt")
    tmux("send-keys", "Hello, who are you?", "Enter")
    wait_for(lambda s: "assistant:" in s and prompts(s) == 2, "whole reply")
    tmux("send-keys", "Tell me more", "Enter")
    wait_for(lambda s: s.count("assistant:") == 2, "second reply")
    time.sleep(0.3)  # well before its end: 200 tokens take 2s
    tmux("send-keys", "C-c")
    stopped = wait_for(lambda s: prompts(s) == 3, "prompt after Ctrl-C", timeout=1.5)
    assert "(stopped)" in stopped and "exit status" not in stopped
    tmux("send-keys", "/reset", "Enter")
    wait_for(lambda s: "(conversation forgotten)" in s, "reset")
    tmux("send-keys", "/exit", "Enter")
    ended = wait_for(lambda s: "exit status" in s, "exit")
    assert "exit status 0" in ended and "Traceback" not in ended, ended
