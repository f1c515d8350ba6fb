"""Session fixtures: a real tiny model trained, exported and served, all on this machine.

BENTOML_HOME points at a temporary store before anything imports bentoml, and TAILORGPT_CACHE
at a temporary cache, so tests never touch the user's own.
"""

from __future__ import annotations

import os
import tempfile

os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="tailorgpt-bentoml-")
os.environ["TAILORGPT_CACHE"] = tempfile.mkdtemp(prefix="tailorgpt-cache-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# No hub on the test machines: a model name that would be downloaded fails at once, in this
# process as in the CLI subprocesses.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Re-exported: test modules import these from helpers (one definition of each).
from helpers import (  # noqa: F401
    ADAPTERS,
    CORPUS,
    KEYS,
    LORA_KEY,
    MODEL_NAME,
    REPO,
    TAILORGPT,
    free_port,
    run_cli,
    server_home,
    serving,
    train_args,
    wait_ready,
)

if TYPE_CHECKING:
    from service.engine import LLMEngine

# A test that uses one of these fixtures, itself or through another (fp32_engine...), needs the
# trained model, its export or a server of it: it gets the `model` marker, and `make test-fast`
# (-m "not model") leaves it out. A test that trains, exports or serves on its own says so with
# @pytest.mark.model. Every other test is fast by default.
MODEL_FIXTURES = {"workdir", "run_training", "run_dir", "export_dir", "server", "keyed_server"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


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


@pytest.fixture(scope="session")
def server(export_dir: Path) -> Iterator[str]:
    """`bentoml serve` as a real subprocess on a free loopback port."""
    # Two workers, each its own engine: metrics must add up across them.
    with serving(export_dir, "serve.log", MAX_BATCH_SIZE="8", MAX_RUNNING="4") as (url, _):
        yield url


@pytest.fixture(scope="session")
def keyed_server(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second server, one worker, whose keys come one from the variable, one from a file; one
    sequence runs at a time, 32 wait (test_openai_api.py fills its queue)."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"\n{KEYS[1]}\n")
    settings = {"API_KEY": KEYS[0], "API_KEY_FILE": str(key_file), "WORKERS": "1"}
    settings |= {"MAX_RUNNING": "1", "MAX_QUEUE": "32"}
    with serving(export_dir, "keyed.log", **settings) as (url, _):
        yield url


def make_adapter(base: Path, out: Path, seed: int, rank: int, targets: list[str]) -> None:
    """A peft adapter whose weights move the model as a fine-tune would (B is zero at
    peft's init: drawn here), and its merged model beside it (out/merged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=targets, fan_in_fan_out=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    for name, weight in model.named_parameters():
        if "lora_" in name:
            weight.data.normal_(0, 0.08)
    model.save_pretrained(out)
    model.merge_and_unload().save_pretrained(out / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if (base / name).is_file():
            shutil.copy(base / name, out / "merged" / name)


@pytest.fixture(scope="session")
def adapters(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three adapters of the test model (ranks 4, 8, 8; the first on c_attn only, as peft's
    default for GPT-2), and each one's merged model exported."""
    from export.onnx import export

    root = tmp_path_factory.mktemp("adapters")
    targets = [["c_attn"], ["c_attn", "c_proj", "c_fc"], ["c_attn", "c_proj", "c_fc"]]
    found = {}
    for seed, (name, target) in enumerate(zip(ADAPTERS, targets, strict=True)):
        make_adapter(run_dir, root / name, seed, 4 if seed == 0 else 8, target)
        export(root / name / "merged", root / f"{name}-merged-export")
        found[name] = root / name
    return found


@pytest.fixture(scope="session")
def lora_server(export_dir: Path, adapters: dict[str, Path]) -> Iterator[str]:
    """A server of the test model with alice's adapter from the start and the adapters
    directory open to run-time loads, behind LORA_KEY. The directory also holds what a load
    must refuse: a link out of it (to a copy of bob's adapter), a directory of links to that
    copy's files, a link to itself and a malformed adapter."""
    lora_dir = adapters["alice"].parent
    outside = lora_dir.parent / "outside"
    shutil.copytree(adapters["bob"], outside, ignore=shutil.ignore_patterns("merged"))
    (lora_dir / "link-out").symlink_to(outside, target_is_directory=True)
    (lora_dir / "files-out").mkdir()  # a directory inside whose files lead out
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (lora_dir / "files-out" / name).symlink_to(outside / name)
    (lora_dir / "loop").symlink_to(lora_dir / "loop")
    (lora_dir / "junk").mkdir()
    (lora_dir / "junk" / "adapter_config.json").write_text("{not json")
    (lora_dir / "junk" / "adapter_model.safetensors").write_bytes(b"")
    settings = {"WORKERS": "1", "API_KEY": LORA_KEY, "LORA_DIR": str(lora_dir)}
    settings["LORA_MODULES"] = f"alice={adapters['alice']}"
    with serving(export_dir, "lora.log", **settings) as (url, _):
        yield url


@pytest.fixture(scope="session")
def fp32_engine(export_dir: Path) -> Iterator[LLMEngine]:
    """The export's fp32 variant in an engine of this process, 3 slots; shared: a test that
    changes a setting of it puts it back."""
    from service.engine import LLMEngine

    with LLMEngine(export_dir, "fp32", threads=2, max_running=3) as engine:
        yield engine


@pytest.fixture(scope="session")
def int8_engine(export_dir: Path) -> Iterator[LLMEngine]:
    """As fp32_engine, the int8 variant."""
    from service.engine import LLMEngine

    with LLMEngine(export_dir, "int8", threads=2, max_running=3) as engine:
        yield engine
