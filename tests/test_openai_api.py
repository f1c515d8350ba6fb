"""`/v1/completions` and `/v1/models` on the real server, through the official openai client
and raw HTTP: streaming, errors, disconnects and a full queue."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
import requests
from test_service import generate, metric

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
        ({"prompt": "The", "max_token": 5}, 400, "max_token", "Extra inputs are not permitted"),
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


def wait_for(condition: object, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


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
