"""The Locust scenario as README runs it, with loadtests/locust.conf, against the real server:
token timings are entries of their own, and a threshold passed makes the run exit 1."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def locust(server: str, csv_prefix: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """A short run with the settings of locust.conf, `options` added (cwd: the repository,
    whose paths the file names)."""
    command = [sys.executable, "-m", "locust", "--config", "loadtests/locust.conf"]
    short = ["-u", "4", "-r", "4", "-t", "6s", "--csv", str(csv_prefix)]
    return subprocess.run(
        [*command, "--host", server, *short, *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"TAILORGPT_LOAD_MAX_NEW_TOKENS": "16", "PATH": "/usr/bin:/bin"},
    )


def stats(csv_prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_conf_run_records_token_timings_and_passes(server: str, tmp_path: Path) -> None:
    result = locust(server, tmp_path / "load")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = stats(tmp_path / "load")
    for name in ("time to first token", "inter-token latency"):
        assert int(rows["TOKEN", name]["Request Count"]) > 0, name
        assert 0 < float(rows["TOKEN", name]["95%"]) < 2000, name
    assert int(rows["POST", "/v1/completions"]["Request Count"]) > 0
    assert int(rows["POST", "/generate"]["Failure Count"]) == 0


def test_a_threshold_passed_fails_the_run(server: str, tmp_path: Path) -> None:
    result = locust(server, tmp_path / "load", "--max-ttft-p95-ms", "0.01")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "threshold passed: --max-ttft-p95-ms 0.01" in result.stderr
