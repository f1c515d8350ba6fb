"""`tailorgpt train --config run.yaml`: every option in a file, flags on top."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CORPUS, run_cli
from test_train import assert_clean_failure

from tailorgpt.artifacts import UserError
from tailorgpt.config import load_config, merge_options
from training.train import TrainArgs


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_values_get_the_option_types(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path / "run.yaml",
            (
                "data: notes/\nbase_model: gpt2\noutput: runs/a\nlearning_rate: 5e-5\n"
                "block_size: 128\nresume_from_checkpoint: false\n"
            ),
        ),
        TrainArgs,
    )
    assert config == {
        "data": Path("notes"),
        "base_model": "gpt2",
        "output": Path("runs/a"),
        "learning_rate": 5e-5,
        "block_size": 128,
        "resume_from_checkpoint": False,
    }


def test_flags_override_the_config_and_defaults_fill_the_rest() -> None:
    config = {"data": Path("a"), "base_model": "tiny", "output": Path("o"), "seed": 1}
    merged = merge_options(TrainArgs, config, {"seed": 7})
    assert (merged.seed, merged.base_model, merged.num_train_epochs) == (7, "tiny", 3.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rat: 0.1\n", "unknown option 'learning_rat': did you mean 'learning_rate'?"),
        ("block_size: many\n", "block_size: 'many' is not a valid int"),
        ("resume_from_checkpoint: 3\n", "resume_from_checkpoint: 3 is not true or false"),
        ("- a\n- b\n", "must be a mapping"),
        ("data: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=r"run\.yaml: ") as err:
        load_config(write(tmp_path / "run.yaml", text), TrainArgs)
    assert message in str(err.value)


def test_missing_required_option() -> None:
    with pytest.raises(UserError, match="missing --output: give it on the command line"):
        merge_options(TrainArgs, {"data": Path("a")}, {"base_model": "tiny"})


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


def test_cli_reports_an_unknown_key_in_one_line(tmp_path: Path) -> None:
    config = write(tmp_path / "run.yaml", f"data: {CORPUS}\nbase_modle: tiny\n")
    result = run_cli("train", "--config", str(config), "--output", str(tmp_path / "r"), check=False)
    assert_clean_failure(result, "unknown option 'base_modle'", "did you mean 'base_model'")
