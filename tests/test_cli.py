"""The one-command path (quickstart) and the serve command's checks."""

from __future__ import annotations

import json
from pathlib import Path

import bentoml
from conftest import CORPUS, run_cli
from test_train import assert_clean_failure


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

    run_cli(*args)  # a second run rebuilds its own workspace
    assert json.loads((workspace / "summary.json").read_text())["tag"] != summary["tag"]


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    result = run_cli("quickstart", "--no-serve", "--output", str(tmp_path), check=False)
    assert_clean_failure(result, "not a quickstart workspace")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_serve_a_model_that_is_not_in_the_store() -> None:
    result = run_cli("serve", "--model", "tailorgpt-nothing:latest", check=False)
    assert_clean_failure(result, "tailorgpt-nothing:latest", "tailorgpt export")
