"""What benchmark clients and tools assume of an LLM server besides OpenAI's routes (vLLM's
/health, /ping, /version, max_model_len), and what operators meet: a wrong method's 405, the
request log of /generate, a request cancelled while queued in the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import requests
from helpers import KEYS, generate, greedy, metric, wait_for

import tailorgpt

CONTEXT = 256  # the test model's
KEY = {"Authorization": f"Bearer {KEYS[0]}"}


def total(url: str, name: str, headers: dict | None = None) -> float:
    """The sum of every sample of `name` (all label values)."""
    text = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + "{"))


def test_health_ping_and_version_are_open_without_a_key(keyed_server: str) -> None:
    assert requests.get(f"{keyed_server}/v1/models", timeout=10).status_code == 401
    for method, path in [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")]:
        answer = requests.request(method, f"{keyed_server}{path}", timeout=10)
        assert answer.status_code == 200, (path, answer.text)
    version = requests.get(f"{keyed_server}/version", timeout=10)
    assert version.json() == {"version": tailorgpt.__version__}


def test_models_give_vllms_max_model_len(server: str) -> None:
    [model] = requests.get(f"{server}/v1/models", timeout=10).json()["data"]
    assert model["max_model_len"] == CONTEXT and model["root"] == model["id"]
    one = requests.get(f"{server}/v1/models/{model['id']}", timeout=10).json()
    assert one == model


def test_a_wrong_method_on_a_v1_route_is_a_405_with_allow(server: str) -> None:
    for method, path, allowed in [
        ("GET", "/v1/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v1/models/anything", "GET, HEAD"),
    ]:
        answer = requests.request(method, f"{server}{path}", json={}, timeout=10)
        assert answer.status_code == 405, (method, path, answer.text)
        assert answer.headers["allow"] == allowed
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and method in error["message"]
    assert requests.get(f"{server}/v1/nothing", timeout=10).status_code == 404


def test_generate_logs_tokens_queue_time_and_ttft(server: str, export_dir: Path) -> None:
    ids = {"X-Request-Id": "generate-log-1"}
    answer = requests.post(
        f"{server}/generate",
        json={"requests": [greedy("The", 5), greedy("Once", 3)]},
        headers=ids,
        timeout=60,
    )
    assert answer.status_code == 200
    results = answer.json()

    def lines() -> list[dict]:
        log = (export_dir.parent / "serve.log").read_text()
        return [json.loads(x) for x in log.splitlines() if x.startswith('{"id": "generate-log-1"')]

    assert wait_for(lines)  # written once the answer has gone
    [line] = lines()
    assert line["route"] == "/generate" and line["status"] == 200
    assert line["completion_tokens"] == sum(r["completion_tokens"] for r in results)
    assert line["prompt_tokens"] == sum(r["prompt_tokens"] for r in results)
    assert line["queue_seconds"] is not None and line["ttft_seconds"] is not None
    assert line["finish_reason"] in ("length", "stop", ["length", "stop"], ["stop", "length"])
    assert generate(server, greedy("The", 2)).status_code == 200


def test_a_request_cancelled_while_queued_is_counted(keyed_server: str) -> None:
    """Every finished request, one cancelled before it got a slot too, has its queue time
    observed (the keyed server runs one sequence at a time)."""
    url = keyed_server
    assert wait_for(lambda: total(url, "tailorgpt_running_sequences", KEY) == 0)
    queued_before = total(url, "tailorgpt_queue_seconds_count", KEY)
    finished_before = total(url, "tailorgpt_requests_total", KEY)

    def hold(n: int) -> requests.Response:
        body = {"prompt": "The", "max_tokens": 250, "ignore_eos": True, "stream": True, "n": n}
        return requests.post(f"{url}/v1/completions", json=body, headers=KEY, stream=True)

    held = hold(8)
    waiting = hold(1)  # behind 7 samples: still queued when it leaves
    assert waiting.status_code == 200
    waiting.close()
    next(line for line in held.iter_lines() if line)
    held.close()
    assert wait_for(lambda: metric(url, "tailorgpt_queue_length", KEY) == 0)
    assert wait_for(lambda: metric(url, "tailorgpt_running_sequences", KEY) == 0)

    def counted() -> tuple[float, float]:
        queued = total(url, "tailorgpt_queue_seconds_count", KEY) - queued_before
        return queued, total(url, "tailorgpt_requests_total", KEY) - finished_before

    assert wait_for(lambda: counted()[1] == 9), counted()
    assert counted() == (9, 9)
