"""`--config run.yaml`: the options in a file, as if written before the flags given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import CORPUS, assert_clean_failure, cli, run_cli

from tailorgpt.cli import build_parser, main
from tailorgpt.config import config_arguments
from training.train import TrainArgs


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_keys_in_any_spelling_become_flags(tmp_path: Path) -> None:
    config = write(
        tmp_path / "run.yaml",
        (
            "data: notes/\nbase_model: gpt2\noutput-dir: runs/a\nlearning_rate: 5e-5\n"
            "block_size: 128\nresume_from_checkpoint: false\neval_steps: null\n"
        ),
    )
    assert config_arguments(config, [TrainArgs]) == [
        *("--train_file", "notes/", "--model_name_or_path", "gpt2", "--output_dir", "runs/a"),
        *("--learning_rate", "5e-5", "--block_size", "128", "--resume_from_checkpoint", "False"),
    ]


def test_flags_override_the_config_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    config = write(
        tmp_path / "run.yaml", "data: a\nbase_model: tiny\noutput: o\nseed: 1\nlora: true"
    )
    args = build_parser().parse_args(["train", "--seed", "7", "--config", str(config)])
    assert (args.seed, args.model_name_or_path, args.train_file) == (7, "tiny", Path("a"))
    assert (args.lora, args.num_train_epochs) == (True, 3.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat: 0.1\n", "run.yaml: unknown option 'learning_rat': did you mean"),
        ("block_size: many\n", "argument --block_size/--block-size: invalid int value: 'many'"),
        ("lora: 3\n", "Truthy value expected: got 3"),
        ("lora: {r: 8}\n", "run.yaml: lora: give a value or a list, not a mapping"),
        ("- a\n- b\n", "run.yaml: the config must be a mapping"),
        ("data: [unclosed\n", "run.yaml: not valid YAML"),
    ],
)
def test_a_bad_config_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = write(tmp_path / "run.yaml", text)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(config), "--data", "a", "--base-model", "tiny"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and message in last


@pytest.mark.model  # trains
def test_train_from_a_config_file_with_a_flag_on_top(tmp_path: Path) -> None:
    config = write(
        tmp_path / "run.yaml",
        (
            f"data: {CORPUS}\nbase_model: tiny\noutput: {tmp_path / 'run'}\n"
            "block_size: 32\nmax_steps: 50\nnum_train_epochs: 1\n"
        ),
    )
    run_cli("train", "--config", str(config), "--max_steps", "3")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["block_size"], metrics["optimizer_steps"]) == (32, 3)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["args"]["max_steps"] == 3


def test_cli_reports_an_unknown_key_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "run.yaml", f"data: {CORPUS}\nbase_modle: tiny\n")
    result = cli(capsys, "train", "--config", str(config), "--output", str(tmp_path / "r"))
    assert_clean_failure(result, "unknown option 'base_modle'", "did you mean 'base_model'")
