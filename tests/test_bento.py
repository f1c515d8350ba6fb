"""`bentoml build` packs the service, its lean requirements and the stored model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import MODEL_NAME, REPO


def test_bento_build_packs_service_and_model(export_dir: Path) -> None:
    env = {**os.environ, "TAILORGPT_MODEL": f"tailorgpt-{MODEL_NAME}:latest"}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-o", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, version = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:").split(":")
    bento = Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    models = [m["tag"] for service in info["services"] for m in service["models"]]
    assert len(models) == 1 and models[0].startswith(f"tailorgpt-{MODEL_NAME}:")
    for module in ("engine/scheduler", "engine/llm_engine", "engine/runner", "server/service"):
        assert (bento / "src" / "service" / f"{module}.py").is_file(), module
    assert (bento / "src" / "artifacts" / "__init__.py").is_file()
    assert not (bento / "src" / "training").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements
    assert "torch==" not in requirements  # the serving image carries no training stack

    # The Containerfile `make image` builds (scripts/containerize.py): BentoML's build stage
    # without its compiler and git, then a runtime stage with the venv and the Bento only.
    render = (
        "import sys; sys.path.insert(0, 'scripts'); import containerize; "
        f"print(containerize.render('{name}:{version}', 'localhost/runtime:test'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", render],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    containerfile = result.stdout
    assert "build-essential" not in containerfile and " git" not in containerfile
    build, runtime = containerfile.split("\nFROM localhost/runtime:test AS runtime\n")
    assert " AS base-container" in build and "pip install -r $BENTO_PATH/env/python" in build
    assert "uv " not in runtime and "pip " not in runtime
    assert "COPY --from=base-container /app /app" in runtime
    assert "ARG TAILORGPT_VARIANT=int8" in runtime and "ENV BENTOML_HOME=" in runtime
    assert "useradd -m -u $BENTO_USER_UID" in runtime
    lines = runtime.strip().splitlines()
    assert lines[-3:] == [
        "USER bentoml",
        "",
        'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]',
    ], lines[-3:]
