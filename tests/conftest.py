"""Session fixtures: a real tiny model trained, exported and served, all on this machine.

BENTOML_HOME points at a temporary store before anything imports bentoml, and TAILORGPT_CACHE
at a temporary cache, so tests never touch the user's own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="tailorgpt-bentoml-")
os.environ["TAILORGPT_CACHE"] = tempfile.mkdtemp(prefix="tailorgpt-cache-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "samples" / "corpus"
TAILORGPT = [sys.executable, "-m", "tailorgpt"]
MODEL_NAME = "testmodel"


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*TAILORGPT, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tailorgpt {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


def train_args(
    output: Path, *extra: str, base_model: str = "tiny", data: Path = CORPUS
) -> list[str]:
    """`tailorgpt train` (by default on the bundled corpus), as a list of arguments."""
    return [
        "train",
        "--data",
        str(data),
        "--base-model",
        base_model,
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture(scope="session")
def run_training(workdir: Path) -> subprocess.CompletedProcess[str]:
    """The shared tiny run, 12 epochs; its output is what the tests of the terminal read."""
    return run_cli(*train_args(workdir / "run", "--block_size", "64", "--num_train_epochs", "12"))


@pytest.fixture(scope="session")
def run_dir(workdir: Path, run_training: subprocess.CompletedProcess[str]) -> Path:
    return workdir / "run"


@pytest.fixture(scope="session")
def export_dir(workdir: Path, run_dir: Path) -> Path:
    out = workdir / "export"
    run_cli("export", str(run_dir), "--output", str(out), "--name", MODEL_NAME)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(export_dir: Path) -> Iterator[str]:
    """`bentoml serve` as a real subprocess on a free loopback port."""
    # Two workers, each its own engine: metrics must add up across them.
    with serving(export_dir, "serve.log", MAX_BATCH_SIZE="8", MAX_RUNNING="4") as (url, _):
        yield url


KEYS = ["sk-first-key", "sk-second-key"]  # the keyed server's API keys


@pytest.fixture(scope="session")
def keyed_server(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second server, one worker, whose keys come one from the variable, one from a file."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"\n{KEYS[1]}\n")
    settings = {"API_KEY": KEYS[0], "API_KEY_FILE": str(key_file), "WORKERS": "1"}
    with serving(export_dir, "keyed.log", **settings) as (url, _):
        yield url


@contextmanager
def serving(
    export_dir: Path, log_name: str, **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `bentoml serve` of the exported test model, two workers unless `settings` (TAILORGPT_
    variables, without the prefix) say otherwise; its process group is ended on leaving."""
    port = free_port()
    defaults = {"WORKERS": "2", "THREADS": "1", "MAX_QUEUE": "16"}
    env = {
        **os.environ,
        "BENTOML_HOME": str(server_home(export_dir.parent / f"{log_name}.home")),
        "TAILORGPT_MODEL": f"tailorgpt-{MODEL_NAME}:latest",
        **{f"TAILORGPT_{k}": v for k, v in (defaults | settings).items()},
    }
    log_path = export_dir.parent / log_name
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        log.close()


def server_home(home: Path) -> Path:
    """A BentoML home of the server's own that shares the test model store: each `bentoml
    serve` empties its home's Prometheus directory as it starts, which would leave a server
    already running with metrics nobody reads."""
    home.mkdir(exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(Path(os.environ["BENTOML_HOME"]) / "models")
    return home


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"bentoml serve exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening, or still loading
            pass
        time.sleep(0.5)
    raise AssertionError(f"bentoml serve not ready after 180s:\n{log.read_text()[-3000:]}")
