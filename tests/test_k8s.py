"""The kustomize base renders and passes strict schema validation, offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO


def render(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make test` installs it (scripts/install-test-tools.sh)"
    return subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True
    ).stdout


def test_base_renders_and_validates_strictly(tmp_path: Path) -> None:
    manifest = tmp_path / "base.yaml"
    manifest.write_text(render(REPO / "k8s" / "base"))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(manifest)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployment_probes_resources_and_port() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(render(REPO / "k8s" / "base"))}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["ports"][0]["containerPort"] == 3000
    assert docs["Service"]["spec"]["ports"][0]["port"] == 3000
    selector = docs["Service"]["spec"]["selector"]
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
