"""The command line: one definition of every option, old spellings kept; the one-command path
(quickstart) and the serve command's checks."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from dataclasses import fields
from pathlib import Path

import bentoml
import pytest
from helpers import CORPUS, assert_clean_failure, cli, run_cli

import tailorgpt.chat
from service.engine import GenerationRequest
from tailorgpt.chat import make_request
from tailorgpt.cli import COMMANDS, build_parser, main
from tailorgpt.options import SamplingArgs


@pytest.mark.model  # trains
def test_quickstart_without_serving_trains_exports_and_imports(tmp_path: Path) -> None:
    workspace = tmp_path / "quick"
    args = [
        "quickstart",
        "--no-serve",
        "--data",
        str(CORPUS),
        "--name",
        "quick",
        "--output",
        str(workspace),
        "--num_train_epochs",
        "2",
    ]
    first = run_cli(*args)
    assert "[3/3] imported tailorgpt-quick:" in first.stdout
    # It ends by saying how to talk to the model it just made.
    assert "tailorgpt chat tailorgpt-quick\n" in first.stdout
    assert "tailorgpt serve --model tailorgpt-quick:latest\n" in first.stdout
    summary = json.loads((workspace / "summary.json").read_text())
    assert (workspace / "export" / "model_int8.onnx").is_file()
    assert bentoml.models.get(summary["tag"]).info.metadata["context"] == 256

    run_cli(*args[:-1], "1")  # a second run (shorter) rebuilds its own workspace
    assert json.loads((workspace / "summary.json").read_text())["tag"] != summary["tag"]


def test_quickstart_refuses_a_folder_it_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    result = cli(capsys, "quickstart", "--no-serve", "--output", str(tmp_path))
    assert_clean_failure(result, "not a quickstart workspace")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_serve_a_model_that_is_not_in_the_store(capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "serve", "--model", "tailorgpt-nothing:latest")
    assert_clean_failure(result, "tailorgpt-nothing:latest", "tailorgpt export")


def help_of(command: str) -> str:
    help_text = io.StringIO()
    with redirect_stdout(help_text), pytest.raises(SystemExit):
        build_parser().parse_args([command, "-h"])
    return " ".join(help_text.getvalue().split())  # unwrapped


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_option_with_its_help(command: str) -> None:
    shown = help_of(command)
    for options in COMMANDS[command].options:
        for field in fields(options):
            help_text = field.metadata.get("help")
            assert help_text, f"{options.__name__}.{field.name} has no help"
            spelled = field.metadata.get("positional") or f"--{field.name}"
            assert f"{spelled} " in shown or f"{spelled}," in shown, spelled
            assert " ".join(help_text.split()) in shown
    assert "default: None" not in shown and "default: []" not in shown


def parsed(argv: list[str]) -> dict[str, object]:
    return vars(build_parser().parse_args(argv))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            "train --data d --base-model tiny --output o",
            "train --train_file d --model_name_or_path tiny --output_dir o",
        ),
        (
            "prepare in --output o --min-chars 5 --max-chars 9 --text-field t --text-column c "
            "--near-duplicate-threshold 0.9 --scrub-pii",
            "prepare in --output_dir o --min_chars 5 --max_chars 9 --text_field t --text_column c "
            "--near_duplicate_threshold 0.9 --scrub_pii",
        ),
        ("plan --base-model gpt2", "plan --model_name_or_path gpt2"),
        ("evaluate run --data x", "evaluate run --validation_file x"),
        ("export dir --output o", "export dir --output_dir o"),
        (
            "quickstart --data d --output o --no-serve",
            "quickstart --train_file d --output_dir o --no_serve",
        ),
        ("chat m --stop a --stop b", "chat m --stop a b"),
    ],
)
def test_the_old_spellings_still_work(old: str, new: str) -> None:
    assert parsed(old.split()) == parsed(new.split())


class Sent(Exception):
    """Raised where the command would load the engine, carrying the request it made."""


def test_sampling_defaults_are_the_apis(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tailorgpt generate` with no sampling option asks the engine for what a /generate body of
    only a prompt asks: every field of the request, as built end to end (parser, options,
    tailorgpt.chat), is the API's default."""

    def made(prompt: str, options: dict[str, object]) -> GenerationRequest:
        raise Sent(make_request(prompt, options))

    monkeypatch.setattr(tailorgpt.chat, "make_request", made)
    with pytest.raises(Sent) as sent:
        main(["generate", "MODEL", "PROMPT"])
    [request] = sent.value.args
    api = GenerationRequest.model_validate_json('{"prompt": "PROMPT"}')  # as the server reads it
    assert request.model_dump() == api.model_dump()
    assert {field.name for field in fields(SamplingArgs)} <= set(api.model_dump())
