"""What the engine promises its callers, and what the server promises its clients.

The engine: a request's last event carries its stats, and `shutdown()` ends the loop thread
with a last event for every request left. The server: a real answer of each route, whole,
streamed and refused, is valid against the schema the server itself publishes at /docs.json.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from service.engine import Chunk, Event, GenerationRequest, LLMEngine


def test_the_last_event_carries_the_requests_stats(export_dir: Path) -> None:
    with LLMEngine(export_dir, max_running=1, threads=1) as engine:
        request = GenerationRequest(prompt="The", max_new_tokens=5, ignore_eos=True)
        *events, last = engine.stream(request)
    assert all(e.stats is None for e in events)
    stats = last.stats
    assert stats is not None and stats.finish_reason == last.finish_reason == "length"
    assert (stats.prompt_tokens, stats.completion_tokens) == (last.prompt_tokens, 5)
    assert stats.queue_seconds is not None and stats.ttft_seconds is not None
    assert 0 <= stats.queue_seconds <= stats.ttft_seconds


def test_shutdown_ends_the_loop_thread_and_the_requests_left(export_dir: Path) -> None:
    engine = LLMEngine(export_dir, max_running=1, threads=1)
    run, decoding = engine.runner.run, threading.Event()

    def run_until_stopped(*args: list[Chunk]) -> list[np.ndarray]:
        """The running request cannot finish before shutdown: its step waits for it."""
        decoding.set()
        while not engine.scheduler.stopped:
            time.sleep(0.01)
        return run(*args)

    engine.runner.run = run_until_stopped  # type: ignore[method-assign]
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    long = GenerationRequest(prompt="The", max_new_tokens=100, ignore_eos=True)
    with engine:
        for _ in range(3):  # one running, two waiting
            engine.submit(long, events.put)
        assert decoding.wait(timeout=30)
    assert not engine.thread.is_alive() and not engine.alive()
    finished = []
    while not events.empty():
        finished += [reason] if (reason := events.get().finish_reason) else []
    assert finished == ["cancelled"] * 3
    engine.shutdown()  # again: nothing to do
    with pytest.raises(RuntimeError):
        engine.submit(long, events.put)


DOCS = "urn:tailorgpt:docs"  # the published document, as a resource that schemas refer into
JSON = "application/json"
CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def registry(server: str) -> Registry:
    document = requests.get(f"{server}/docs.json", timeout=30).json()
    return Registry().with_resource(DOCS, Resource(document, DRAFT202012))


def pointer(*parts: str) -> str:
    """A JSON pointer into the document (RFC 6901 escapes)."""
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in ("", *parts))


def assert_documented(
    registry: Registry, path: str, method: str, response: requests.Response
) -> None:
    """The answer's status is documented for the route, and its JSON body valid against the
    schema documented for that status."""
    status = str(response.status_code)
    where = pointer("paths", path, method, "responses", status, "content", JSON, "schema")
    valid(registry, where, response.json())


def valid(registry: Registry, where: str, answer: Any) -> None:
    Draft202012Validator({"$ref": f"{DOCS}#{where}"}, registry=registry).validate(answer)


def chunks(response: requests.Response) -> list[Any]:
    """A Server-Sent Events answer's JSON chunks, up to its `data: [DONE]`."""
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_generate_answers_as_documented(server: str, registry: Registry) -> None:
    body = {"prompt": "The", "max_new_tokens": 4, "logprobs": 2}
    answer = requests.post(f"{server}/generate", json={"requests": [body]}, timeout=120)
    assert answer.status_code == 200
    assert_documented(registry, "/generate", "post", answer)


def test_models_answer_as_documented(server: str, registry: Registry) -> None:
    models = requests.get(f"{server}/v1/models", timeout=30)
    assert_documented(registry, "/v1/models", "get", models)
    name = models.json()["data"][0]["id"]
    for asked, status in [(name, 200), ("other", 404)]:
        answer = requests.get(f"{server}/v1/models/{asked}", timeout=30)
        assert answer.status_code == status
        assert_documented(registry, "/v1/models/{model}", "get", answer)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": ["The", "A"], "n": 2, "logprobs": 2, "echo": True}),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 2}),
    ],
)
def test_completions_whole_streamed_and_refused_as_documented(
    server: str, registry: Registry, path: str, body: dict[str, Any]
) -> None:
    url, body = f"{server}{path}", {**body, "max_tokens": 4, "seed": 1}
    whole = requests.post(url, json=body, timeout=120)
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] > 0
    assert_documented(registry, path, "post", whole)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    answer = requests.post(url, json=streamed, timeout=120)
    assert answer.status_code == 200
    schema = pointer("paths", path, "post", "responses", "200", "content", JSON, "schema")
    every = chunks(answer)
    assert every[-1]["choices"] == [] and "usage" in every[-1]  # the usage chunk
    for chunk in every:
        assert "usage" not in chunk or not chunk["choices"]
        valid(registry, schema, chunk)
    refused = requests.post(url, json={**body, "max_tokens": 0}, timeout=30)
    assert refused.status_code == 400
    assert_documented(registry, path, "post", refused)


def test_a_route_that_is_not_there_answers_an_error_body(server: str, registry: Registry) -> None:
    answer = requests.get(f"{server}/v1/nowhere", timeout=30)
    assert answer.status_code == 404
    valid(registry, pointer("components", "schemas", "ErrorBody"), answer.json())
