"""The monitoring bundle against the real thing: a real Prometheus, with monitoring/alerts.yaml's
rules loaded, scrapes a real `bentoml serve` under load (more than its queue holds, so some
requests are refused), and every query of the Grafana dashboard and of the alert rules returns
data. promtool checks the rules."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from helpers import REPO, free_port, serving, tied_to_this_process, wait_for, wait_ready

DASHBOARD = json.loads((REPO / "monitoring" / "dashboard.json").read_text())
RULES = yaml.safe_load((REPO / "monitoring" / "alerts.yaml").read_text())["spec"]
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"]]
PANEL_QUERIES = [
    pytest.param(target["expr"], id=f"{panel['title']}/{target['refId']}")
    for panel in DASHBOARD["panels"]
    for target in panel["targets"]
]
# Grafana's variables as it fills them for "All" jobs and a short time range.
GRAFANA_VARIABLES = {"$job": ".*", "$__rate_interval": "1m"}
# Each alert is `QUERY > THRESHOLD`: QUERY must return data whether or not the alert fires.
ALERT_EXPR = re.compile(r"(?P<query>.+?)\s*(?P<op>[<>])\s*(?P<threshold>[0-9.]+)", re.S)
# A shared start longer than the prefix cache's least (service/engine/prefix_cache.py), so it hits.
SYSTEM = "You answer in plain words, briefly, and stay on the topic you are asked about. " * 2
PROMPTS = [SYSTEM + p for p in ("The service", "A checkpoint is", "Clean text beats")]
LOAD_CAP_S = 240  # the load stops by itself however the tests go


def rules_file(directory: Path) -> Path:
    """The PrometheusRule's spec is a Prometheus rules file as it stands."""
    path = directory / "tailorgpt.rules.yml"
    path.write_text(yaml.safe_dump(RULES))
    return path


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test` installs it (scripts/install-test-tools.sh)"
    return path


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(rules_file(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(ALERTS)} rules found" in result.stdout


def test_every_alert_is_a_query_against_a_threshold() -> None:
    for rule in ALERTS:
        assert ALERT_EXPR.fullmatch(rule["expr"].strip()), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def load(url: str, stop: threading.Event) -> None:
    """One client's loop: streamed and whole completions, refusals for load included."""
    session = requests.Session()
    deadline = time.monotonic() + LOAD_CAP_S
    while not stop.is_set() and time.monotonic() < deadline:
        prompt, tokens = random.choice(PROMPTS), random.randint(8, 32)
        if random.random() < 0.5:
            body = {"prompt": prompt, "max_tokens": tokens, "stream": True}
            with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=60) as r:
                for _ in r.iter_lines():
                    pass
        else:
            request = {"prompt": prompt, "max_new_tokens": tokens}
            session.post(f"{url}/generate", json={"requests": [request]}, timeout=60)


def query(prometheus: str, expr: str) -> list[dict]:
    answer = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    assert answer.status_code == 200, f"{expr}: {answer.text}"
    return answer.json()["data"]["result"]


def wait_for_data(prometheus: str, expr: str, seconds: float = 90) -> None:
    if not wait_for(lambda: query(prometheus, expr), seconds):
        raise AssertionError(f"no data for {expr} in {seconds:.0f}s")


@pytest.fixture(scope="module")
def prometheus(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus scraping a server that the load keeps busy for as long as the tests query:
    two workers, each running 2 and queueing 2, against 12 clients."""
    directory = tmp_path_factory.mktemp("prometheus")
    settings = {"MAX_RUNNING": "2", "MAX_QUEUE": "2"}
    with serving(export_dir, "monitoring.log", **settings) as (server, _):
        config = directory / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules_file(directory))],
                    "scrape_configs": [
                        {
                            "job_name": "tailorgpt",
                            "static_configs": [{"targets": [server.removeprefix("http://")]}],
                        }
                    ],
                }
            )
        )
        port = free_port()
        process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=tied_to_this_process,
        )
        url = f"http://127.0.0.1:{port}"
        stop = threading.Event()
        clients = ThreadPoolExecutor(12)
        try:
            wait_ready(url, "/-/ready", process=process, timeout=60)
            for _ in range(12):
                clients.submit(load, server, stop)
            # Every kind of event has happened, rates see more than one sample of each, and
            # subqueries (the queue's deriv) more than one step.
            wait_for_data(url, "count_over_time(up[1m]) >= 10")
            wait_for_data(url, "increase(tailorgpt_requests_rejected_total[1m]) > 0")
            wait_for_data(url, "increase(tailorgpt_time_per_output_token_seconds_count[1m]) > 0")
            wait_for_data(url, "increase(tailorgpt_prefix_cache_hit_tokens_total[1m]) > 0")
            yield url
        finally:
            stop.set()
            clients.shutdown(wait=True, cancel_futures=True)
            process.terminate()
            process.wait(timeout=30)


def assert_data(prometheus: str, expr: str) -> None:
    result = query(prometheus, expr)
    assert result, f"no data: {expr}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(v) for v in values), f"only {values}: {expr}"


@pytest.mark.parametrize("expr", PANEL_QUERIES)
def test_every_panel_query_returns_data(prometheus: str, expr: str) -> None:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert_data(prometheus, expr)


@pytest.mark.parametrize("rule", ALERTS, ids=[rule["alert"] for rule in ALERTS])
def test_every_alert_query_returns_data(prometheus: str, rule: dict) -> None:
    match = ALERT_EXPR.fullmatch(rule["expr"].strip())
    assert match, rule["expr"]
    assert_data(prometheus, match["query"])
    # With the threshold, as Prometheus evaluates it: 0 or 1 for every series, no error.
    assert_data(prometheus, f"({match['query']}) {match['op']} bool {match['threshold']}")
    loaded = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    (evaluated,) = [r for g in loaded for r in g["rules"] if r["name"] == rule["alert"]]
    assert evaluated["health"] == "ok", evaluated.get("lastError")
