"""What the test modules share: the repository's paths, the CLI (as a subprocess and in this
process), the test servers and their HTTP helpers, waiting. One definition of each; test
modules import from here, never from one another."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "samples" / "corpus"
TAILORGPT = [sys.executable, "-m", "tailorgpt"]
MODEL_NAME = "testmodel"
KEYS = ["sk-first-key", "sk-second-key"]  # the keyed server's API keys
LORA_KEY = "sk-lora-key"  # the LoRA server's
ADAPTERS = ("alice", "bob", "carol")  # conftest's adapters of the test model


# --- the command line -------------------------------------------------------------------------


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m tailorgpt ARGS` as a subprocess: for what needs a process of its own (its exit
    status as a shell sees it, a run killed, torchrun). Anything else is cheaper in-process:
    `cli`."""
    result = subprocess.run(
        [*TAILORGPT, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, **(env or {})},
        preexec_fn=tied_to_this_process,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tailorgpt {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


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


def assert_clean_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("tailorgpt: error: ")
    for fragment in fragments:
        assert fragment in lines[-1]


def cli(
    capsys: pytest.CaptureFixture[str],
    *args: str,
    env: dict[str, str] | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> subprocess.CompletedProcess[str]:
    """`tailorgpt ARGS` run in this process (tailorgpt.cli.main, as the console script runs it,
    without an interpreter's start-up): its exit status and output as `run_cli` gives them, for
    `assert_clean_failure`. `env` needs `monkeypatch`."""
    from tailorgpt.cli import main

    for name, value in (env or {}).items():
        assert monkeypatch is not None, "env needs monkeypatch"
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code: int | str | None = 0
    try:
        main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    status = code if isinstance(code, int) else 0 if code is None else 1
    return subprocess.CompletedProcess(["tailorgpt", *args], status, out, err)


# --- processes that end with the test session --------------------------------------------------

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it


def tied_to_this_process(parent: int = os.getpid()) -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it ends, however it ends
    (SIGKILL included): a killed pytest leaves no server, Prometheus or training behind. A
    `bentoml serve` that gets SIGTERM stops its workers and exits. (Linux; the signal comes
    when the thread that started the child ends: start them from the main thread.)"""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


# --- the served test model ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    """`tailorgpt ARGS` in two CPU processes (gloo) under torchrun, on a free port."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*run, "--master_port", str(free_port()), "-m", "tailorgpt", *args]


@contextmanager
def serving(
    export_dir: Path, log_name: str, **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `bentoml serve` of the exported test model, two workers unless `settings` (TAILORGPT_
    variables, without the prefix) say otherwise; its process group is ended on leaving, and
    it gets SIGTERM if this process dies first."""
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
        preexec_fn=tied_to_this_process,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process=process, log=log_path)
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


def wait_ready(
    url: str,
    path: str = "/readyz",
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = 180,
) -> None:
    """Until GET url+path answers 200 (a server still loading is not ready); fails at once if
    `process` exits, with the end of its `log`."""

    def tail() -> str:
        return log.read_text()[-3000:] if log else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args} exited:\n{tail()}")
        try:
            if requests.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening, or still loading
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}{path} not ready after {timeout:.0f}s:\n{tail()}")


def wait_for(condition: Callable[[], object], timeout: float = 20) -> bool:
    """Whether `condition()` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def greedy(prompt: str | list[int], max_new_tokens: int = 20, **extra: object) -> dict:
    """A greedy request's fields, for /generate's JSON or GenerationRequest(**...)."""
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, **extra}


def generate(url: str, *requests_: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(
        f"{url}/generate", json={"requests": list(requests_)}, headers=headers, timeout=120
    )


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """The one sample of `name`: a missing metric or per-worker duplicates fail the test."""
    text = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
    samples = [line for line in text.splitlines() if line.startswith(name + "{")]
    assert len(samples) == 1, f"{name}: {samples}"
    return float(samples[0].rsplit(" ", 1)[1])


# --- data ---------------------------------------------------------------------------------------

ZH = "我们今天训练了一个小模型，它学会了说“先测量，再优化”。这是第一篇笔记！"
CHINESE_FILES = ("essay-zh.txt", "diary-zh.txt", "kitchen-zh.txt")


def kept_texts(output: Path) -> list[str]:
    """The texts a `prepare` output kept, train then validation."""
    return [
        json.loads(line)["text"]
        for name in ("train.jsonl", "validation.jsonl")
        for line in (output / name).read_text(encoding="utf-8").splitlines()
    ]


def make_bert_gpt2(root: Path) -> tuple[Path, Path]:
    """A local random-init GPT-2 with a BERT-style Chinese vocabulary (the uer/gpt2-chinese-*
    shape), and a JSONL corpus of Chinese paragraphs."""
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    paragraphs = [
        p.strip()
        for name in CHINESE_FILES
        for p in (CORPUS / name).read_text(encoding="utf-8").split("\n")
        if p.strip()
    ]
    data = root / "paragraphs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs),
        encoding="utf-8",
    )
    characters = sorted({c for p in paragraphs for c in p if not c.isascii()})
    ascii_pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *characters,
        *ascii_pieces,
        *[f"##{c}" for c in string.ascii_lowercase + string.digits],
    ]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    model_dir = root / "model"
    pieces = {piece: i for i, piece in enumerate(vocab)}
    BertTokenizerFast(vocab=pieces).save_pretrained(model_dir)  # 5.x ignores vocab_file=
    shutil.copy(root / "vocab.txt", model_dir)  # transformers 5 saves tokenizer.json only
    # Like the uer checkpoints: GPT-2's default end token id (50256), not [SEP].
    config = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=64, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    return model_dir, data
