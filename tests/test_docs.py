"""Every `tailorgpt ...` command the READMEs show in code blocks parses as shown: the subcommand
exists, and its options exist, spelled in full (an abbreviation argparse accepts today turns
ambiguous when an option is added)."""

from __future__ import annotations

import io
import re
import shlex
from contextlib import redirect_stderr, redirect_stdout
from functools import cache

import pytest
from helpers import REPO

from tailorgpt.cli import build_parser

DOCS = ("README.md", "README.zh-CN.md")
CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*tailorgpt\s")  # after optional VAR=value prefixes
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")
# The beginner path of issue 12: the Chinese README walks all of it.
ZH_PATH = ("prepare", "plan", "train", "chat", "generate", "export", "serve")


def shown_commands(text: str) -> list[list[str]]:
    """The argument lists of the `tailorgpt` lines in the text's fenced code blocks."""
    commands = []
    for block in CODE_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if COMMAND.match(line.strip()):
                words = shlex.split(line, comments=True)
                commands.append(words[words.index("tailorgpt") + 1 :])
    return commands


@cache
def options_of(command: str) -> set[str]:
    """The option strings the subcommand's help lists."""
    help_text = io.StringIO()
    with redirect_stdout(help_text), pytest.raises(SystemExit):
        build_parser().parse_args([command, "-h"])
    return set(OPTION.findall(help_text.getvalue()))


def problem(argv: list[str]) -> str | None:
    """What is wrong with the command line, or None."""
    error = io.StringIO()
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(error):
            build_parser().parse_args(argv)
    except SystemExit as stop:
        if stop.code:  # 0 is -h
            return error.getvalue().strip().splitlines()[-1]
    spelled = [w.split("=")[0] for w in argv if OPTION.fullmatch(w.split("=")[0])]
    unknown = [w for w in spelled if w not in options_of(argv[0])]
    return f"not an option of {argv[0]} as spelled: {unknown}" if unknown else None


SHOWN = {doc: shown_commands((REPO / doc).read_text(encoding="utf-8")) for doc in DOCS}


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(argv, id=f"{doc}: tailorgpt {shlex.join(argv)}")
        for doc, commands in SHOWN.items()
        for argv in commands
    ],
)
def test_shown_command_parses(argv: list[str]) -> None:
    assert problem(argv) is None


def test_chinese_readme_shows_the_beginner_path() -> None:
    commands = SHOWN["README.zh-CN.md"]
    assert set(ZH_PATH) <= {argv[0] for argv in commands}
    assert any(argv[:2] == ["plan", "--all"] for argv in commands)


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--all", "--every"],  # no such option
        ["plan", "--base", "gpt2"],  # an abbreviation argparse would accept
        ["export", "runs/notes", "--output", "x", "--nmae", "notes"],
        ["chat"],  # MODEL missing
        ["talk", "runs/notes"],  # no such subcommand
    ],
)
def test_a_wrong_command_is_caught(argv: list[str]) -> None:
    assert problem(argv)


def test_commands_are_found_in_code_blocks_only() -> None:
    text = (
        "Run tailorgpt train --nope here.\n\n```bash\nsource .venv/bin/activate\n"
        "PORT=8000 tailorgpt serve --model tailorgpt-notes:latest \\\n  --port 8000  # comment\n"
        "```\n"
    )
    assert shown_commands(text) == [
        ["serve", "--model", "tailorgpt-notes:latest", "--port", "8000"]
    ]
