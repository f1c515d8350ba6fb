"""Faults on a server of its own (these tests kill its processes): a worker killed with SIGKILL,
bursts that must leave no KV cache or memory behind, and the drain on SIGTERM, which ends it
and so runs last."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from helpers import metric, serving, wait_for, wait_ready

LONG = {"prompt": "The", "max_tokens": 250, "ignore_eos": True, "n": 16}


@pytest.fixture(scope="module")
def faulty(export_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    # One sequence at a time, so a request of LONG runs for a while.
    with serving(export_dir, "faults.log", MAX_RUNNING="1", MAX_QUEUE="64") as server:
        yield server


def workers(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # one that has just died
            if "_bentoml_impl.worker.service" in " ".join(child.cmdline()):
                found.append(child)
    return found


def test_a_worker_killed_with_sigkill_is_replaced(
    faulty: tuple[str, subprocess.Popen[bytes]], export_dir: Path
) -> None:
    url, process = faulty
    before = workers(process)
    assert len(before) == 2
    before[0].send_signal(signal.SIGKILL)

    def replaced() -> bool:
        pids = {w.pid for w in workers(process)}
        return len(pids) == 2 and before[0].pid not in pids

    assert wait_for(replaced), "BentoML's arbiter (circus) started no worker in its place"
    wait_ready(url, process=process, log=export_dir.parent / "faults.log")
    body = {"prompt": "The", "max_tokens": 8}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(url, body), range(16)))
    assert [a.status_code for a in answers] == [200] * 16


def post(url: str, body: dict, **options: object) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json=body, timeout=120, **options)


def burst(url: str) -> None:
    """Mixed traffic at once: whole answers, samples, streams, and clients that leave mid-stream."""

    def one(i: int) -> None:
        body = {"prompt": "The " * (i % 7 + 1), "max_tokens": 24 + i % 40, "n": 1 + i % 3}
        if i % 4 == 3:
            with post(url, {**body, "stream": True, "max_tokens": 200}, stream=True) as stream:
                next(line for line in stream.iter_lines() if line)  # then gone
        else:
            assert post(url, {**body, "stream": i % 4 == 1}).status_code == 200

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(24)))


def idle(url: str) -> bool:
    gauges = ("queue_length", "running_sequences", "kv_cache_tokens", "kv_cache_reserved_tokens")
    return all(metric(url, f"tailorgpt_{gauge}") == 0 for gauge in gauges)


def test_kv_cache_and_memory_return_to_baseline_after_bursts(
    faulty: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, process = faulty
    for _ in range(2):  # warm-up: the allocator and onnxruntime's arenas grow to their working
        burst(url)  # size, which on a loaded machine (other batch shapes) takes more than one burst
        assert wait_for(lambda: idle(url))
    rss = []
    for _ in range(4):
        burst(url)
        assert wait_for(lambda: idle(url)), "the KV cache was not freed after a burst"
        rss.append(sum(w.memory_info().rss for w in workers(process)))
    grown = (rss[-1] - rss[0]) / 2**20
    assert grown < 16, f"RSS grew {grown:.1f} MiB over {len(rss)} bursts: {rss}"


def test_sigterm_drains_running_requests_refuses_new_ones_and_exits_0(
    faulty: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, process = faulty
    stream = post(url, {**LONG, "stream": True}, stream=True)
    lines = stream.iter_lines(decode_unicode=True)
    first = next(line for line in lines if line)  # the stream runs: 16 sequences, one by one
    whole: list[requests.Response] = []
    waiting = threading.Thread(target=lambda: whole.append(post(url, LONG)))
    waiting.start()
    # Both requests are in (one request holds 16 sequences at most) when the signal comes.
    assert wait_for(lambda: queued_and_running(url) > 16)
    process.send_signal(signal.SIGTERM)  # as Kubernetes does: to the main process only
    assert wait_for(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 503)
    refused = post(url, {"prompt": "The"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "shutting down" in refused.json()["error"]["message"]
    assert requests.get(f"{url}/livez", timeout=5).status_code == 200
    events = [first, *(line for line in lines if line)]
    assert events[-1] == "data: [DONE]"
    finished = [json.loads(e.removeprefix("data: "))["choices"][0] for e in events[:-1]]
    assert sorted(c["index"] for c in finished if c["finish_reason"] == "length") == list(range(16))
    waiting.join(timeout=60)
    assert whole[0].status_code == 200 and whole[0].json()["usage"]["completion_tokens"] == 4000
    assert process.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):  # no worker left behind either
        os.killpg(process.pid, 0)


def queued_and_running(url: str) -> float:
    return metric(url, "tailorgpt_queue_length") + metric(url, "tailorgpt_running_sequences")
