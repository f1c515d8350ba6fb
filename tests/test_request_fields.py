"""vLLM's token tools (/tokenize, /detokenize) and request fields (stop_token_ids, min_tokens,
include_stop_str_in_output, stream_options.continuous_usage_stats, priority) on the real
server, over HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import KEYS, greedy, serving

CONTEXT = 256  # the test model's
PROMPT = "The model learned"
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def post(url: str, path: str, body: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def complete(url: str, **body: object) -> dict:
    answer = post(url, "/v1/completions", {"prompt": PROMPT, "temperature": 0, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def greedy_ids(url: str, n: int = 12) -> list[int]:
    """The token ids greedy decoding gives PROMPT (from /generate's log-probabilities)."""
    answer = post(url, "/generate", {"requests": [greedy(PROMPT, n, logprobs=0, ignore_eos=True)]})
    return [entry["token_id"] for entry in answer.json()[0]["logprobs"]]


def test_tokenize_and_detokenize_as_vllm(server: str, keyed_server: str) -> None:
    tokens = post(server, "/tokenize", {"prompt": PROMPT, "add_special_tokens": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == CONTEXT
    # The ids a prompt runs as: the same usage as the text.
    as_ids = complete(server, prompt=tokens["tokens"], max_tokens=1)["usage"]["prompt_tokens"]
    assert as_ids == tokens["count"] == complete(server, max_tokens=1)["usage"]["prompt_tokens"]
    text = post(server, "/detokenize", {"model": None, "tokens": tokens["tokens"]}).json()
    assert text == {"prompt": PROMPT}
    chat = post(server, "/tokenize", CHAT).json()
    answer = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 1}).json()
    assert chat["count"] == answer["usage"]["prompt_tokens"]
    bare = post(server, "/tokenize", {**CHAT, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"] and bare["tokens"] == chat["tokens"][: bare["count"]]
    outside = post(server, "/detokenize", {"tokens": [1, 10**6]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"
    assert post(server, "/tokenize", {"prompt": "x", "model": "gpt-4"}).status_code == 404
    assert post(keyed_server, "/tokenize", {"prompt": "x"}).status_code == 401
    key = {"Authorization": f"Bearer {KEYS[1]}"}
    assert post(keyed_server, "/detokenize", {"tokens": [1]}, key).status_code == 200


def test_stop_token_ids_and_min_tokens(server: str, export_dir: Path) -> None:
    ids = greedy_ids(server)
    k = 4
    at = ids.index(ids[k])  # its first appearance ends the output
    stopped = complete(server, max_tokens=12, stop_token_ids=[ids[k]])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == at
    # Masked until min_tokens: the output goes on past where it stopped.
    held = complete(server, max_tokens=12, stop_token_ids=[ids[k]], min_tokens=at + 1)
    assert held["usage"]["completion_tokens"] > at
    # The end token, made almost certain by logit_bias, only after min_tokens.
    eos = json.loads((export_dir / "config.json").read_text())["eos_token_id"]
    bias = {str(eos): 100}
    assert complete(server, max_tokens=12, logit_bias=bias)["usage"]["completion_tokens"] == 0
    chat = post(
        server, "/v1/chat/completions", {**CHAT, "logit_bias": bias, "min_tokens": 5}
    ).json()
    assert chat["usage"]["completion_tokens"] == 5 and chat["choices"][0]["finish_reason"] == "stop"
    for body, param in [
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"priority": 1}, "priority"),  # this server is first come first served
    ]:
        refused = post(server, "/v1/completions", {"prompt": PROMPT, **body})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, body


def test_include_stop_str_in_output(server: str) -> None:
    text = complete(server, max_tokens=12, ignore_eos=True)["choices"][0]["text"]
    stop = text.strip()[2:5]
    at = text.index(stop)
    cut = complete(server, max_tokens=12, stop=[stop])["choices"][0]["text"]
    kept = complete(server, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert cut == text[:at] and kept["choices"][0]["text"] == text[: at + len(stop)]


def test_continuous_usage_stats_put_usage_in_every_chunk(server: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in [
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", CHAT),
    ]:
        body = {**body, "max_tokens": 8, "ignore_eos": True, "stream": True}
        with requests.post(
            f"{server}{path}", json={**body, "stream_options": options}, stream=True, timeout=60
        ) as answer:
            lines = [x for x in answer.iter_lines(decode_unicode=True) if x]
        chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
        usages = [c["usage"] for c in chunks]
        assert len(usages) >= 2 and all(u["prompt_tokens"] > 0 for u in usages), path
        done = [u["completion_tokens"] for u in usages]
        assert done == sorted(done) and done[-1] == 8, (path, done)
        plain = requests.post(f"{server}{path}", json=body, stream=True, timeout=60)
        with plain:  # without it, only the usage chunk of include_usage has one
            assert '"usage"' not in plain.text


NAMED = {"alice": "sk-alice-secret", "key-2": "sk-bare-secret"}
ALICE = {"Authorization": f"Bearer {NAMED['alice']}"}


@pytest.fixture(scope="module")
def settings_server(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The one server of the settings the session servers lack: priority scheduling, and a key
    file of a named key and a bare one. One worker, one sequence at a time."""
    keys = tmp_path_factory.mktemp("named") / "keys.txt"
    keys.write_text(f"alice:{NAMED['alice']}\n\n{NAMED['key-2']}\n")
    settings = {"SCHEDULING_POLICY": "priority", "WORKERS": "1", "MAX_RUNNING": "1"}
    settings |= {"MAX_QUEUE": "64", "API_KEY_FILE": str(keys)}
    with serving(export_dir, "settings.log", **settings) as (url, _):
        yield url


def test_priority_scheduling_runs_lower_priority_first(settings_server: str) -> None:
    url = settings_server
    firsts: dict[str, float] = {}
    running = threading.Event()

    def stream(name: str, n: int, priority: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": 250, "ignore_eos": True, "stream": True}
        body |= {"n": n, "priority": priority}
        answer = requests.post(
            f"{url}/v1/completions", json=body, headers=ALICE, stream=True, timeout=120
        )
        with answer as r:
            assert r.status_code == 200, r.text
            lines = (line for line in r.iter_lines() if line)
            next(lines)
            firsts[name] = time.monotonic()
            running.set()
            for _ in lines:  # read to the end: leaving would cancel it
                pass

    # 16 samples, one at a time: the two that come next wait behind the 15 left.
    threads = [threading.Thread(target=stream, args=("hold", 16, 0))]
    threads[0].start()
    assert running.wait(60)
    threads.append(threading.Thread(target=stream, args=("late", 1, 10)))
    threads[-1].start()
    time.sleep(0.05)
    threads.append(threading.Thread(target=stream, args=("urgent", 1, -5)))
    threads[-1].start()
    for thread in threads:
        thread.join()
    assert firsts["hold"] < firsts["urgent"] < firsts["late"], firsts


def key_usage(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("tailorgpt_key_requests_total{", "tailorgpt_key_tokens_total{"))
    }


def test_usage_per_key_name_in_the_metrics_and_the_log(
    settings_server: str, export_dir: Path
) -> None:
    url = settings_server
    before = key_usage(url)
    ids = {"X-Request-Id": "per-key-1"}
    answer = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5}, ALICE | ids)
    usage = answer.json()["usage"]
    bare = {"Authorization": f"Bearer {NAMED['key-2']}"}
    assert post(url, "/tokenize", {"prompt": PROMPT}, bare).status_code == 200
    assert post(url, "/tokenize", {"prompt": PROMPT}).status_code == 401  # no key: no name
    after = key_usage(url)

    def grew(sample: str) -> float:
        return after.get(sample, 0) - before.get(sample, 0)

    assert grew('tailorgpt_key_requests_total{key="alice",status="200"}') == 1
    assert grew('tailorgpt_key_tokens_total{key="alice",kind="prompt"}') == usage["prompt_tokens"]
    completion = 'tailorgpt_key_tokens_total{key="alice",kind="completion"}'
    assert grew(completion) == usage["completion_tokens"]
    assert grew('tailorgpt_key_requests_total{key="key-2",status="200"}') == 1
    log = (export_dir.parent / "settings.log").read_text()
    assert not any(secret in log or secret in str(after) for secret in NAMED.values())
    [line] = [json.loads(x) for x in log.splitlines() if x.startswith('{"id": "per-key-1"')]
    assert line["key"] == "alice"
