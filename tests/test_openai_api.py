"""`/v1/completions` and `/v1/models` on the real server, through the official openai client
and raw HTTP: streaming, errors, disconnects and a full queue."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
import requests
from helpers import KEYS, generate, metric, wait_for

from service.engine import Event, RequestStats
from service.server import openai_api

PROMPT = "用自己的文字训练一个模型"


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-needed", max_retries=0)


def test_the_openai_client_plain_and_streaming(client: openai.OpenAI, server: str) -> None:
    model = client.models.list().data[0].id
    assert model == "tailorgpt-testmodel"
    expected = generate(server, {"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0})
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
    assert whole.choices[0].text == expected.json()[0]["text"]
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens == expected.json()[0]["completion_tokens"]
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    sampled = {"model": model, "prompt": "The", "max_tokens": 12, "temperature": 0.8, "seed": 5}
    first = client.completions.create(**sampled).choices[0].text
    assert client.completions.create(**sampled).choices[0].text == first


def test_several_prompts_token_ids_logprobs_and_penalties(
    client: openai.OpenAI, server: str
) -> None:
    prompts = [PROMPT, "The", "Clean text"]
    options = {"max_tokens": 6, "temperature": 0, "presence_penalty": 0.5, "logit_bias": {"3": 1}}
    whole = client.completions.create(model=None, prompt=prompts, logprobs=2, **options)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, whole.choices, strict=True):
        alone = client.completions.create(model=None, prompt=prompt, logprobs=2, **options)
        assert choice.text == alone.choices[0].text
        assert choice.logprobs.token_logprobs == alone.choices[0].logprobs.token_logprobs
        assert "".join(choice.logprobs.tokens) == choice.text
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert whole.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in whole.choices)
    streamed = ["", "", ""]
    for chunk in client.completions.create(model=None, prompt=prompts, stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in whole.choices]
    ids = requests.post(
        f"{server}/v1/completions", json={"prompt": [[1, 2, 3], [4, 5]], **options}, timeout=30
    ).json()
    assert len(ids["choices"]) == 2 and ids["usage"]["prompt_tokens"] == 5
    sampled = {**options, "temperature": 1.0, "seed": 3}
    many = client.completions.create(model=None, prompt=prompts[:2], n=3, **sampled)
    assert [c.index for c in many.choices] == list(range(6))
    one = client.completions.create(model=None, prompt=prompts[1], **sampled)
    assert many.choices[3].text == one.choices[0].text  # prompt 1's sample 0


def test_echo_puts_the_prompt_and_its_scores_first(client: openai.OpenAI) -> None:
    options = {"model": None, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    plain = client.completions.create(**options).choices[0]
    echoed = client.completions.create(**options, echo=True, n=2).choices
    assert [c.text for c in echoed] == [PROMPT + plain.text] * 2
    scored = client.completions.create(**options, echo=True, logprobs=1).choices[0]
    logprobs = scored.logprobs
    assert "".join(logprobs.tokens) == scored.text == PROMPT + plain.text
    # The prompt's first token has no log-probability; every other token has one.
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.text_offset[0] == 0 and len(logprobs.tokens) > 5
    stream = client.completions.create(**options, echo=True, stream=True)
    chunks = [c.choices[0].text for c in stream if c.choices]
    assert chunks[0].startswith(PROMPT) and "".join(chunks) == PROMPT + plain.text


def test_server_sent_events_on_the_wire(server: str) -> None:
    body = {"prompt": "The", "max_tokens": 8, "stream": True, "stop": ["\n\n"]}
    response = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        ({"prompt": "The", "n": 17}, 400, "n", "less than or equal to 16"),
        ({"prompt": "The", "model": "gpt-4"}, 404, "model", "GET /v1/models"),
        ({"prompt": "word " * 400}, 400, "prompt", "shorten the prompt"),
        ({"prompt": "The", "suffix": "end"}, 400, "suffix", "does not insert text"),
        ({"prompt": "The", "best_of": 3}, 400, "best_of", "only best_of = n"),
        ({"prompt": [True]}, 400, "prompt", "valid"),  # `true` is not token id 1
        ({"prompt": "The", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
        ({"prompt": []}, 400, "prompt", "send 1 to 64 prompts"),
        ({"prompt": [1, 99999]}, 400, "prompt", "token ids [99999] are not in"),
        ({"prompt": "The", "logit_bias": {"-3": 1}}, 400, "logit_bias", "token ids [-3]"),
        ({"prompt": "The", "logit_bias": {"5": 101}}, 400, "logit_bias", "logit_bias.5: Input"),
        ({"prompt": "The", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
        ({"prompt": "The", "seed": -5}, 400, "seed", "greater than or equal to 0"),
    ],
)
def test_errors_in_openai_shape(
    server: str, body: dict, status: int, param: str, message: str
) -> None:
    response = requests.post(f"{server}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def cancelled_count(server: str) -> float:
    text = requests.get(f"{server}/metrics", timeout=10).text
    lines = [x for x in text.splitlines() if x.startswith("tailorgpt_requests_total{")]
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if 'reason="cancelled"' in x)


def test_a_disconnected_stream_is_cancelled(server: str) -> None:
    def count() -> float:
        return cancelled_count(server)

    before = count()
    body = {"prompt": "The", "max_tokens": 250, "ignore_eos": True, "stream": True}
    response = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60)
    next(line for line in response.iter_lines() if line)
    response.close()  # the client goes away after its first token
    assert wait_for(lambda: count() == before + 1)
    assert wait_for(lambda: metric(server, "tailorgpt_running_sequences") == 0)


def test_a_client_that_leaves_before_its_whole_answer_is_cancelled(server: str) -> None:
    before = cancelled_count(server)
    body = json.dumps({"prompt": "The", "max_tokens": 250, "ignore_eos": True}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    # Gone before a token could be sent: the sequence is cancelled, not run to its length.
    assert wait_for(lambda: cancelled_count(server) == before + 1)


def test_a_full_queue_answers_503_with_retry_after(server: str) -> None:
    async def flood() -> list[httpx.Response]:
        body = {"prompt": "The", "max_tokens": 250, "ignore_eos": True}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as http:
            return await asyncio.gather(
                *[http.post("/v1/completions", json=body) for _ in range(200)]
            )

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "server_overloaded"
    assert metric(server, "tailorgpt_requests_rejected_total") >= statuses.count(503)
    assert all(
        r.json()["usage"]["completion_tokens"] == 250 for r in responses if r.status_code == 200
    )


def server_log(export_dir: Path) -> str:
    return (export_dir.parent / "serve.log").read_text()


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
TURN_STOPS = ["\n\nsystem:", "\n\nuser:", "\n\nassistant:"]


def sse(response: requests.Response) -> list[dict]:
    lines = [x for x in response.iter_lines(decode_unicode=True) if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]


def test_chat_completions_on_the_wire(server: str) -> None:
    body = {**CHAT, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = requests.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert whole["object"] == "chat.completion" and whole["id"]
    [choice] = whole["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in (
        "stop",
        "length",
    )
    entries = choice["logprobs"]["content"]
    assert len(entries) == whole["usage"]["completion_tokens"]
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in entries)
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    # The reply is the completion of the template's prompt, up to the next turn.
    prompt = "system: Be brief.\n\nuser: Hi\n\nassistant:"
    plain = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": TURN_STOPS}
    text = requests.post(f"{server}/v1/completions", json=plain, timeout=60).json()
    assert choice["message"]["content"] == text["choices"][0]["text"].lstrip()
    streamed = {**body, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    response = requests.post(
        f"{server}/v1/chat/completions", json=streamed, stream=True, timeout=60
    )
    chunks = sse(response)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all(len(c["choices"]) == 1 for c in chunks[:-1])
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:-1] if c["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_what_real_clients_send_is_accepted(server: str, export_dir: Path) -> None:
    nulls = {"max_tokens": None, "temperature": None, "top_p": None, "stop": None, "n": None}
    nulls |= {"logprobs": None, "presence_penalty": None, "seed": None, "user": None}
    body = {"prompt": "The", **nulls, "best_of": 1, "made_up_field": 1, "user": "someone"}
    for _ in range(4):
        answer = requests.post(f"{server}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] <= 16  # null max_tokens: the default
    chat = {**CHAT, **nulls, "max_completion_tokens": 4, "store": False, "tools": []}
    answer = requests.post(f"{server}/v1/chat/completions", json=chat, timeout=60)
    assert answer.status_code == 200, answer.text
    # Logged once per worker process (two here), not once per request.
    log = server_log(export_dir)
    assert 1 <= log.count('"field": "made_up_field"') <= 2
    assert '"field": "store"' not in log  # an OpenAI field without effect here: no word


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"tools": [{"type": "function"}]}, "tools", "does not call tools"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            "response_format",
            "Invalid type: x",
        ),
        ({"top_logprobs": 2}, "top_logprobs", "set logprobs to true"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "text"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "'user'"),
    ],
)
def test_chat_errors_in_openai_shape(server: str, body: dict, param: str, message: str) -> None:
    response = requests.post(f"{server}/v1/chat/completions", json=CHAT | body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_models_by_id_and_unknown_routes(server: str) -> None:
    model = requests.get(f"{server}/v1/models/tailorgpt-testmodel", timeout=30)
    assert model.json() == requests.get(f"{server}/v1/models", timeout=30).json()["data"][0]
    for response, status in [
        (requests.get(f"{server}/v1/models/gpt-4", timeout=30), 404),
        (requests.get(f"{server}/v1/embeddings", timeout=30), 404),
        (requests.post(f"{server}/v1/nothing/here", json={}, timeout=30), 404),
        (requests.get(f"{server}/v1/completions", timeout=30), 405),  # POST only
    ]:
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_request_ids_and_the_request_log(server: str, export_dir: Path) -> None:
    secret = "a prompt nobody logs"
    body = {"prompt": secret, "max_tokens": 3}
    given = requests.post(
        f"{server}/v1/completions", json=body, headers={"X-Request-Id": "trace-42"}, timeout=60
    )
    assert given.headers["x-request-id"] == "trace-42" == given.json()["id"]
    made = requests.post(f"{server}/v1/chat/completions", json=CHAT, timeout=60)
    assert made.headers["x-request-id"] == made.json()["id"] and len(made.json()["id"]) == 32
    odd = requests.post(
        f"{server}/v1/completions", json=body, headers={"X-Request-Id": "x" * 200}, timeout=60
    )
    assert odd.headers["x-request-id"] != "x" * 200  # too long for a log: replaced
    assert generate(server, {"prompt": "The"}).headers["x-request-id"]
    lines = [
        json.loads(x)
        for x in server_log(export_dir).splitlines()
        if x.startswith('{"id": "trace-42"')
    ]
    assert len(lines) == 1
    expected = {"route", "status", "prompt_tokens", "completion_tokens", "queue_seconds"}
    expected |= {"ttft_seconds", "finish_reason", "total_seconds"}
    assert expected <= set(lines[0]) and lines[0]["status"] == 200
    assert lines[0]["completion_tokens"] == given.json()["usage"]["completion_tokens"]
    assert secret not in server_log(export_dir)


def test_the_new_metrics(server: str) -> None:
    names = ["tailorgpt_queue_seconds_count", "tailorgpt_prompt_length_tokens_count"]
    names.append("tailorgpt_output_length_tokens_count")
    # Other tests' requests are done (a cancelled one may finish a step late): this one counts.
    assert wait_for(lambda: metric(server, "tailorgpt_running_sequences") == 0)
    before = {name: metric(server, name) for name in names}
    requests.post(f"{server}/v1/completions", json={"prompt": "The", "max_tokens": 2}, timeout=60)
    text = requests.get(f"{server}/metrics", timeout=10).text
    for name in names:  # one finished request, one sample: one observation each
        assert metric(server, name) - before[name] == 1, name
    assert 'tailorgpt_request_seconds_bucket{le="300.0"' in text
    info = [x for x in text.splitlines() if x.startswith("tailorgpt_model_info{")]
    assert info and 'variant="int8"' in info[0] and 'device="cpu"' in info[0]
    assert 'model="tailorgpt-testmodel"' in info[0] and info[0].endswith(" 2.0")  # two workers


def test_generate_refuses_a_caller_that_arrives_to_a_full_queue(keyed_server: str) -> None:
    """With the queue full, a /generate call gets 503 with Retry-After as it arrives (on the
    keyed server: one worker, one sequence running, 32 waiting)."""
    url, key = keyed_server, {"Authorization": f"Bearer {KEYS[0]}"}

    def hold(n: int) -> requests.Response:
        body = {"prompt": "The", "max_tokens": 250, "ignore_eos": True, "stream": True, "n": n}
        return requests.post(
            f"{url}/v1/completions", json=body, headers=key, stream=True, timeout=60
        )

    held = [hold(16), hold(16)]
    try:
        while (one := hold(1)).status_code == 200:  # until the queue is full
            held.append(one)
        refused = generate(url, {"prompt": "The", "max_new_tokens": 4}, headers=key)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "server_overloaded"
    finally:
        for response in held:
            response.close()
    # The streams left are cancelled: the server is free for the next test.
    assert wait_for(lambda: metric(url, "tailorgpt_running_sequences", key) == 0)
    assert wait_for(lambda: metric(url, "tailorgpt_queue_length", key) == 0)


def test_a_waiting_stream_sends_keepalive_comments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_api, "KEEPALIVE_SECONDS", 0.05)

    class Queued:
        stats = RequestStats(1, 1, 0.5, 1.0, "length")

        async def __aiter__(self) -> AsyncIterator[Event]:
            await asyncio.sleep(0.3)
            yield Event("Hi", "length", 1, 1)

    async def stream() -> list[str]:
        fmt = openai_api._Completions([""])
        fmt.start("id", "model", None, 1)  # type: ignore[arg-type]  # no token ids to decode
        log: dict = {}
        sent = [x async for x in openai_api._sse(ExitStack(), [Queued()], fmt, False, log)]
        assert log["queue_seconds"] == 0.5 and log["ttft_seconds"] == 1.0
        return sent

    sent = asyncio.run(stream())
    assert sent[0] == ": queued\n\n" and sent.count(": queued\n\n") >= 3
    assert '"text": "Hi"' in sent[-2] and sent[-1] == "data: [DONE]\n\n"
