"""Server settings: each a `tailorgpt serve` flag over its TAILORGPT_* variable, checked at
start with one line, in the CLI and under plain `bentoml serve`; API keys from both places."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MODEL_NAME, REPO

from service.server.settings import SettingError, api_keys, named_api_keys, settings_from
from tailorgpt import cli


def test_a_bad_setting_is_one_line_naming_it() -> None:
    with pytest.raises(SettingError) as bad:
        settings_from({"TAILORGPT_MAX_QUEUE": "lots"})
    assert str(bad.value).startswith("TAILORGPT_MAX_QUEUE (serve --max_queue) = 'lots': ")
    with pytest.raises(SettingError, match="TAILORGPT_VARIANT"):
        settings_from({"TAILORGPT_VARIANT": "int4"})
    assert settings_from({"TAILORGPT_ENABLE_PREFIX_CACHING": "0"}).enable_prefix_caching is False
    # The int8 KV cache is the CPU's: asked for on a GPU, a line saying what to use instead.
    for gpu in ({"TAILORGPT_DEVICE": "cuda"}, {"TAILORGPT_VARIANT": "fp16"}):
        with pytest.raises(SettingError, match=r"int8 KV cache runs on the CPU.*auto or fp32"):
            settings_from({"TAILORGPT_KV_CACHE_DTYPE": "int8", **gpu})
        assert settings_from(gpu).kv_cache_dtype == "auto"


def test_plain_bentoml_serve_stops_with_one_line() -> None:
    env = {**os.environ, "TAILORGPT_MAX_QUEUE": "lots"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service.server.service:TailorGPT",
            "--port",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert "tailorgpt: error: TAILORGPT_MAX_QUEUE (serve --max_queue) = 'lots'" in output


def test_serve_flags_over_variables_on_loopback(
    export_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    launched: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: launched.append((cmd, env)))
    monkeypatch.setenv("TAILORGPT_MAX_QUEUE", "7")
    monkeypatch.setenv("TAILORGPT_MAX_RUNNING", "3")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--model", f"tailorgpt-{MODEL_NAME}:latest", "--max_running", "5"])
    command, env = launched[0]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert env["TAILORGPT_MAX_RUNNING"] == "5" and env["TAILORGPT_MAX_QUEUE"] == "7"
    monkeypatch.setenv("TAILORGPT_MAX_QUEUE", "lots")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--model", f"tailorgpt-{MODEL_NAME}:latest"])
    error = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(error) == 1 and "TAILORGPT_MAX_QUEUE" in error[0]


def test_api_keys_from_the_variable_and_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k3\n\n k4 \n")
    settings = settings_from({"TAILORGPT_API_KEY_FILE": str(keys)})
    assert api_keys(settings, {"TAILORGPT_API_KEY": "k1, k2,"}) == ["k1", "k2", "k3", "k4"]
    assert api_keys(settings_from({}), {}) == []
    with pytest.raises(SettingError, match="cannot read it"):
        api_keys(settings_from({"TAILORGPT_API_KEY_FILE": str(tmp_path / "none")}), {})


def test_key_file_lines_name_their_keys_and_bare_keys_are_numbered(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alice:sk-a\n\nsk-bare\nbob: sk-b \nnot a name:sk:c\n")
    settings = settings_from({"TAILORGPT_API_KEY_FILE": str(keys)})
    named = named_api_keys(settings, {"TAILORGPT_API_KEY": "sk-env"})
    assert named == {
        "key-1": "sk-env",
        "alice": "sk-a",
        "key-3": "sk-bare",
        "bob": "sk-b",
        "key-5": "not a name:sk:c",  # what is before its colon is no name: a bare key
    }
    assert api_keys(settings, {}) == ["sk-a", "sk-bare", "sk-b", "not a name:sk:c"]
    keys.write_text("alice:sk-a\nalice:sk-b\n")
    with pytest.raises(SettingError, match="'alice' is given twice"):
        named_api_keys(settings, {})
