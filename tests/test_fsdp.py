"""Fully sharded data parallel (`tailorgpt train --fsdp`) under torchrun: two CPU processes
with gloo, on the tiny model, against plain data parallel on the same data and seed; and the
Kubernetes Job that runs it across pods (k8s/training), rendered and validated offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import psutil
import pytest
import torch
import yaml
from helpers import (
    REPO,
    assert_clean_failure,
    cli,
    run_cli,
    tied_to_this_process,
    torchrun,
    train_args,
)
from safetensors.torch import load_file

from training.model import TINY
from training.plan import GIB, MEMORY_LIMIT_ENV, Hardware, base_config, plan_processes

STEPS = 12
# DDP and FSDP add the same gradients in a different order: measured equal to the logged
# float32 digits over 12 steps (largest difference 0.0, grad norms within 3e-7); the bound
# leaves room for the reduction order of other gloo builds.
LOSS_TOLERANCE = 1e-4


def train_command(output: Path, *extra: str) -> list[str]:
    args = train_args(
        output,
        "--block_size",
        "64",
        "--max_steps",
        str(STEPS),
        "--logging_steps",
        "1",
        "--save_steps",
        "3",
        "--eval_steps",
        "6",
        *extra,
    )
    return torchrun(*args)


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "logs" / "trainer.jsonl").open()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def kill_after_a_checkpoint(command: list[str], partial: Path) -> int:
    """Start `command`, SIGKILL its process group once a checkpoint is saved and training
    has gone past it; the step of that checkpoint."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=tied_to_this_process,
    )
    checkpoints, log = partial / "checkpoints", partial / "logs" / "trainer.jsonl"

    def saved() -> list[int]:
        return [int(p.parent.name[11:]) for p in checkpoints.glob("*/trainer_state.json")]

    deadline = time.monotonic() + 120
    while True:
        logged = re.findall(r'"step": (\d+)}\n', log.read_text()) if log.is_file() else []
        if saved() and max(map(int, logged), default=0) > max(saved()):
            break
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint written"
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill the tree, as a node's loss
    # would, then the group.
    for child in psutil.Process(process.pid).children(recursive=True):
        child.kill()
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return max(saved())


@pytest.mark.model  # trains
def test_sharded_training_matches_data_parallel_resumes_and_exports(tmp_path: Path) -> None:
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    run(train_command(ddp))

    killed_at = kill_after_a_checkpoint(
        train_command(fsdp, "--fsdp"), fsdp.with_name("fsdp.partial")
    )
    assert 0 < killed_at < STEPS
    checkpoint = fsdp.with_name("fsdp.partial") / "checkpoints" / f"checkpoint-{killed_at}"
    # Sharded: one file per process for the weights and for the optimizer state.
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert len(list((checkpoint / "optimizer_0").glob("*.distcp"))) == 2
    run(train_command(fsdp, "--fsdp", "--resume_from_checkpoint"))

    metrics = json.loads((fsdp / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["optimizer_steps"] == STEPS and metrics["fsdp"]
    assert metrics["resumed_from_checkpoint"] == f"checkpoint-{killed_at}"
    expected, got = losses(ddp), losses(fsdp)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    worst = max(abs(got[step] - expected[step]) for step in expected)
    assert worst < LOSS_TOLERANCE, (worst, got, expected)

    # The run directory holds the whole model, gathered: the same weights DDP ends with.
    ddp_weights, fsdp_weights = (load_file(d / "model.safetensors") for d in (ddp, fsdp))
    assert ddp_weights.keys() == fsdp_weights.keys()
    for name, weight in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[name], weight, rtol=0, atol=1e-4, msg=name)

    run_cli("export", str(fsdp), "--output", str(tmp_path / "export"))
    parity = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert parity["fp32"]["max_abs_logit_diff"] < 1e-5
    assert parity["fp32"]["greedy_agreement"] == 1.0


def checkpointing_limit_gb() -> float:
    """A memory limit at which the plan for LoRA under FSDP on two processes needs gradient
    checkpointing (at batch 1) on the tiny model with 64-token blocks."""
    config = base_config(TINY)
    for limit in (i / 10_000 for i in range(100, 0, -1)):
        hardware = Hardware("cpu", "limited", int(limit * GIB), "fp32")
        plan = plan_processes(config, 64, 8, True, hardware, processes=2, fsdp=True)
        if plan.fits and plan.gradient_checkpointing:
            return limit
    raise AssertionError("no limit makes the plan checkpoint")


@pytest.mark.model  # trains
def test_lora_and_checkpointing_under_fsdp_end_as_a_plain_gpt2(tmp_path: Path) -> None:
    out = tmp_path / "lora"
    limit = {MEMORY_LIMIT_ENV: str(checkpointing_limit_gb())}
    result = run(train_command(out, "--fsdp", "--lora"), env=limit)
    assert "FutureWarning" not in result.stderr
    assert "LoRA r=8, FSDP across 2" in result.stdout
    assert "gradient checkpointing on" in result.stdout  # FSDP's, per block
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lora"] and metrics["optimizer_steps"] == STEPS
    assert metrics["validation_after"]["loss"] < metrics["validation_before"]["loss"]
    assert not (out / "adapter_config.json").exists()
    weights = load_file(out / "model.safetensors")
    assert not [name for name in weights if "lora" in name]
    assert len(list((out / "samples").glob("step-*.txt"))) == 3  # before, at 6 and 12


def test_the_training_job_renders_validates_and_rendezvouses_at_pod_zero() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make test` installs it (scripts/install-test-tools.sh)"
    rendered = subprocess.run(
        [kubectl, "kustomize", str(REPO / "k8s" / "training")], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered.stdout)}
    assert set(docs) == {"Job", "Service", "PersistentVolumeClaim"}
    for doc in yaml.safe_load_all(rendered.stdout):
        for version in ("1.30.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
    job, service = docs["Job"], docs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]  # torchrun waits for every node
    assert (
        service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    )
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    (container,) = pod["containers"]
    script = container["args"][0]
    assert f"--nnodes={spec['completions']}" in script
    assert '--node_rank="$JOB_COMPLETION_INDEX"' in script
    pod_zero = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert f"--master_addr={pod_zero}" in script and "--fsdp" in script
    port = service["spec"]["ports"][0]["port"]
    assert f"--master_port={port}" in script
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GPUS_PER_POD"] == str(container["resources"]["limits"]["nvidia.com/gpu"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert mounts["data"]["mountPath"] == "/data" and "--data /data" in script
    assert mounts["runs"]["mountPath"] == "/runs" and "RUN=/runs/" in script
    pvcs = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all(rendered.stdout)
        if d["kind"] == "PersistentVolumeClaim"
    }
    # Every pod writes its shard of each checkpoint into the run folder.
    assert pvcs[claims["runs"]]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_fsdp_in_one_process_says_to_launch_torchrun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    result = cli(capsys, *train_args(out, "--fsdp"))
    assert_clean_failure(result, "--fsdp", "torchrun --nproc_per_node")
    assert not out.exists() and not out.with_name("run.partial").exists()
